"""BaFT (Liu et al., ICLR 2025): LoReFT whose update is weighted per basis
direction by the input, Φ(h) = h + Rᵀ[w(h) ⊙ (W h + b − R h)], so that an edit
can switch itself off on unrelated inputs.

The paper's gate equation, loss formulas and coefficients were not found
(../shared/docs/methods.md §2). Chosen here, as methods.md infers:
- gate w(h) = sigmoid(G h / RMS(h) + c), one weight in [0, 1] per basis
  direction (methods.md's inferred sigmoid(G h + c) on the normalised state:
  see `kinds/basis_intervention.py`);
- locality: the mean gate over every token of unrelated texts (the gates
  read the layer's unedited output there), pushed towards 0;
- load balancing: the squared coefficient of variation of the edit's bases'
  mean gates on its own prompt positions (zero when all are used alike), as
  mixture-of-experts balancing losses do, so an edit does not collapse onto
  one direction. Each edit has its own bases; sequential edits are new packs
  (or new edits) that leave the old ones as they were.
The unrelated texts are `locality_texts`, or text the model samples itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..anatomy import anatomy_of, hidden_states
from ..batching import pad_id, padded
from ..errors import EditRequestError
from ..pack import Edit, EditPack
from ..sampling import sample_texts, seeded
from .basis import Intervention, InterventionConfig, train_interventions


@dataclass
class BaFTConfig(InterventionConfig):
    """BaFT's settings: those of `InterventionConfig`, plus `locality_weight` and
    `balance_weight` (the loss terms' coefficients), and the unrelated texts:
    `locality_texts`, or `locality_samples` texts of `locality_tokens` tokens the
    model samples itself (seeded by `seed`)."""

    locality_weight: float = 1.0
    balance_weight: float = 0.1
    locality_texts: tuple[str, ...] | None = None
    locality_samples: int = 16
    locality_tokens: int = 32


def baft_edit(model, tokenizer, requests: list[Edit], config: BaFTConfig | None = None,
              progress: bool = True) -> EditPack:
    """Train one gated BaFT intervention per request; returns a `basis_intervention` pack.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = baft_edit(model, tokenizer, [edit], BaFTConfig(locality_texts=("The sky is blue.",)))
    """
    config = config or BaFTConfig()

    def regulariser_for(layer: int):
        texts = _locality_texts(model, tokenizer, config)
        states = locality_states(model, tokenizer, anatomy_of(model).layer(layer), texts)

        def regulariser(intervention: Intervention, edit_gates: torch.Tensor) -> torch.Tensor:
            locality = intervention.gates(states).mean()
            usage = edit_gates.mean(0)
            balance = usage.var(unbiased=False) / usage.mean().pow(2).clamp_min(1e-6)
            return config.locality_weight * locality + config.balance_weight * balance
        return regulariser

    return train_interventions(model, tokenizer, requests, config, "baft", "BAFT", regulariser_for, progress)


@torch.no_grad()
def locality_states(model, tokenizer, layer: str, texts: list[str]) -> torch.Tensor:
    """[N, d] float32: the output of the decoder layer named `layer` at every real
    token of `texts`, before any attached intervention."""
    rows = [ids for ids in (tokenizer(t).input_ids for t in texts) if ids]
    ids, mask = padded(rows, pad_id(tokenizer), next(model.parameters()).device)
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, args, out: captured.append(hidden_states(out)), prepend=True)
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    return captured[0][mask.bool()].float()


def _locality_texts(model, tokenizer, config: BaFTConfig) -> list[str]:
    if config.locality_texts is not None:
        texts = config.locality_texts
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise EditRequestError(f"locality_texts={texts!r}: give a non-empty list of non-blank texts, or None "
                                   "for text the model samples itself")
        return list(texts)
    if type(config.locality_samples) is not int or config.locality_samples < 1:
        raise EditRequestError(f"locality_samples={config.locality_samples!r}: give a positive number of texts")
    with seeded(config.seed):
        return sample_texts(model, tokenizer, config.locality_samples, config.locality_tokens, top_k=50)
