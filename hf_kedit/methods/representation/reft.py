"""LoReFT (Wu et al. 2024, pyreft's `LoreftIntervention`): per edit, Φ(h) = h +
Rᵀ(W h + b − R h) on one layer's output at the prompt positions, trained on
the target's cross-entropy; BaFT with its gate fixed at 1, its baseline."""
from __future__ import annotations

from dataclasses import dataclass

from ...pack import Edit, EditPack
from .core import InterventionConfig, train_interventions


@dataclass
class ReFTConfig(InterventionConfig):
    """LoReFT's settings: those of `InterventionConfig` (layer, rank, positions,
    steps, lr, stop_loss, seed)."""


def reft_edit(model, tokenizer, requests: list[Edit], config: ReFTConfig | None = None,
              progress: bool = True) -> EditPack:
    """Train one LoReFT intervention per request; returns a `basis_intervention` pack.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = reft_edit(model, tokenizer, [edit], ReFTConfig(rank=4, positions="l1"))
    """
    return train_interventions(model, tokenizer, requests, config or ReFTConfig(), "reft", "LOREFT",
                               progress=progress)
