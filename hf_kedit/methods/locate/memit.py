"""MEMIT: a batch of edits spread over several MLP output projections by least
squares, stored as a `weight_delta` pack (per layer, one rank-one pair per edit,
rank n for a batch of n). Its loop over the layers (`spread_update`) is shared
with AlphaEdit, which solves each layer differently."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ...anatomy import anatomy_of, linear_shape
from ...errors import EditRequestError
from ...kinds.weight_delta import deltas_applied
from ...pack import Edit, EditPack
from ...progress import StepBar
from .stats import StatisticsConfig, corpus_name, key_second_moments
from ..builders import weight_delta_pack
from ..requests import check_requests, edit_layers
from ..setting import setting
from .core import (LOCATE, ValueConfig, context_templates, io_at_subject, key_at_subject, optimise_values,
                   template_counts)


@dataclass
class SpreadConfig(ValueConfig, StatisticsConfig):
    """The settings MEMIT and AlphaEdit share: the key statistics'
    (`StatisticsConfig`), the value optimisation's at the last edited layer
    (`ValueConfig`), and the layers the update spreads over."""

    layers: tuple = setting((0.13, 0.27), "the edited layers: indices, or a (start, end) pair of relative depths",
                            "EasyEdit's layers 4-8 for Llama-family models (0.13-0.27 is 4-8 of 30)")
    context_templates: tuple = setting(((5, 10),), "(how many, tokens) pairs of texts the model samples to put "
                                       "before the prompt", "MEMIT's code in EasyEdit (five of 10 tokens)")


@dataclass
class MEMITConfig(SpreadConfig):
    """MEMIT's settings: `SpreadConfig`'s and the weight of the key statistics in
    the least-squares update."""

    update_weight: float | None = setting(None, "λ in ΔW = R Kᵀ(λC + KKᵀ)⁻¹ (None: 15000 · d_ff / 16384, "
                                          "scaled_update_weight)", "MEMIT's and EasyEdit's λ = 15000 for d_ff "
                                          "16,384, scaled to the MLP's width: measured here "
                                          f"({LOCATE}#memits-update-weight)")

    def __post_init__(self):
        """`EditRequestError` for settings MEMIT cannot use (checks that need no model)."""
        super().__post_init__()
        weight = self.update_weight
        if weight is not None and (type(weight) not in (int, float) or not weight > 0):
            raise EditRequestError(f"update_weight={weight!r}: give a positive number (λ), or None to scale MEMIT's "
                                   "to the model's MLP width")


def memit_edit(model, tokenizer, requests: list[Edit], config: MEMITConfig | None = None,
               progress: bool = True) -> EditPack:
    """All requests in one MEMIT update.

    Example:
        >>> pack = memit_edit(model, tokenizer, edits, MEMITConfig(layers=(4, 5, 6, 7, 8)))
    """
    check_requests(requests)
    config = config or MEMITConfig()
    template_counts(config.context_templates)
    anatomy = anatomy_of(model)
    layers = edit_layers(config.layers, anatomy.num_layers)
    weight = config.update_weight or scaled_update_weight(linear_shape(model.get_submodule(
        anatomy.mlp_out(layers[0])))[1])
    second_moments = (key_second_moments(model, tokenizer, layers, config.stats_corpus, config.stats_tokens,
                                         progress=progress, source=config.stats_source) if config.covariance else {})
    factors, _ = spread_update(model, tokenizer, requests, config, layers, "memit", progress,
                               lambda layer, keys, residual: least_squares_update(keys, residual,
                                                                                  second_moments.get(layer), weight))
    hyperparameters = {**asdict(config), "layers": layers, "update_weight": weight,
                       "stats_corpus": corpus_name(config.stats_corpus)}
    return weight_delta_pack(model, "memit", hyperparameters, requests, factors)


def spread_update(model, tokenizer, requests: list[Edit], config: SpreadConfig, layers: list[int], method: str,
                  progress: bool, solve) -> tuple[dict, dict]:
    """MEMIT's loop, shared with AlphaEdit: the v* of every request at the last
    layer's output, then layer by layer the keys and residuals on the model with
    the layers before updated, and `solve(layer, keys [d_ff, n], residual [d, n])`'s
    factors (A [n, d_ff], B [d, n]; column j edit j's share). Returns (per edit, per
    module, its factors; per module, the batch's factors)."""
    template_counts(config.context_templates)
    anatomy = anatomy_of(model)
    names = {layer: anatomy.mlp_out(layer) for layer in layers}
    last_block = model.get_submodule(anatomy.layer(layers[-1]))
    templates = context_templates(model, tokenizer, config.context_templates)
    bar = StepBar(requests, config.steps, f"{method}: optimising targets", disable=not progress)
    targets = torch.stack([solved.value for batch in bar.batches(config.batch_size)
                           for solved in optimise_values(model, tokenizer, last_block, batch, templates, config,
                                                         on_step=bar.step)], 1)
    applied, factors = {}, {e.id: {} for e in requests}
    for i, layer in enumerate(tqdm(layers, desc=f"{method}: solving layers", unit="layer", disable=not progress)):
        module = model.get_submodule(names[layer])
        with deltas_applied(model, applied):  # keys and residuals see the layers updated so far
            keys = torch.stack([key_at_subject(model, tokenizer, module, e, templates) for e in requests], 1)
            current = torch.stack([io_at_subject(model, tokenizer, last_block, e)[1] for e in requests], 1)
        A, B = solve(layer, keys, (targets - current) / (len(layers) - i))
        applied[names[layer]] = (A, B)
        for j, edit in enumerate(requests):
            factors[edit.id][names[layer]] = (A[j:j + 1], B[:, j:j + 1])
    return factors, applied


def scaled_update_weight(key_size: int) -> float:
    """λ = 15000 · d_ff / 16384: MEMIT's weight for GPT-J (d_ff 16,384; EasyEdit's for
    Llama too) scaled to a model whose MLP keys have `key_size` dimensions. With
    C = E[kkᵀ] a typical key has kᵀC⁻¹k ≈ d_ff, and a layer writes the share
    kᵀC⁻¹k / (λ + kᵀC⁻¹k) of its residual: about half, as on GPT-J. The unscaled
    15000 wrote a tenth on a 1,536-wide MLP (measured efficacy `cmp` 0.62 for a
    batch of 40; docs/locate-and-edit.md)."""
    return 15000.0 * key_size / 16384


def least_squares_update(keys: torch.Tensor, residual: torch.Tensor, second_moment: torch.Tensor | None,
                         update_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's closed form: ΔW = R Kᵀ(λC + KKᵀ)⁻¹, the minimiser of
    ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) (C = I without statistics), for keys K [d_ff, n]
    and residuals R [d, n]. Returns the factors A = ((λC + KKᵀ)⁻¹K)ᵀ [n, d_ff] and
    B = R [d, n]: column j of each is edit j's rank-one share."""
    K = keys.double()
    C = (second_moment.to(K.device).double() if second_moment is not None
         else torch.eye(len(K), dtype=torch.float64, device=K.device))
    adjusted = torch.linalg.solve(update_weight * C + K @ K.T, K)
    return adjusted.T.float(), residual.float()
