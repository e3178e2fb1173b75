"""ActAdd / uniform steering (Turner et al. 2023; SAKE's ablation): per edit, the
mean difference between the target and source states (`steering.py`'s sets),
added under the same scope router as SAKE. A map of rank 0: a pure shift."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...pack import Edit, EditPack
from .core import SteeringConfig, steering_edit
from .transport import FactoredMap


@dataclass
class ActAddConfig(SteeringConfig):
    """ActAdd's settings: those of `SteeringConfig`."""


def mean_shift(source: torch.Tensor, target: torch.Tensor) -> FactoredMap:
    """The map x ↦ x + mean(target) − mean(source), in factored form (k = 0)."""
    d = source.shape[1]
    return FactoredMap(source.new_zeros(d, 0), source.new_zeros(0, 0), target.mean(0) - source.mean(0))


def actadd_edit(model, tokenizer, requests: list[Edit], config: ActAddConfig | None = None,
                progress: bool = True) -> EditPack:
    """One steering vector and scope per request; returns a `steering_map` pack.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = actadd_edit(model, tokenizer, [edit])
    """
    return steering_edit(model, tokenizer, requests, config or ActAddConfig(), "actadd", mean_shift, progress)
