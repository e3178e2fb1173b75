"""MEMIT: a batch of edits spread over several MLP output projections by least
squares, stored as a `weight_delta` pack (per layer, one rank-one pair per edit,
rank n for a batch of n), with the layer loop it shares with AlphaEdit
(`core.spread_update`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ...anatomy import anatomy_of, linear_shape
from ...errors import EditRequestError
from ...pack import Edit, EditPack
from .stats import corpus_name, key_second_moments
from ..builders import weight_delta_pack
from ..requests import check_requests, edit_layers
from ..setting import setting
from .core import LOCATE, SpreadConfig, spread_update, template_counts


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
