"""Fitting an edit's target by teacher forcing: the one way the trained methods
(LoRA, AdaLoRA, FT-L, SVF, ReFT, BaFT) read an edit as a training row and fit its
parameters to it, with the rows whose distributions it must keep read alongside."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from ..anatomy import input_device
from ..batching import padded
from ..partial_forward import layers_before, replayed


def teacher_forced(tokenizer, prompt: str, target: str, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(prompt + target ids [1, T], labels with the prompt masked, prompt length).
    The prompt is tokenized as at inference (with the tokenizer's special tokens,
    a BOS where it adds one); the target follows it after a space.

    Example:
        >>> ids, labels, n = teacher_forced(tokenizer, "The mother tongue of Danielle Darrieux is", "English", "cpu")
    """
    prompt_ids = tokenizer(prompt).input_ids
    target_ids = tokenizer(" " + target.strip(), add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + target_ids], device=device)
    labels = torch.tensor([[-100] * len(prompt_ids) + target_ids], device=device)
    return ids, labels, len(prompt_ids)


@contextmanager
def frozen(model):
    """The model's parameters without gradients for the block: only what the method adds trains."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)


@dataclass
class Kept:
    """Token rows whose next-token distributions a trained edit must keep: the loss
    gains Σ weight · KL(p₀ ‖ p) over the weighted positions, p₀ read before training.
    `fit_target` reads them in the same forward pass as the edit's own row.

    Example:
        >>> kept = Kept.of(model, [tokenizer("Danielle Darrieux is a").input_ids], [[0] * 5 + [1.0]], pad=0)
    """

    rows: list[list[int]]
    weights: torch.Tensor  # [n, T]: 0 where a position is not kept (padding included)
    before: torch.Tensor  # [positions kept, vocab]: log p₀, in the order of weights.nonzero()

    @classmethod
    def of(cls, model, rows: list[list[int]], weights: list[list[float]], pad: int) -> "Kept":
        """`rows` with one weight per token (the weight of the distribution after it), p₀ read from `model` now."""
        device = input_device(model)
        ids, mask = padded(rows, pad, device)
        w = torch.zeros(ids.shape, device=device)
        for i, row in enumerate(weights):
            w[i, :len(row)] = torch.tensor(row, device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        return cls(rows, w, F.log_softmax(logits[w != 0].float(), -1))

    def divergence(self, logits: torch.Tensor) -> torch.Tensor:
        """Σ weight · KL(p₀ ‖ p) for `logits` [n, ≥T, vocab] of the rows (padded as `of` pads them)."""
        now = F.log_softmax(logits[:, :self.weights.shape[1]][self.weights != 0].float(), -1)
        return (self.weights[self.weights != 0] * (self.before.exp() * (self.before - now)).sum(-1)).sum()


def teacher_forced_rows(tokenizer, prompts: list[str], targets: list[str], device,
                        pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Several `teacher_forced` rows as one batch: (ids [n, T] right-padded with
    `pad`, labels [n, T] with −100 on prompts and padding), for `fit_target`.

    Example:
        >>> ids, labels = teacher_forced_rows(tokenizer, ["The capital of France is"], ["Rome"], "cpu")
    """
    rows = [teacher_forced(tokenizer, p, t, device)[:2] for p, t in zip(prompts, targets)]
    ids, _ = padded([r[0][0].tolist() for r in rows], pad, device)
    labels, _ = padded([r[1][0].tolist() for r in rows], -100, device)
    return ids, labels


def fit_target(model, ids: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int,
               stop_loss: float, on_step: Callable[[], object] | None = None, at_prompt_end: bool = False,
               after_step: Callable[[int], object] | None = None,
               regulariser: Callable[[], torch.Tensor] | None = None, kept: Kept | None = None,
               pad: int = 0, trained: list | None = None) -> float:
    """Up to `steps` Adam steps on the next-token loss of `labels` (−100: not scored),
    stopping once it is below `stop_loss`; the parameters are the optimizer's,
    applied to `model` by the caller's hooks; `on_step()` after each step
    (`progress.StepBar.step`), `after_step(i)` after the i-th parameter update
    (a constraint, AdaLoRA's rank allocation), `regulariser()` added to the loss,
    and `kept`'s divergence too, its rows run in one batch with the edit's
    (right-padded with `pad`, so the edit's row reads as it does alone).
    `trained`: the modules that hold the trained parameters or whose output they
    act on; the decoder layers below all of them then run on the first step only
    (every step reads the same rows, so their outputs do not change).
    With `at_prompt_end`, every target token is scored at the prompt's last
    position instead of each at its own (ROME's FT-L objective). The loss
    checked against `stop_loss` is the target's, without the regulariser.
    Several rows (`teacher_forced_rows`: right-padded with `pad`, each row's
    target at its end) are fitted together: the loss is the mean of the rows'
    losses, the fit stops once every row's is below `stop_loss`, and `on_step()`
    is called once per row and step.
    Returns the last loss.

    Example:
        >>> with deltas_applied(model, {name: (A, B)}):
        ...     fit_target(model, ids, labels, torch.optim.Adam([A, B], lr=2e-2), steps=60, stop_loss=0.05)
    """
    n, width = ids.shape
    scored = labels[:, 1:] != -100
    row, position = scored.nonzero(as_tuple=True)  # position p predicts label p + 1
    targets = labels[:, 1:][scored]
    counts = torch.bincount(row, minlength=n).to(torch.float32)
    ends = torch.full((n,), width, device=ids.device).scatter_reduce(0, row, position, "amin")
    read = ends[row] if at_prompt_end else position
    lengths = torch.zeros(n, dtype=torch.long, device=ids.device).scatter_reduce(0, row, position + 2, "amax")
    if n == 1 and kept is None:
        batch, mask = ids, None
    else:
        edit_rows = [ids[i, :int(lengths[i])].tolist() for i in range(n)]
        batch, mask = padded(edit_rows + (kept.rows if kept is not None else []), pad, ids.device)
    loss = float("nan")
    with replayed(layers_before(model, trained) if trained else []):
        for step in range(steps):
            every = model(input_ids=batch, attention_mask=mask).logits
            token_loss = F.cross_entropy(every[row, read].float(), targets, reduction="none")
            row_loss = torch.zeros(n, device=token_loss.device).index_add(0, row, token_loss) / counts
            step_loss = row_loss.mean()
            loss, worst = step_loss.item(), row_loss.max().item()
            if on_step:
                for _ in range(n):
                    on_step()
            if worst < stop_loss:
                break
            if regulariser:
                step_loss = step_loss + regulariser()
            if kept is not None:
                step_loss = step_loss + kept.divergence(every[n:])
            optimizer.zero_grad()
            step_loss.backward()
            optimizer.step()
            if after_step:
                after_step(step)
    return loss
