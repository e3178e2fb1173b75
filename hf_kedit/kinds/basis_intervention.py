"""`basis_intervention`: ReFT-style edits of a decoder layer's output (the
residual stream) at chosen prompt positions.

Each edit owns, per intervened layer, a rank-r intervention (with
`shared_bases`, every edit of the pack owns one, which acts once)
    Φ(h) = h + Rᵀ[w(h) ⊙ (W h + b − R h)]
with R [r, d] of orthonormal rows, W [r, d] and b [r] (pyreft's
`learned_source`), and a weight per basis direction w(h) ∈ [0, 1]^r:
w ≡ 1 for LoReFT (`gate="none"`), w(h) = sigmoid(G h / RMS(h) + c) for BaFT
(`gate="sigmoid_rms"`, G [r, d], c [r]), read as 0 where it is below the
pack's `gate_floor` (0: never). The paper's gate equation was not
found (docs/methods.md); the gate here reads h divided by
its root mean square, because the residual stream's norm varies by orders of
magnitude (with depth, and at attention-sink tokens) and a gate on the raw h
would have to learn that scale before it could learn where to open. Several interventions on one layer add their
updates, each computed from the same h, in one forward hook per layer; with
no pack left the hooks are gone, so removal is bit-exact.

Positions follow pyreft: "f{n}+l{m}" (or "f{n}", "l{m}") is the first n and
the last m *prompt* tokens of each row (padding skipped; a position in both
sets is intervened once); "all" is every prompt token, for BaFT edits whose
gates open at their subject's token and nowhere else. What the prompt is:
- a forward call over an empty KV cache is the prompt, all its real tokens;
  a call that continues a cache (generation's one-token steps) is not
  intervened, as pyreft's `intervene_on_prompt=True`. Cached generation thus
  equals recomputing each step uncached inside `prompt_lengths(model,
  [prompt length])`; `generate(use_cache=False)` sees every step as a new
  prompt and is not that;
- inside `prompt_lengths(model, lengths)` row i's prompt is its first
  lengths[i] real tokens and the rest a continuation (teacher-forced scoring
  and training read prompt + answer in one call).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..anatomy import anatomy_of, hidden_states
from ..errors import AnatomyError, IncompatiblePackError, KeditError, PackFormatError
from .hooked_runtime import HookedRuntime
from .kind_config import KindConfig, check_owned
from .prompt_calls import hidden_size

PEFT_TYPES = {"LOREFT": "none", "BAFT": "sigmoid_rms"}  # peft_type -> the gate it uses
RMS_EPS = 1e-6
COMPONENTS = ("block_output",)
POSITIONS = re.compile(r"f(\d+)(?:\+l(\d+))?|l(\d+)")  # matched whole (fullmatch)
EVERY_PROMPT_TOKEN = (0, 1 << 30)  # "all": more last tokens than any prompt has
PARTS = ("rotation", "source.weight", "source.bias")
SHARED_OWNER = "bases"  # the owner in the tensor names of a shared_bases pack's one intervention
FIELDS = ("R", "W", "b", "G", "c", "gated", "floor")  # the tensors of `Interventions`, in order
GATE_PARTS = ("gate.weight", "gate.bias")
# |R Rᵀ − I| allowed per entry: R is saved in float32 by the methods; a half-precision copy rounds more.
ORTHONORMAL_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def parse_positions(spec, error: type[Exception] = PackFormatError) -> tuple[int, int]:
    """(first n, last m) from pyreft's "f{n}+l{m}", "f{n}" or "l{m}", or "all" (every
    prompt token: for gated interventions, whose gates pick the tokens); `error` otherwise.

    Example:
        >>> parse_positions("f1+l2")
        (1, 2)
    """
    if spec == "all":
        return EVERY_PROMPT_TOKEN
    match = POSITIONS.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        raise error(f"positions={spec!r} does not parse: write \"f{{n}}+l{{m}}\" (the first n and last m prompt "
                    "tokens), \"f{n}\" or \"l{m}\", e.g. \"l1\" or \"f1+l1\", or \"all\" (every prompt token)")
    digits = [g for g in match.groups() if g]
    if any(len(g) > 10 or int(g) > EVERY_PROMPT_TOKEN[1] for g in digits):
        raise error(f"positions={spec!r}: a count of tokens above {EVERY_PROMPT_TOKEN[1]} is no prompt's; "
                    "write \"all\" for every prompt token")
    first, last = int(match.group(1) or 0), int(match.group(2) or match.group(3) or 0)
    if first + last == 0:
        raise error(f"positions={spec!r} selects no token: n + m must be at least 1")
    return first, last


def intervention_delta(h: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                       gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                       ) -> torch.Tensor:
    """Rᵀ[w(h) ⊙ (W h + b − R h)] for rows h [..., d]: what the interventions add.
    `gate` = (G, c, gated, floor): w = `gate_weights(h, G, c)` on the rows where `gated`,
    0 where that is below the row's `floor`, 1 on the other rows; None: w ≡ 1 (LoReFT).

    Example:
        >>> phi = h + intervention_delta(h, R, W, b)          # LoReFT's Φ(h)
    """
    source = h @ W.T + b - h @ R.T
    if gate is not None:
        G, c, gated, floor = gate
        w = gate_weights(h, G, c)
        source = source * torch.where(gated, torch.where(w >= floor, w, torch.zeros_like(w)), torch.ones_like(c))
    return source @ R


def gate_logits(h: torch.Tensor, G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """BaFT's gate before its sigmoid, G ĥ + c [..., r], ĥ = h / RMS(h): the gate
    reads the direction of h, not its norm, which grows with depth and is extreme
    at attention-sink tokens."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS) @ G.T + c


def gate_weights(h: torch.Tensor, G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """BaFT's w(h) = sigmoid(`gate_logits`) [..., r]."""
    return torch.sigmoid(gate_logits(h, G, c))


def part_name(edit_id: str, layer: int, part: str) -> str:
    """The tensor name of an edit's `part` ("rotation", "source.weight", ...) at `layer`."""
    return f"{edit_id}.layers.{layer}.{part}"


@dataclass
class BasisInterventionConfig(KindConfig):
    """A `basis_intervention` pack's `kind_config`, in PEFT's config conventions
    (saved as JSON inside kedit_config.json, never as adapter_config.json:
    peft cannot register a third-party `peft_type`, and transformers would load
    such a folder as a PEFT adapter).

    `peft_type` "LOREFT" (gate "none") or "BAFT" (gate "sigmoid_rms"); `r`: the
    rank of each edit's intervention; `layers`: decoder layer indices;
    `positions`: pyreft's "f{n}+l{m}"; `component`: where on the layer
    ("block_output", the residual stream after the layer); `hidden_size`: d;
    `gate_floor`: gates below it act as 0, so that an edit acts where its gate
    is open and not a little everywhere else (0 for LOREFT); `shared_bases`:
    the pack holds one gated intervention of rank r that all its edits own
    together (BaFT's continual setting), so they come off together.

    Example:
        >>> BasisInterventionConfig(peft_type="BAFT", gate="sigmoid_rms", r=4, layers=[12], hidden_size=576).to_dict()
    """

    kind = "basis_intervention"

    peft_type: str = "LOREFT"
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    r: int = 4
    layers: list[int] = field(default_factory=list)
    positions: str = "l1"
    gate: str = "none"
    component: str = "block_output"
    hidden_size: int = 0
    gate_floor: float = 0.0
    shared_bases: bool = False

    def check(self) -> None:
        """`PackFormatError` naming the first field that is wrong."""
        if not isinstance(self.peft_type, str) or PEFT_TYPES.get(self.peft_type) != self.gate:
            raise PackFormatError(f"basis_intervention pack: peft_type {self.peft_type!r} with gate {self.gate!r}; "
                                  f"use one of {[{'peft_type': p, 'gate': g} for p, g in PEFT_TYPES.items()]}")
        if self.task_type != "CAUSAL_LM" or self.component not in COMPONENTS:
            raise PackFormatError(f"basis_intervention pack: task_type must be 'CAUSAL_LM' and component one of "
                                  f"{COMPONENTS}, got {self.task_type!r} and {self.component!r}")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise PackFormatError(f"basis_intervention pack: {name} must be a string or null, "
                                      f"got {getattr(self, name)!r}")
        for name in ("r", "hidden_size"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise PackFormatError(f"basis_intervention pack: {name} must be a positive integer, "
                                      f"got {getattr(self, name)!r}")
        if self.r > self.hidden_size:
            raise PackFormatError(f"basis_intervention pack: rank r={self.r} exceeds hidden_size={self.hidden_size}: "
                                  "R cannot have more orthonormal rows than the hidden size")
        if not isinstance(self.layers, list) or not self.layers or not all(
                type(i) is int and i >= 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise PackFormatError(f"basis_intervention pack: layers must be distinct layer indices, "
                                  f"got {self.layers!r}")
        floor = self.gate_floor
        if type(floor) not in (int, float) or not 0 <= floor < 1 or (floor and self.gate == "none"):
            raise PackFormatError(f"basis_intervention pack: gate_floor must be a number in [0, 1), and 0 without a "
                                  f"gate; got {floor!r} with gate {self.gate!r}")
        if type(self.shared_bases) is not bool or (self.shared_bases and self.gate == "none"):
            raise PackFormatError(f"basis_intervention pack: shared_bases must be true or false, and false without a "
                                  f"gate (shared bases need gates to tell the edits apart); got "
                                  f"{self.shared_bases!r} with gate {self.gate!r}")
        parse_positions(self.positions)


def owner_of(config: BasisInterventionConfig, edit_id: str) -> str:
    """Whose tensors an edit's are: its own, or with `shared_bases` the pack's
    one intervention, which every edit owns (`SHARED_OWNER` in the names)."""
    return SHARED_OWNER if config.shared_bases else edit_id


class BasisIntervention:
    name = "basis_intervention"

    @staticmethod
    def validate(pack) -> None:
        config = BasisInterventionConfig.of(pack)
        parts = PARTS + (GATE_PARTS if config.gate == "sigmoid_rms" else ())
        r, d = config.r, config.hidden_size
        shapes = {"rotation": [r, d], "source.weight": [r, d], "source.bias": [r], "gate.weight": [r, d],
                  "gate.bias": [r]}
        owners = {}
        for edit in pack.edits:
            owner = owner_of(config, edit.id)
            owners.setdefault(owner, edit.id)
            check_owned(edit, {part_name(owner, layer, part) for layer in config.layers
                               for part in parts}, f"{', '.join(parts)} at layers {config.layers}"
                        + (f" (named {SHARED_OWNER!r}: shared_bases)" if config.shared_bases else ""))
        for owner, edit_id in owners.items():  # shared tensors are checked once
            for layer in config.layers:
                for part in parts:
                    t = pack.tensors[part_name(owner, layer, part)]
                    if list(t.shape) != shapes[part]:
                        raise PackFormatError(f"edit {edit_id!r} at layer {layer}: {part} has shape {list(t.shape)}, "
                                              f"expected {shapes[part]} (r={r}, hidden_size={d})")
                R = pack.tensors[part_name(owner, layer, "rotation")]
                error = (R.double() @ R.double().T - torch.eye(r, dtype=torch.float64)).abs().max().item()
                if error > ORTHONORMAL_TOLERANCE[R.dtype]:
                    raise PackFormatError(f"edit {edit_id!r} at layer {layer}: the rows of rotation are not "
                                          f"orthonormal (|R Rᵀ − I| reaches {error:.2g})")

    @staticmethod
    def modules(kind_config: dict, model: nn.Module) -> list[str]:
        """The modules the fingerprint must cover. An intervention reads the residual
        stream, which every earlier weight shapes; the MLP output projection of each
        intervened layer is the witness of those weights."""
        anatomy = anatomy_of(model)
        return sorted(anatomy.mlp_out(layer) for layer in kind_config["layers"])

    @staticmethod
    def check_model(pack, model: nn.Module) -> None:
        config = BasisInterventionConfig.of(pack)
        try:
            anatomy = anatomy_of(model)
        except AnatomyError as e:
            raise IncompatiblePackError(f"the pack intervenes on decoder layers, which hf_kedit cannot find in "
                                        f"this model: {e}") from None
        bad = [layer for layer in config.layers if layer >= anatomy.num_layers]
        if bad:
            raise IncompatiblePackError(f"the pack intervenes on layers {bad}; this model has {anatomy.num_layers} "
                                        f"layers (0 to {anatomy.num_layers - 1})")
        hidden = hidden_size(model)
        if hidden != config.hidden_size:
            raise IncompatiblePackError(f"the pack's interventions act on hidden size {config.hidden_size}; this "
                                        f"model's hidden size is {hidden}")

    class Runtime(HookedRuntime):
        """Every attached basis_intervention pack of one model: one hook per
        intervened layer, and the base model's call hooks (`HookedRuntime`)."""

        kind = "basis_intervention"
        why_unmergeable = "it acts on hidden states at prompt positions"

        def __init__(self, model: nn.Module):
            super().__init__(model)
            self.packs: dict[str, list[Interventions]] = {}
            self.hooks: dict[int, FusedIntervention] = {}

        def put(self, name: str, pack) -> None:
            """Attach `pack` as `name`, or replace the pack of that name in place;
            all or nothing: everything is computed before a hook changes."""
            packs = {**self.packs, name: interventions_of(pack)}
            layers = {i.layer for i in self.packs.get(name, [])} | {i.layer for i in packs[name]}
            self._commit(packs, layers)

        def remove(self, name: str) -> None:
            packs = {n: p for n, p in self.packs.items() if n != name}
            self._commit(packs, {i.layer for i in self.packs[name]})

        def _commit(self, packs: dict[str, list[Interventions]], layers: set[int]) -> None:
            groups = {layer: fuse([i for p in packs.values() for i in p if i.layer == layer]) for layer in layers}
            modules = {layer: self.layers[layer] for layer, g in groups.items() if g and layer not in self.hooks}
            self.packs = packs
            for layer, g in groups.items():
                if not g:
                    hook = self.hooks.pop(layer, None)
                    if hook is not None:
                        hook.handle.remove()
                    continue
                if layer not in self.hooks:
                    self.hooks[layer] = FusedIntervention(self, modules[layer])
                self.hooks[layer].set_groups(g)
            self.watch_calls(bool(self.hooks))


@dataclass
class Interventions:
    """Interventions on one layer at one positions setting, rows concatenated
    over edits (and packs): R, W [k, d], b [k]; G [k, d], c [k], `gated` [k]
    (False rows: w ≡ 1) and `floor` [k] (the pack's gate_floor)."""

    layer: int
    positions: tuple[int, int]
    R: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    G: torch.Tensor
    c: torch.Tensor
    gated: torch.Tensor
    floor: torch.Tensor


def interventions_of(pack) -> list[Interventions]:
    """The pack's interventions, one entry per layer with every edit's rows."""
    config = BasisInterventionConfig.of(pack)
    positions, out = parse_positions(config.positions), []
    owners = list(dict.fromkeys(owner_of(config, e.id) for e in pack.edits))  # a shared intervention acts once
    for layer in config.layers:
        def stacked(part):
            return torch.cat([pack.tensors[part_name(owner, layer, part)].float() for owner in owners])
        R, W, b = (stacked(p) for p in PARTS)
        gated = config.gate == "sigmoid_rms"
        G, c = (stacked(p) for p in GATE_PARTS) if gated else (torch.zeros_like(W), torch.zeros_like(b))
        out.append(Interventions(layer, positions, R, W, b, G, c, torch.full_like(b, gated, dtype=torch.bool),
                                 torch.full_like(b, config.gate_floor)))
    return out


def fuse(interventions: list[Interventions]) -> list[Interventions]:
    """Interventions of one layer grouped by positions, rows concatenated: one group per positions setting."""
    groups = {}
    for i in interventions:
        groups.setdefault(i.positions, []).append(i)
    return [parts[0] if len(parts) == 1 else  # one pack's rows are concatenated already: no copy
            Interventions(parts[0].layer, positions, *(torch.cat([getattr(i, f) for i in parts]) for f in FIELDS))
            for positions, parts in groups.items()]


class FusedIntervention:
    """The forward hook of one decoder layer: h + Σ Rᵀ[w(h) ⊙ (W h + b − R h)] at the
    selected positions. Computed in float32, where W h + b − R h, a difference of
    nearby numbers, keeps its precision; tensors are cast once per device."""

    def __init__(self, runtime, layer: nn.Module):
        self.runtime = runtime
        self.handle = layer.register_forward_hook(self)

    def set_groups(self, groups: list[Interventions]) -> None:
        self.groups, self.cast = groups, {}

    def __call__(self, module, args, output):
        call = self.runtime.call
        if not self.runtime.enabled or call is None or call.continuing:
            return None
        h = hidden_states(output)
        if h.shape[:2] != call.real.shape:
            raise KeditError(f"a decoder layer returned hidden states of shape {list(h.shape)} for an input of "
                             f"shape {list(call.real.shape)}: basis interventions cannot tell the positions apart")
        if h.device not in self.cast:
            self.cast[h.device] = [Interventions(g.layer, g.positions, *(getattr(g, f).to(h.device) for f in
                                                 FIELDS)) for g in self.groups]
        source, edited = h.float(), h
        for g in self.cast[h.device]:
            where = call.selection(g.positions, h.device)
            delta = intervention_delta(source, g.R, g.W, g.b, (g.G, g.c, g.gated, g.floor) if g.gated.any() else None)
            edited = torch.where(where[..., None], (edited.float() + delta).to(h.dtype), edited)
        return (edited, *output[1:]) if isinstance(output, (tuple, list)) else edited
