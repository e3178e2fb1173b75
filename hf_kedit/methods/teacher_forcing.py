"""Fitting an edit's target by teacher forcing: the one way the trained methods
(LoRA, FT-L, ReFT, BaFT) read an edit as a training row and fit its parameters to it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch.nn import functional as F


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


def fit_target(model, ids: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int,
               stop_loss: float, on_step: Callable[[], object] | None = None, at_prompt_end: bool = False,
               after_step: Callable[[int], object] | None = None,
               regulariser: Callable[[], torch.Tensor] | None = None) -> float:
    """Up to `steps` Adam steps on the next-token loss of `labels` (−100: not scored),
    stopping once it is below `stop_loss`; the parameters are the optimizer's,
    applied to `model` by the caller's hooks; `on_step()` after each step
    (`progress.StepBar.step`), `after_step(i)` after the i-th parameter update
    (a constraint, AdaLoRA's rank allocation), `regulariser()` added to the loss.
    With `at_prompt_end`, every target token is scored at the prompt's last
    position instead of each at its own (ROME's FT-L objective). The loss
    checked against `stop_loss` is the target's, without the regulariser.
    Returns the last loss.

    Example:
        >>> with deltas_applied(model, {name: (A, B)}):
        ...     fit_target(model, ids, labels, torch.optim.Adam([A, B], lr=2e-2), steps=60, stop_loss=0.05)
    """
    scored = labels[0, 1:] != -100
    targets = labels[0, 1:][scored]
    prompt_end = int(scored.nonzero()[0])  # the position that predicts the first target token
    loss = float("nan")
    for step in range(steps):
        logits = model(input_ids=ids).logits.float()[0, :-1]
        read = logits[prompt_end].expand(len(targets), -1) if at_prompt_end else logits[scored]
        step_loss = F.cross_entropy(read, targets)
        loss = step_loss.item()
        if on_step:
            on_step()
        if loss < stop_loss:
            break
        if regulariser:
            step_loss = step_loss + regulariser()
        optimizer.zero_grad()
        step_loss.backward()
        optimizer.step()
        if after_step:
            after_step(step)
    return loss
