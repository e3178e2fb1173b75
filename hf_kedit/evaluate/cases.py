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


def training_edits(cases: list[Case], held_out: list[Case] = ()) -> list:
    """`cases` as training edits of a learned editor (MEND's `TrainingEdit`): each
    case's edit, its generality prompts as rephrases, its locality prompts as the
    unrelated prompts to keep. A case whose subject is the subject of an edit in
    `held_out` (the cases the editor will be evaluated on) is left out.

    Example:
        >>> train = training_edits(read_cases("easyedit", "counterfact_easyedit.json"),
        ...                        held_out=read_cases("counterfact", "counterfact.json"))
    """
    from ..methods.learned.mend import TrainingEdit

    seen = {e.subject.casefold() for c in held_out for e in c.edits}
    return [TrainingEdit(c.edits[0], [p.prompt for p in c.probes.get("generality", [])],
                         [p.prompt for p in c.probes.get("locality", [])])
            for c in cases if len(c.edits) == 1 and c.edits[0].subject.casefold() not in seen]
