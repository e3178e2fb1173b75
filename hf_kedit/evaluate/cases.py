"""What the evaluation reads: a case is the edit request(s) and the test prompts
grouped by metric, whatever benchmark file it came from."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..pack import Edit


@dataclass
class Probe:
    """One test prompt.

    `answers`: the expected continuations (the first is used for teacher forcing,
    any of them counts for generation), or empty where only "unchanged by the
    edit" is asked (locality without a known answer). `contrast`: the answer that
    must score lower than `answers[0]` for the `cmp` score (None where that score
    is not defined)."""

    prompt: str
    answers: list[str] = field(default_factory=list)
    contrast: str | None = None


@dataclass
class Case:
    """An evaluation case: `edits` (one, or several for MQuAKE) and `probes`
    mapping a metric name to its prompts. Metric names: `efficacy`,
    `generality`, `locality`, `portability`, and sub-groups written
    `portability/<group>` or `locality/<group>` (e.g. RippleEdits'
    `portability/Logical_Generalization`). `generation_prompts` feed fluency."""

    id: str
    edits: list[Edit]
    probes: dict[str, list[Probe]] = field(default_factory=dict)
    generation_prompts: list[str] = field(default_factory=list)
