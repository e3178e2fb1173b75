"""Fitting an edit's target by teacher forcing: the one way the trained methods
(LoRA, ReFT, BaFT) read an edit as a training row and fit its parameters to it."""
from __future__ import annotations

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


def fit_target(model, ids: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int,
               stop_loss: float, on_step: Callable[[], object] | None = None) -> float:
    """Up to `steps` Adam steps on the next-token loss of `labels` (−100: not scored),
    stopping once it is below `stop_loss`; the parameters are the optimizer's,
    applied to `model` by the caller's hooks; `on_step()` after each step
    (`progress.StepBar.step`). Returns the last loss.

    Example:
        >>> with deltas_applied(model, {name: (A, B)}):
        ...     fit_target(model, ids, labels, torch.optim.Adam([A, B], lr=2e-2), steps=60, stop_loss=0.05)
    """
    loss = float("nan")
    for _ in range(steps):
        logits = model(input_ids=ids).logits.float()
        step_loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        loss = step_loss.item()
        if on_step:
            on_step()
        if loss < stop_loss:
            break
        optimizer.zero_grad()
        step_loss.backward()
        optimizer.step()
    return loss
