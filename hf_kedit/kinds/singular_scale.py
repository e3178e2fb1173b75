"""`singular_scale`: Transformer²'s singular-value experts (SVF).

With a weight's SVD W = U diag(S) Vᵀ, an edit owns one vector z per chosen
weight, and the adapted weight is U diag(S ⊙ z) Vᵀ. A pack stores only the z
(and each edit's mix weight w); at attach the runtime decomposes each weight
once and adds W's change through the `weight_delta` hook, as factors
A = Vᵀ, B = U diag(S ⊙ Σ w_e (z_e − 1)). So every edit on one weight, of one
pack or of several, composes by one rule: z = 1 + Σ_e w_e (z_e − 1). With
weights that sum to one that is Transformer²'s weighted mix of experts,
Σ_e w_e z_e (`mix_experts`); with every w = 1, independent edits add up.

A decomposition is only meaningful on the weights it was computed from, so
the pack records each weight's spectrum (16 of its singular values) and a
weight whose spectrum differs is refused before anything attaches.
"""
from __future__ import annotations

import math
from weakref import WeakKeyDictionary

import torch
from torch import nn

from ..anatomy import linear_shape, weight_layout, weight_present
from ..errors import IncompatiblePackError, PackFormatError
from .weight_delta import WeightDelta, check_linear_targets

SUFFIX_Z = ".svf_z"
MIX_WEIGHT = "mix_weight"
MIX_RULE = "1 + sum_e w_e (z_e - 1)"
SPECTRUM_POINTS = 16
# Relative to the largest singular value: bf16 rounding of the same weights moves
# the spectrum by well under this, another model's weights by far more.
SPECTRUM_TOLERANCE = 1e-2


def z_name(edit_id: str, module: str) -> str:
    """The tensor name of an edit's z on `module`."""
    return f"{edit_id}.{module}{SUFFIX_Z}"


def mix_weight_name(edit_id: str) -> str:
    """The tensor name of an edit's mix weight w (shape [1])."""
    return f"{edit_id}.{MIX_WEIGHT}"


def weight_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (the module's, stored as it stores it) as the (out, in) map W."""
    return weight.T if weight_layout(module) == "in_out" else weight


def singular_decomposition(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [out, k], S [k], Vᵀ [k, in]) of the (out, in) `matrix`, computed in float64
    on the CPU and returned as float32: the same numbers for the method that trains
    z and for the runtime that applies it, whatever the model's dtype and device."""
    U, S, Vh = torch.linalg.svd(matrix.detach().to("cpu", torch.float64), full_matrices=False)
    return U.float().contiguous(), S.float().contiguous(), Vh.float().contiguous()


# Per model, module name -> (what the weight was, its decomposition). An SVD costs
# more than many forward passes, and a method and the runtime that attaches its
# packs would otherwise each pay it for every weight, every time.
_DECOMPOSED: WeakKeyDictionary = WeakKeyDictionary()


def decomposition(model: nn.Module, module: str, weight: torch.Tensor | None = None):
    """(U, S, Vᵀ) of `module`'s weight (or of `weight`, stored as the module stores
    its own), computed once per model and weight: again only if the weight is
    another tensor or holds other values (two checksums of them say so).
    The cache holds U and Vᵀ of every weight decomposed while the model lives.

    Example:
        >>> U, S, Vh = decomposition(model, "model.layers.5.mlp.down_proj")
    """
    m = model.get_submodule(module)
    with weight_present(m, weight) as w:
        values = w.detach().double().flatten()
        # What the weight holds, not how often it was written: a merge and its bit-exact unmerge leave it as it was.
        seen = (w.data_ptr(), w.dtype, tuple(w.shape), float(values.sum()),
                float(values @ torch.linspace(1, 2, len(values), dtype=torch.float64, device=values.device)))
        cache = _DECOMPOSED.setdefault(model, {})
        if module not in cache or cache[module][0] != seen:
            cache[module] = (seen, singular_decomposition(weight_matrix(m, w)))
        return cache[module][1]


def spectrum(S: torch.Tensor) -> list[float]:
    """The singular values a pack records: `SPECTRUM_POINTS` of them, evenly spaced from the largest."""
    at = torch.linspace(0, len(S) - 1, min(SPECTRUM_POINTS, len(S))).round().long()
    return [float(f"{v:.6g}") for v in S[at].tolist()]


def module_entry(model: nn.Module, module: str, S: torch.Tensor) -> dict:
    """The `kind_config["modules"]` entry for a weight decomposed with singular values `S`."""
    m = model.get_submodule(module)
    return {"layout": weight_layout(m), "shape": list(linear_shape(m)), "spectrum": spectrum(S)}


def mix_experts(packs: list, weights: list[float]):
    """One pack of Transformer²'s experts: each pack's edits with their mix weights
    multiplied by its weight, so that a weight they share becomes
    U diag(S ⊙ Σ_k α_k z_k) Vᵀ when the α sum to one. Edit ids must differ.

    Example:
        >>> mixed = mix_experts([capitals, languages], [0.5, 0.5])
        >>> load_edits(model, mixed)
    """
    if not packs or len(packs) != len(weights):
        raise IncompatiblePackError(f"give one weight per pack: {len(packs)} packs, {len(weights)} weights")
    if any(p.kind != SingularScale.name for p in packs):
        raise IncompatiblePackError(f"only {SingularScale.name} packs mix: got {sorted({p.kind for p in packs})}")
    if not all(isinstance(a, (int, float)) and math.isfinite(a) for a in weights):
        raise IncompatiblePackError(f"weights={weights!r}: give finite numbers")
    mixed = None
    for pack, alpha in zip(packs, weights):
        tensors = {**pack.tensors, **{mix_weight_name(e.id): pack.tensors[mix_weight_name(e.id)] * alpha
                                      for e in pack.edits}}
        scaled = type(pack)(pack.kind, pack.method, pack.edits, tensors, pack.base_model, pack.hyperparameters,
                            pack.kind_config)
        mixed = scaled if mixed is None else mixed.extend(scaled)
    return mixed


class SingularScale:
    name = "singular_scale"

    @staticmethod
    def validate(pack) -> None:
        config = pack.kind_config
        modules = config.get("modules")
        if set(config) != {"modules", "mix"} or config.get("mix") != MIX_RULE:
            raise PackFormatError(f"singular_scale pack: kind_config must hold exactly 'modules' and 'mix' = "
                                  f"{MIX_RULE!r}, got keys {sorted(config)}")
        if not isinstance(modules, dict) or not modules:
            raise PackFormatError("singular_scale pack: kind_config.modules must map each target module to its "
                                  "layout, (out, in) shape and spectrum")
        for module, entry in modules.items():
            shape, points = entry.get("shape") if isinstance(entry, dict) else None, \
                entry.get("spectrum") if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or set(entry) != {"layout", "shape", "spectrum"} \
                    or entry["layout"] not in ("out_in", "in_out") or not isinstance(shape, list) or len(shape) != 2 \
                    or not all(type(n) is int and n > 0 for n in shape) or not isinstance(points, list) \
                    or not 0 < len(points) <= min(shape) \
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in points):
                raise PackFormatError(f"singular_scale pack: kind_config.modules[{module!r}] needs layout 'out_in' "
                                      "or 'in_out', a shape of two positive integers and a spectrum of up to "
                                      f"min(shape) finite singular values, got {entry}")
        for edit in pack.edits:
            owned = set(edit.tensors)
            w = mix_weight_name(edit.id)
            if w not in owned or tuple(pack.tensors[w].shape) != (1,):
                raise PackFormatError(f"edit {edit.id!r} needs its mix weight {w!r}, a tensor of shape [1]")
            owned.discard(w)
            zs = [m for m in modules if z_name(edit.id, m) in owned]
            if not zs:
                raise PackFormatError(f"edit {edit.id!r} holds no z of a declared module")
            for module in zs:
                z, k = pack.tensors[z_name(edit.id, module)], min(modules[module]["shape"])
                if tuple(z.shape) != (k,):
                    raise PackFormatError(f"edit {edit.id!r} on {module}: z has shape {list(z.shape)}, not [{k}] "
                                          "(one scale per singular value)")
                owned.discard(z_name(edit.id, module))
            if owned:
                raise PackFormatError(f"edit {edit.id!r} owns tensors that are no singular_scale tensors of a "
                                      f"declared module: {sorted(owned)}")

    @staticmethod
    def modules(kind_config: dict, model: nn.Module) -> list[str]:
        """The modules the fingerprint must cover: those the pack changes."""
        return sorted(kind_config["modules"])

    @staticmethod
    def check_model(pack, model: nn.Module) -> None:
        """Shapes only: the spectrum is checked at attach (`Runtime.put`), against the
        weights as they were before any merged pack changed them."""
        check_linear_targets(pack, model)

    class Runtime(WeightDelta.Runtime):
        """Every attached singular_scale pack of one model: weight_delta's fused hooks,
        merge and bit-exact unmerge, with each pack's factors made from the weights'
        decompositions (`decomposition`: one SVD per weight and model)."""

        def factors_of(self, pack) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            factors = {}
            for module, entry in pack.kind_config["modules"].items():
                # The weight as it was before merged packs changed it: what every pack's z scale.
                U, S, Vh = decomposition(self.model, module, self.originals.get(module))
                recorded = torch.tensor(entry["spectrum"])
                here = torch.tensor(spectrum(S))
                if len(here) != len(recorded) or not (here - recorded).abs().max() <= SPECTRUM_TOLERANCE * recorded[0]:
                    raise IncompatiblePackError(
                        f"{module}'s singular values here ({here[:3].tolist()}, ...) are not those the pack's z were "
                        f"trained on ({recorded[:3].tolist()}, ...): the pack was made on other weights (unmerge any "
                        "other pack merged into them, or remake the pack on this model)")
                offsets = torch.zeros_like(S)
                for e in pack.edits:
                    name = z_name(e.id, module)
                    if name in pack.tensors:
                        offsets += pack.tensors[mix_weight_name(e.id)].float() * (pack.tensors[name].float() - 1)
                factors[module] = (Vh, U * (S * offsets))
            return factors

        @staticmethod
        def fused(live):
            """Packs on one weight share its Vᵀ: their B add up, so the hook's rank stays k."""
            if all(a is live[0][0] for a, _ in live):
                return live[0][0], torch.stack([b for _, b in live]).sum(0)
            return WeightDelta.Runtime.fused(live)
