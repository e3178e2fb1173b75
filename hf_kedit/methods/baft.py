"""BaFT (Liu et al., ICLR 2025): LoReFT whose update is weighted per basis
direction by the input, Φ(h) = h + Rᵀ[w(h) ⊙ (W h + b − R h)], so that an edit
can switch itself off on unrelated inputs.

The paper's gate equation, loss formulas and coefficients were not found
(../shared/docs/methods.md §2). Chosen here, as methods.md infers:
- gate w(h) = sigmoid(G h / RMS(h) + c), one weight in [0, 1] per basis
  direction (methods.md's inferred sigmoid(G h + c) on the normalised state:
  see `kinds/basis_intervention.py`);
- locality: binary cross-entropy that shuts the gates on every token of
  unrelated texts and on the intervened positions of contrast prompts (the
  edit's own prompt about other subjects), and opens them on the edit's own
  positions (the gates read the layer's unedited output). Without the
  opening term the gates stayed near 0.5 everywhere while W and b grew to
  make the edit (measured: neighbours' gates as open as the edit's); with
  unrelated text alone a gate learns the relation's wording, which the
  prompts of other subjects share: on CounterFact those neighbours are the
  locality test;
- load balancing: the squared coefficient of variation of the edit's bases'
  mean gates on its own prompt positions (zero when all are used alike), as
  mixture-of-experts balancing losses do, so an edit does not collapse onto
  one direction. Each edit has its own bases; sequential edits are new packs
  (or new edits) that leave the old ones as they were.
The unrelated texts are `locality_texts`, or text the model samples itself;
the contrast subjects are `contrast_subjects`, a fixed list of well-known
entities of several kinds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..anatomy import anatomy_of, hidden_states
from ..batching import pad_id, padded
from ..errors import EditRequestError
from ..pack import Edit, EditPack
from ..sampling import sample_texts, seeded
from ..kinds.basis_intervention import parse_positions
from ..kinds.prompt_calls import select_positions
from .basis import Intervention, InterventionConfig, train_interventions

CONTRAST_SUBJECTS = ("Barack Obama", "Marie Curie", "Pablo Picasso", "William Shakespeare", "Serena Williams",
                     "Toyota", "Microsoft", "the BBC", "Tokyo", "Brazil", "the Nile", "Mount Everest", "the Louvre",
                     "Harvard University", "the Beatles", "Christianity")


@dataclass
class BaFTConfig(InterventionConfig):
    """BaFT's settings: those of `InterventionConfig`, plus `locality_weight` and
    `balance_weight` (the loss terms' coefficients), the unrelated texts:
    `locality_texts`, or `locality_samples` texts of `locality_tokens` tokens the
    model samples itself (seeded by `seed`), and `contrast_subjects`, put in each
    edit's prompt in place of its subject (empty: no contrast prompts)."""

    locality_weight: float = 1.0
    balance_weight: float = 0.1
    contrast_subjects: tuple[str, ...] = CONTRAST_SUBJECTS
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
    subjects = config.contrast_subjects
    if isinstance(subjects, str) or not all(isinstance(s, str) and s.strip() for s in subjects):
        raise EditRequestError(f"contrast_subjects={subjects!r}: give a list of non-blank subjects, or () for none")

    def regulariser_for(layer: int):
        name = anatomy_of(model).layer(layer)
        states = locality_states(model, tokenizer, name, _locality_texts(model, tokenizer, config))
        positions = parse_positions(config.positions, EditRequestError)
        contrasts = {}
        for edit in requests:
            others = [edit.prompt.format(s) for s in subjects if s.lower() != edit.subject.strip().lower()]
            contrasts[edit.id] = locality_states(model, tokenizer, name, others, positions) if others else None

        def regulariser(edit: Edit, intervention: Intervention, edit_gates: torch.Tensor) -> torch.Tensor:
            closed = [intervention.gates(states)]
            if contrasts[edit.id] is not None:
                closed.append(intervention.gates(contrasts[edit.id]))
            # binary cross-entropy: gates shut on unrelated and contrast positions, open on the edit's own
            locality = sum(-torch.log1p(-g.clamp_max(1 - 1e-6)).mean() for g in closed) / len(closed)
            opening = -edit_gates.clamp_min(1e-6).log().mean()
            usage = edit_gates.mean(0)
            balance = usage.var(unbiased=False) / usage.mean().pow(2).clamp_min(1e-6)
            return config.locality_weight * (locality + opening) + config.balance_weight * balance
        return regulariser

    return train_interventions(model, tokenizer, requests, config, "baft", "BAFT", regulariser_for, progress)


@torch.no_grad()
def locality_states(model, tokenizer, layer: str, texts: list[str],
                    positions: tuple[int, int] | None = None) -> torch.Tensor:
    """[N, d] float32: the output of the decoder layer named `layer` at every real
    token of `texts` (or at the (first n, last m) `positions`), before any
    attached intervention."""
    rows = [ids for ids in (tokenizer(t).input_ids for t in texts) if ids]
    ids, mask = padded(rows, pad_id(tokenizer), next(model.parameters()).device)
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, args, out: captured.append(hidden_states(out)), prepend=True)
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    where = mask.bool() if positions is None else select_positions(mask.bool(), *positions)
    return captured[0][where].float()


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
