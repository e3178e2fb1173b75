"""AlphaEdit: MEMIT's batch update projected onto the null space of the keys the
model must keep (the key statistics' near-zero directions), so that for those
keys the edited layers' outputs do not move; in sequential use the keys of
earlier batches enter the least squares, so a new batch keeps their values
too. Stored as a `weight_delta` pack like MEMIT's (rank n per layer for a batch
of n)."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from ...anatomy import anatomy_of
from ...errors import EditRequestError
from ...kinds.weight_delta import deltas_applied
from ...pack import Edit, EditPack
from ...pack.fingerprint import base_model_record
from ...sampling import per_model
from ..builders import weight_delta_pack
from ..history import History
from ..requests import check_requests, edit_layers
from ..setting import setting
from .core import LOCATE, SpreadConfig, context_templates, key_at_subject, spread_update, template_counts
from .stats import corpus_name, key_second_moments

ALPHAEDIT = "AlphaEdit's reference code (hparams/AlphaEdit/Llama3-8B.json)"


@dataclass
class AlphaEditConfig(SpreadConfig):
    """AlphaEdit's settings: `SpreadConfig`'s (MEMIT's layers, templates, value
    optimisation and key statistics) and the null space's."""

    nullspace_share: float = setting(0.2, "the null space the update is projected onto: the eigen-directions of "
                                     "the key statistics C = E[k kᵀ] with the smallest eigenvalues that together "
                                     "carry at most this share of trace(C)", f"{ALPHAEDIT} keeps the eigenvalues "
                                     "below 2e-2, which on the default model's layers 4-8 carry 21-46 % of the "
                                     f"trace; a share holds at any key scale ({LOCATE}#alphaedit)")
    ridge: float = setting(0.1, "α in ΔW = R (P K)ᵀ (P(KKᵀ + K₀K₀ᵀ) + α I)⁻ᵀ, as a multiple of trace(C) = E‖k‖²",
                           f"{ALPHAEDIT} has L2 10, absolute; measured here ({LOCATE}#alphaedit)")

    def __post_init__(self):
        """`EditRequestError` for settings AlphaEdit cannot use (checks that need no model)."""
        super().__post_init__()
        share = self.nullspace_share
        if type(share) not in (int, float) or not 0 < share < 1:
            raise EditRequestError(f"nullspace_share={share!r}: give a number between 0 and 1 (the share of the "
                                   "keys' energy the update may touch)")
        if type(self.ridge) not in (int, float) or not self.ridge > 0:
            raise EditRequestError(f"ridge={self.ridge!r}: give a positive number")
        if not self.covariance:
            raise EditRequestError("covariance=False: AlphaEdit's null space comes from the key statistics; keep "
                                   "covariance=True, or use memit")


class EditedKeys(History):
    """The keys of the edits made so far, as Σ k kᵀ per edited module (its
    `tensors`, float32 [d_ff, d_ff]): what a sequence of AlphaEdit batches carries
    from one batch to the next (AlphaEdit's cache_c). `alphaedit_edit(...,
    history=keys)` reads and then extends it; `save` and `load` keep it beside
    the packs between sessions.

    Example:
        >>> keys = EditedKeys()
        >>> first = alphaedit_edit(model, tokenizer, batch_1, history=keys)
        >>> load_edits(model, first)
        >>> second = alphaedit_edit(model, tokenizer, batch_2, history=keys)
        >>> keys.save("edited-keys.safetensors")
    """

    kind = "alphaedit-keys"


def alphaedit_edit(model, tokenizer, requests: list[Edit], config: AlphaEditConfig | None = None,
                   progress: bool = True, history: EditedKeys | None = None) -> EditPack:
    """All requests in one AlphaEdit update. With `history` (the `EditedKeys` of
    the batches made before, whose packs are attached to `model`), the update
    also keeps those edits' keys, and `history` is then extended by this batch's.

    Example:
        >>> pack = alphaedit_edit(model, tokenizer, edits)
    """
    check_requests(requests)
    config = config or AlphaEditConfig()
    template_counts(config.context_templates)
    anatomy = anatomy_of(model)
    layers = edit_layers(config.layers, anatomy.num_layers)
    names = {layer: anatomy.mlp_out(layer) for layer in layers}
    if history is not None:
        history.check(base_model_record(model, list(names.values())))
    second_moments = key_second_moments(model, tokenizer, layers, config.stats_corpus, config.stats_tokens,
                                        progress=progress, source=config.stats_source)

    def solve(layer, keys, residual):
        C = second_moments[layer].to(keys.device)
        previous = history.tensors.get(names[layer]) if history is not None else None
        return null_space_update(keys, residual, null_space_projection(model, C, config.nullspace_share),
                                 previous, config.ridge * C.trace().item())

    factors, applied = spread_update(model, tokenizer, requests, config, layers, "alphaedit", progress, solve)
    if history is not None:
        templates = context_templates(model, tokenizer, config.context_templates)
        with deltas_applied(model, applied):  # the keys as the next batch's model computes them
            for layer, name in names.items():
                module = model.get_submodule(name)
                K = torch.stack([key_at_subject(model, tokenizer, module, e, templates) for e in requests], 1)
                history.tensors[name] = (K @ K.T).cpu() + history.tensors.get(name, 0)
        history.n_edits += len(requests)
    hyperparameters = {**asdict(config), "layers": layers, "stats_corpus": corpus_name(config.stats_corpus),
                       "edits_before": history.n_edits - len(requests) if history is not None else 0}
    return weight_delta_pack(model, "alphaedit", hyperparameters, requests, factors)


def null_space_projection(model, second_moment: torch.Tensor, share: float) -> torch.Tensor:
    """P = U₀U₀ᵀ [d_ff, d_ff], U₀ the eigenvectors of C of smallest eigenvalue that
    together carry at most `share` of trace(C); computed once per model and C (an
    eigendecomposition: about a second for d_ff 1,536, so it is derived from the
    cached statistics rather than cached itself)."""
    identity = hashlib.sha256(second_moment.detach().cpu().numpy().tobytes()).hexdigest()

    def project():
        values, vectors = torch.linalg.eigh(second_moment.double())  # ascending
        kept = vectors[:, values.cumsum(0) <= share * values.sum()]
        return (kept @ kept.T).float()
    return per_model(model, ("null_space_projection", identity, share), project).to(second_moment.device)


def null_space_update(keys: torch.Tensor, residual: torch.Tensor, projection: torch.Tensor,
                      previous: torch.Tensor | None, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's closed form for keys K [d_ff, n] and residuals R [d, n]: with P
    the null-space projection and K₀K₀ᵀ the earlier edits' keys (`previous`),
    ΔW = R Xᵀ where X = (P(KKᵀ + K₀K₀ᵀ) + α I)⁻¹ P K, the minimiser of
    ‖ΔW P K − R‖² + ‖ΔW P K₀‖² + α‖ΔW P‖² over updates of the form ΔW P: any key
    k with P k = 0 (the statistics' directions) maps to ΔW k = 0 exactly.
    Returns the factors A = Xᵀ [n, d_ff] and B = R [d, n]."""
    K, P = keys.double(), projection.to(keys.device).double()
    gram = K @ K.T + (previous.to(K.device).double() if previous is not None else 0)
    X = torch.linalg.solve(P @ gram + ridge * torch.eye(len(K), dtype=torch.float64, device=K.device), P @ K)
    return X.T.float(), residual.float()
