"""What edits should leave alone, measured against the base model in the same
call (the packs switched off with `stack_of(model).disable()`): perplexity on a
fixed text that no benchmark edit is about, and generation speed.

The text, `general_text.txt`, was written for this purpose and ships with the
package: everyday explanations (baking, arithmetic, rivers, birds, bicycles)
with no named entities, so that no CounterFact, zsRE or WikiBigEdit edit
targets it and it does not depend on sampling from the model.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from ..attach import stack_of
from ..batching import padded
from .scoring import Scorer

GENERAL_TEXT = Path(__file__).with_name("general_text.txt")
SPEED_PROMPTS = ("The weather today is", "My favourite way to spend a morning is", "A short story about a boat:",
                 "The most useful kitchen tool is")


def general_passages() -> list[str]:
    """The shipped text's paragraphs."""
    return [p.strip() for p in GENERAL_TEXT.read_text().split("\n\n") if p.strip()]


def perplexity(scorer: Scorer, passages: list[str]) -> float:
    """exp of the mean token NLL of each passage after its first word."""
    pairs = [tuple(p.split(" ", 1)) for p in passages]
    readings = scorer.forced(pairs)
    tokens = sum(len(r.target) for r in readings)
    return math.exp(sum(r.nll * len(r.target) for r in readings) / tokens)


def perplexity_ratio(scorer: Scorer, passages: list[str] | None = None) -> float:
    """The model's perplexity on `passages` (default: the shipped text) over the
    base model's: 1.0 when the attached packs change nothing there."""
    passages = passages or general_passages()
    edited = perplexity(scorer, passages)
    with stack_of(scorer.model).disable():
        base = perplexity(scorer, passages)
    return edited / base


@torch.no_grad()
def speed_ratio(scorer: Scorer, tokens: int = 32, rounds: int = 3) -> float:
    """Greedy generation's tokens/s with the attached packs over the base model's:
    the same prompts and exactly `tokens` new tokens each, runs alternating
    (edited, base, edited, base, ...), medians of `rounds` each."""
    ids, mask = padded([scorer.prompt_ids(p) for p in SPEED_PROMPTS], scorer.pad_id, scorer.device, left=True)

    def run() -> float:
        start = time.perf_counter()
        scorer.model.generate(input_ids=ids, attention_mask=mask, min_new_tokens=tokens, max_new_tokens=tokens,
                              do_sample=False, pad_token_id=scorer.pad_id)
        return time.perf_counter() - start

    edited, base = [], []
    for _ in range(rounds):
        edited.append(run())
        with stack_of(scorer.model).disable():
            base.append(run())
    return statistics.median(base) / statistics.median(edited)
