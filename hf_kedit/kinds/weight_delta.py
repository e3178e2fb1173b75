"""`weight_delta`: low-rank updates ΔW = B A of linear modules.

Each edit owns, per target module, `A` [r, in] and `B` [out, r] (PEFT's
lora_A/lora_B convention, whatever the weight's storage layout); edits trained
together (LoRA's joint fit) own one pair together and come off together. All packs'
factors on one module are concatenated and applied by one forward hook,
y += (x Aᵀ) Bᵀ, or merged into the weight on request; unmerging restores the
saved original matrix, never a subtraction, so it is bit-exact.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from safetensors.torch import save_file

from ..anatomy import is_linear, linear_shape, shared_weights, weight_layout, weight_present
from ..errors import IncompatiblePackError, KeditError, PackFormatError

SUFFIX_A, SUFFIX_B = ".lora_A", ".lora_B"


def factor_names(edit_id: str, module: str) -> tuple[str, str]:
    """The tensor names of an edit's `A` and `B` factors on `module`; edits that
    own factors together find them under the id of the first of them in the pack."""
    return f"{edit_id}.{module}{SUFFIX_A}", f"{edit_id}.{module}{SUFFIX_B}"


def module_entry(model: nn.Module, module: str) -> dict:
    """The `kind_config["modules"]` entry a method records for a target module."""
    m = model.get_submodule(module)
    return {"layout": weight_layout(m), "shape": list(linear_shape(m))}


def check_linear_targets(pack, model: nn.Module) -> None:
    """`IncompatiblePackError` unless every module of `pack.kind_config["modules"]` is a
    linear module of `model` with the recorded layout and (out, in) shape: what both
    kinds that change linear weights (weight_delta, singular_scale) ask of a model."""
    for module, entry in pack.kind_config["modules"].items():
        try:
            m = model.get_submodule(module)
        except AttributeError:
            raise IncompatiblePackError(f"the pack edits {module!r}, which this model "
                                        f"({type(model).__name__}) does not have") from None
        if not is_linear(m):
            raise IncompatiblePackError(f"the pack edits {module!r}, a {type(m).__name__} here: {pack.kind} "
                                        "packs edit linear modules (nn.Linear, GPT-2's Conv1D) only")
        if weight_layout(m) != entry["layout"] or list(linear_shape(m)) != entry["shape"]:
            raise IncompatiblePackError(
                f"{module} is {weight_layout(m)} with (out, in) = {list(linear_shape(m))} here; the pack "
                f"expects {entry['layout']} with {entry['shape']}")


class WeightDelta:
    name = "weight_delta"
    PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")

    @staticmethod
    def validate(pack) -> None:
        modules = pack.kind_config.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise PackFormatError("weight_delta pack: kind_config.modules must map each target module "
                                  "to its layout and (out, in) shape")
        for module, entry in modules.items():
            if not isinstance(entry, dict) or entry.get("layout") not in ("out_in", "in_out") \
                    or not isinstance(entry.get("shape"), list) or len(entry["shape"]) != 2:
                raise PackFormatError(f"weight_delta pack: kind_config.modules[{module!r}] needs layout "
                                      f"'out_in' or 'in_out' and a 2-element shape, got {entry}")
        owners: dict[frozenset, str] = {}
        for edit in pack.edits:
            owned = set(edit.tensors)
            # Edits that own their factors together (trained jointly) find them under the first one's id.
            owner = owners.setdefault(frozenset(owned), edit.id)
            for module in modules:
                a, b = factor_names(owner, module)
                if (a in owned) != (b in owned):
                    raise PackFormatError(f"edit {edit.id!r} has only one of {a!r} and {b!r}")
                if a not in owned:
                    continue
                owned -= {a, b}
                A, B = pack.tensors[a], pack.tensors[b]
                out_f, in_f = modules[module]["shape"]
                if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[1] != in_f or B.shape[0] != out_f:
                    raise PackFormatError(f"edit {edit.id!r} on {module}: A {list(A.shape)} and B {list(B.shape)} "
                                          f"are not factors [r, {in_f}] and [{out_f}, r]")
            if owned:
                raise PackFormatError(f"edit {edit.id!r} owns tensors that are no weight_delta factors of a "
                                      f"declared module: {sorted(owned)}")

    @staticmethod
    def modules(kind_config: dict, model: nn.Module) -> list[str]:
        """The modules the fingerprint must cover: those the pack changes."""
        return sorted(kind_config["modules"])

    @staticmethod
    def check_model(pack, model: nn.Module) -> None:
        check_linear_targets(pack, model)
        for module, (A, B) in factors_by_module(pack).items():
            m = model.get_submodule(module)
            with weight_present(m) as w:
                room = torch.finfo(w.dtype).max - w.abs().max().item()
            # |(B A)_ij| ≤ |B_i| |A_:j| (Cauchy-Schwarz): when that bound fits, ΔW itself need not be computed
            bound = (B.float().norm(dim=1).max() * A.float().norm(dim=0).max()).item()
            size = bound if bound <= room else _delta(m, A, B, torch.device("cpu")).abs().max().item()
            if not size <= room:  # NaN-safe
                raise IncompatiblePackError(f"the pack's change of {module} reaches {size:.3g}: merged into its "
                                            f"{w.dtype} weights it would not stay finite (room: {room:.3g})")

    @staticmethod
    def export_peft(pack, out_dir: str | Path, rank: int | None = None, share: float | None = None) -> None:
        """Write `pack` as a PEFT LoRA adapter folder that the engines serving PEFT
        adapters read as PEFT does: one rank r for every module with lora_alpha = r
        (scaling 1; vLLM and TGI read no rank_pattern), and factors for every layer
        of each edited module type (TGI drops a type that some layer lacks), zero
        where the pack does not edit that layer (docs/serving.md). `rank`/`share`:
        `compacted` factors."""
        factors = served_factors(pack, export_factors(pack, rank, share))
        layouts = {entry["layout"] for entry in pack.kind_config["modules"].values()}
        if len(layouts) > 1:
            raise KeditError("PEFT needs one fan_in_fan_out setting: this pack mixes Conv1D and Linear targets")
        r = next(iter(factors.values()))[0].shape[0]
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": pack.base_model.get("name_or_path") or None,
            "revision": pack.base_model.get("revision"),
            "r": r, "lora_alpha": r, "rank_pattern": {}, "alpha_pattern": {},
            "target_modules": sorted(factors), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": layouts == {"in_out"}, "inference_mode": True,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        }
        tensors = {}
        for m, (A, B) in factors.items():
            tensors[f"base_model.model.{m}.lora_A.weight"] = A.contiguous().clone()
            tensors[f"base_model.model.{m}.lora_B.weight"] = B.contiguous().clone()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config_name, weights_name = WeightDelta.PEFT_FILES
        save_file(tensors, str(out / weights_name), metadata={"format": "pt"})
        (out / config_name).write_text(json.dumps(config, indent=2))

    class Runtime:
        """Every attached weight_delta pack of one model, one fused hook per module."""

        def __init__(self, model: nn.Module):
            self.model = model
            self.enabled = True
            self.packs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
            self.merged: set[str] = set()
            self.hooks: dict[str, FusedDelta] = {}
            self.originals: dict[str, torch.Tensor] = {}

        def put(self, name: str, pack) -> None:
            """Attach `pack` as `name`, or replace the pack of that name in place."""
            factors = self.factors_of(pack)
            old = self.packs.get(name)
            self.packs[name] = factors
            try:
                self._refresh(set(old or {}) | set(factors))
            except Exception:  # no hook changed: `_refresh` computes everything before it touches one
                if old is None:
                    del self.packs[name]
                else:
                    self.packs[name] = old
                raise

        def factors_of(self, pack) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            """What `pack` adds to each module, as factors (A [r, in], B [out, r])."""
            return factors_by_module(pack)

        @staticmethod
        def fused(live: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
            """The live packs' factors of one module as one pair: concatenated along the rank."""
            return torch.cat([a for a, _ in live], 0), torch.cat([b for _, b in live], 1)

        def remove(self, name: str) -> None:
            if name in self.merged:
                self.unmerge(name)
            self._refresh(set(self.packs.pop(name)))

        def merge(self, name: str) -> None:
            """Write pack `name` into the weights; every module is checked, and its new
            weight computed, before the first is written, so a refused merge changes nothing."""
            modules = {module: self.model.get_submodule(module) for module in self.packs[name]}
            offloaded = [n for n, m in modules.items() if m.weight.device.type == "meta"]
            if offloaded:
                raise KeditError(f"cannot merge into {offloaded}: their weights are offloaded by accelerate; "
                                 "keep the pack hooked (merge=False)")
            shared = {n: others for n, others in shared_weights(self.model).items() if n in modules}
            if shared:
                module, others = next(iter(shared.items()))
                raise KeditError(f"cannot merge into {module}: its weight is tied to {others} (one parameter), so "
                                 "merging would change those too; keep the pack hooked (merge=False)")
            merged = {n: _merged_weight(m, *self.packs[name][n]) for n, m in modules.items()}
            overflow = [n for n, w in merged.items() if not torch.isfinite(w).all()]
            if overflow:
                raise KeditError(f"merging pack {name!r} would make the weights of {overflow} overflow their dtype; "
                                 "keep it hooked (merge=False)")
            for module, m in modules.items():
                self.originals.setdefault(module, m.weight.detach().clone())
                with torch.no_grad():
                    m.weight.copy_(merged[module])
            self.merged.add(name)
            self._refresh(set(self.packs[name]))

        def unmerge(self, name: str) -> None:
            self.merged.discard(name)
            for module in self.packs[name]:
                m = self.model.get_submodule(module)
                with torch.no_grad():
                    m.weight.copy_(self.originals[module])
                still = [n for n in self.packs if n in self.merged and module in self.packs[n]]
                for other in still:
                    with torch.no_grad():
                        m.weight.copy_(_merged_weight(m, *self.packs[other][module]))
                if not still:
                    del self.originals[module]
            self._refresh(set(self.packs[name]))

        def _refresh(self, modules: set[str]) -> None:
            """Give the hooks of `modules` their live factors; every module is looked up
            before a hook changes."""
            live = {module: [self.packs[n][module] for n in self.packs if n not in self.merged and module in self.packs[n]]
                    for module in modules}
            targets = {m: self.model.get_submodule(m) for m, pairs in live.items() if pairs and m not in self.hooks}
            for module, pairs in live.items():
                if not pairs:
                    hook = self.hooks.pop(module, None)
                    if hook is not None:
                        hook.handle.remove()
                    continue
                if module not in self.hooks:
                    self.hooks[module] = FusedDelta(self, targets[module])
                self.hooks[module].set_live(pairs)


def low_rank_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(x Aᵀ) Bᵀ: what factors (A, B) add to a module's output for input x."""
    return F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))


@contextmanager
def deltas_applied(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Run `model` with each named module's output plus its low-rank delta, for the
    block only: methods that compute on an edited model without changing it."""
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, args, out, A=A, B=B: out + low_rank_delta(args[0], A, B)) for name, (A, B) in factors.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


class FusedDelta:
    """The forward hook adding (x Aᵀ) Bᵀ for all live factors of one module, fused
    into one pair on the first call after they change: attaching a hundred packs
    in a row concatenates their factors once, not once per pack. The pair is cast
    once per (device, dtype) the module runs on, so the hook follows accelerate's
    dispatch and the model's dtype."""

    def __init__(self, runtime, module: nn.Module):
        self.runtime = runtime
        self.handle = module.register_forward_hook(self)

    def set_live(self, live: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.live, self.pair, self.cast = live, None, {}

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]): the live factors as one pair (`Runtime.fused`)."""
        if self.pair is None:
            self.pair = self.runtime.fused(self.live)
        return self.pair

    def __call__(self, module, args, output):
        if not self.runtime.enabled:
            return None
        key = (output.device, output.dtype)
        if key not in self.cast:
            self.cast[key] = tuple(t.to(*key) for t in self.factors)
        A, B = self.cast[key]
        return output + low_rank_delta(args[0].to(*key), A, B)


def factors_by_module(pack) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the pack's factors of all edits concatenated along the rank:
    (A [r, in], B [out, r]), ΔW = B A as a map from inputs to outputs."""
    factors = {}
    for module in pack.kind_config["modules"]:
        pairs = [(pack.tensors[a], pack.tensors[b]) for a, b in
                 (factor_names(e.id, module) for e in pack.edits) if a in pack.tensors]
        if pairs:
            factors[module] = (torch.cat([a for a, _ in pairs], 0), torch.cat([b for _, b in pairs], 1))
    return factors


LAYER_INDEX = re.compile(r"\.(\d+)\.")


def export_factors(pack, rank: int | None = None, share: float | None = None) -> dict:
    """The pack's factors per module for an export: as they are, or `compacted`."""
    factors = factors_by_module(pack)
    return factors if rank is None and share is None else compacted(factors, rank, share)


def compacted(factors: dict, rank: int | None = None, share: float | None = None) -> dict:
    """Each module's ΔW = B A as its best approximation of rank k (truncated SVD,
    B = U_k S_k, A = V_kᵀ): k = `rank`, or the fewest singular values that keep
    `share` of ΔW's squared Frobenius norm; never more than ΔW's own rank. Many
    rank-one edits of one weight become one adapter of a rank an engine serves well.

    Example:
        >>> compacted(factors_by_module(pack), share=0.99)
    """
    if (rank is None) == (share is None):
        raise KeditError(f"rank={rank!r}, share={share!r}: give one of them, a rank k or the share of each change "
                         "to keep")
    if rank is not None and not (type(rank) is int and rank >= 1):
        raise KeditError(f"rank={rank!r}: give a positive integer")
    if share is not None and not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise KeditError(f"share={share!r}: give a number in (0, 1], the share of each change's squared norm to keep")
    out = {}
    for module, (A, B) in factors.items():
        U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
        kept = int((S > S[0] * 1e-12).sum()) if len(S) and S[0] > 0 else 1  # ΔW's own rank
        if share is not None:
            cumulative = (S ** 2).cumsum(0) / (S ** 2).sum().clamp_min(1e-300)
            kept = min(kept, int((cumulative < share - 1e-12).sum()) + 1)
        k = max(1, min(kept, rank if rank is not None else kept))
        out[module] = (Vh[:k].to(A.dtype).contiguous(), (U[:, :k] * S[:k]).to(B.dtype).contiguous())
    return out


def served_factors(pack, factors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`factors` (per module of `pack`) as serving engines take them: every module at
    the largest rank (zero rows of A, zero columns of B: ΔW unchanged), and every
    layer of each edited module type (`model.layers.{i}.mlp.down_proj` for every
    i < the model's layer count), with zero factors where the pack does not edit it."""
    r = max(A.shape[0] for A, _ in factors.values())
    layers = pack.base_model.get("num_hidden_layers")
    served = {}
    for module, (A, B) in factors.items():
        found = LAYER_INDEX.search(module)
        names = ([module[:found.start(1)] + str(i) + module[found.end(1):] for i in range(layers)]
                 if found and type(layers) is int and int(found.group(1)) < layers else [module])
        out_f, in_f = pack.kind_config["modules"][module]["shape"]
        for name in names:
            served.setdefault(name, (A.new_zeros(r, in_f), B.new_zeros(out_f, r)))
        served[module] = (torch.cat([A, A.new_zeros(r - A.shape[0], in_f)]),
                          torch.cat([B, B.new_zeros(out_f, r - B.shape[1])], 1))
    return dict(sorted(served.items()))


def _delta(module: nn.Module, A: torch.Tensor, B: torch.Tensor, device) -> torch.Tensor:
    """ΔW = B A in float32, laid out as `module.weight` is stored."""
    delta = B.to(device, torch.float32) @ A.to(device, torch.float32)
    return delta.T if weight_layout(module) == "in_out" else delta


@torch.no_grad()
def _merged_weight(module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The module's weight plus B A, in the weight's dtype (inf where that overflows)."""
    w = module.weight
    return (w.float() + _delta(module, A, B, w.device)).to(w.dtype)
