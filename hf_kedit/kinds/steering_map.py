"""`steering_map`: per-edit affine maps of the last hidden state (the final
norm's output, what the LM head reads), chosen per prompt by a scope router
(methods `sake` and `actadd`).

Each edit owns a map h ↦ h (I + U M Uᵀ) + b (U [d, k] orthonormal columns,
M [k, k], b [d]; k = 0 is ActAdd's pure shift) and a scope: a centroid of its
prompts' router representations and a threshold. The router representation
(per pack) is the model's own hidden state at the last prompt token, after
the final norm (`"final_norm"`) or after decoder layer `layer` (`"layer"`), or
the prompt's text embedded by a sentence-embedding model named in the pack
(`"sentence_embedding"`, see `sentence_embedding.py`), measured by `metric`:
`"cosine"` distance 1 − cos (threshold in (0, 2]) or `"euclidean"` distance
(threshold > 0). With `subject_gate`, a prompt can only be in the scope of an
edit whose subject it names (case-insensitive substring of the decoded
prompt): an edit is about its subject, and prompts about other subjects that
share the relation's wording are the ones a distance confuses most. A prompt is
in an edit's scope when it passes the gate and its distance is at most the
edit's threshold; of the edits in scope the router
picks the one nearest relative to its threshold (distance / threshold: the
nearest centroid when thresholds agree, and comparable across metrics), and
applies that edit's map. Prompts in no scope are left bit-identical.

One router serves every attached steering edit: all distances of a forward
call are one batched product per (representation, metric) group, the chosen
maps are applied on the final norm's output at the selected positions, and
the number of hooks does not grow with the number of edits. Routers that read
the prompt's text (sentence embeddings, the subject gate) need the model's
tokenizer: `load_edits(model, pack, tokenizer=tokenizer)`.

When the map applies (`apply`, per pack): `"first"` (default) steers only the
state that predicts the first new token, as the SAKE paper scores it: the
map was fitted on states that predict the object's first token, and later
states lie outside its source distribution; the steered first token then
conditions the rest of the answer through the ordinary model. `"every"`
steers the routed edit's map at every generated step (the scope is decided
once, on the prompt). A forward call over an empty KV cache is the prompt
(its last real token, or the last of `prompt_lengths(...)` tokens for
teacher-forced scoring); a call continuing a cache continues the latest
prompt call's routing.

A pack with a `site` (a decoder layer index K) is uniform instead: every
prompt is in its edits' scope (cosine metric, threshold 2.0, no subject
gate, apply "every"), and each edit's map acts on decoder layer K's output at
every position of every forward call, prompt tokens included, without a
router; the maps of all such edits at one layer act one after the other (for
pure shifts, their sum). That is where and how llama.cpp adds a control
vector, so a uniform pack of shifts exports to one (`EditPack.export_gguf`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy import anatomy_of, hidden_states
from ..errors import AnatomyError, IncompatiblePackError, KeditError, PackFormatError
from .hooked_runtime import HookedRuntime
from .kind_config import KindConfig, check_owned
from .prompt_calls import hidden_size, tokenizer_of
from .sentence_embedding import EMBEDDING_MODELS, check_installed, embed

REPRESENTATIONS = ("final_norm", "layer", "sentence_embedding")
DISTANCES = ("cosine", "euclidean")
APPLY = ("first", "every")
PARTS = ("map.basis", "map.core", "map.bias", "scope.centroid", "scope.threshold")


def part_name(edit_id: str, part: str) -> str:
    """The tensor name of an edit's `part` ("map.basis", "scope.threshold", ...)."""
    return f"{edit_id}.{part}"


def mapped(h: torch.Tensor, basis: torch.Tensor, core: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h (I + U M Uᵀ) + b for rows h [..., d]: an edit's map.

    Example:
        >>> steered = mapped(h, U, M, b)      # equals h @ (I + U @ M @ U.T) + b
    """
    return h + (h @ basis) @ core @ basis.T + bias


def scope_distances(queries: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """[B, E] distances of router representations [B, r] to centroids [E, r]:
    1 − cosine similarity, or Euclidean distance."""
    if metric == "cosine":
        return 1 - nn.functional.normalize(queries, dim=-1) @ nn.functional.normalize(centroids, dim=-1).T
    return torch.cdist(queries, centroids, compute_mode="donot_use_mm_for_euclid_dist")


def names_subject(prompts: list[str], subjects) -> torch.Tensor:
    """[B, E] bool: prompt b names subject e, the subject gate: the subject occurs in
    it (case-insensitive) and not inside a longer word ("Tizen" is not named by
    "citizenship").

    Example:
        >>> names_subject(["The Eiffel Tower's height is"], ["eiffel tower", "tower", "eiffel t"])
        tensor([[ True,  True, False]])
    """
    lowered = [p.lower() for p in prompts]
    keys = [s.strip().lower() for s in subjects]
    return torch.tensor([[s in p and _names(p, s) for s in keys] for p in lowered], dtype=torch.bool).reshape(
        len(prompts), len(subjects))


def _names(text: str, subject: str) -> bool:
    """`subject` occurs in `text` at least once with a word boundary at both ends."""
    start = text.find(subject) if subject else -1
    while start >= 0:
        end = start + len(subject)
        if not (_joined(text, start - 1, subject[0]) or _joined(text, end, subject[-1])):
            return True
        start = text.find(subject, start + 1)
    return False


def _joined(text: str, i: int, edge: str) -> bool:
    """The character at `i` continues the word that the subject's `edge` character is part of."""
    return 0 <= i < len(text) and _in_word(text[i]) and _in_word(edge)


def _in_word(c: str) -> bool:
    # Scripts written without spaces between words (Thai to Myanmar, CJK, kana, Hangul with its attached
    # particles) have no boundary to check: a subject there is named wherever it occurs.
    return c.isalnum() and not (0x0E00 <= ord(c) <= 0x109F or 0x1780 <= ord(c) <= 0x17FF or ord(c) >= 0x2E80)


@dataclass
class SteeringMapConfig(KindConfig):
    """A `steering_map` pack's `kind_config`.

    `hidden_size`: d; `representation`: what the router measures ("final_norm",
    "layer" with `layer`, or "sentence_embedding" with `embedding_model`);
    `scope_size`: the width of that representation (the centroids'); `metric`:
    "cosine" or "euclidean"; `apply`: "first" or "every"; `subject_gate`: only
    prompts naming an edit's subject can be in its scope; `site`: None (the maps
    act on the final norm's output of routed prompts) or the decoder layer
    whose output a uniform pack's maps act on at every position (see the module doc).

    Example:
        >>> SteeringMapConfig(hidden_size=576, scope_size=576).to_dict()["apply"]
        'first'
    """

    kind = "steering_map"

    hidden_size: int = 0
    representation: str = "final_norm"
    layer: int | None = None
    embedding_model: str | None = None
    scope_size: int = 0
    metric: str = "cosine"
    apply: str = "first"
    subject_gate: bool = False
    site: int | None = None

    def check(self) -> None:
        """`PackFormatError` naming the first field that is wrong."""
        for name, allowed in (("representation", REPRESENTATIONS), ("metric", DISTANCES), ("apply", APPLY)):
            if getattr(self, name) not in allowed:
                raise PackFormatError(f"steering_map pack: {name}={getattr(self, name)!r}; use one of {allowed}")
        for name in ("hidden_size", "scope_size"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise PackFormatError(f"steering_map pack: {name} must be a positive integer, "
                                      f"got {getattr(self, name)!r}")
        if self.representation == "layer" and not (type(self.layer) is int and self.layer >= 0):
            raise PackFormatError(f"steering_map pack: layer={self.layer!r} with representation 'layer'; give the "
                                  "index of the decoder layer the router reads (an integer from 0)")
        if self.representation != "layer" and self.layer is not None:
            raise PackFormatError(f"steering_map pack: layer={self.layer!r} with representation "
                                  f"{self.representation!r}; a layer index goes with 'layer' only (else null)")
        if self.representation == "sentence_embedding" and not (
                isinstance(self.embedding_model, str) and self.embedding_model in EMBEDDING_MODELS):
            raise PackFormatError(f"steering_map pack: router embedding_model {self.embedding_model!r} is unknown; "
                                  f"known: {sorted(EMBEDDING_MODELS)}")
        if self.representation != "sentence_embedding" and self.embedding_model is not None:
            raise PackFormatError(f"steering_map pack: embedding_model={self.embedding_model!r} with "
                                  f"representation {self.representation!r}; a model goes with 'sentence_embedding' "
                                  "only (else null)")
        width = EMBEDDING_MODELS[self.embedding_model][2] if self.embedding_model else self.hidden_size
        if self.scope_size != width:
            raise PackFormatError(f"steering_map pack: its router measures vectors of width {width}, but "
                                  f"scope_size={self.scope_size}")
        if type(self.subject_gate) is not bool:
            raise PackFormatError(f"steering_map pack: subject_gate must be true or false, got {self.subject_gate!r}")
        if self.site is not None:
            if not (type(self.site) is int and self.site >= 0):
                raise PackFormatError(f"steering_map pack: site={self.site!r}; give the index of the decoder layer "
                                      "whose output the maps act on (an integer from 0), or null for the final norm")
            if self.subject_gate or self.apply != "every" or self.metric != "cosine" or \
                    self.representation != "final_norm":
                raise PackFormatError(f"steering_map pack: site={self.site} makes a uniform pack, which acts on every "
                                      f"prompt at every position; it needs subject_gate false, apply 'every', metric "
                                      f"'cosine' and representation 'final_norm' (got {self.subject_gate!r}, "
                                      f"{self.apply!r}, {self.metric!r}, {self.representation!r})")

    @property
    def reads_text(self) -> bool:
        """Whether the router reads the prompt's text (and so needs the tokenizer)."""
        return self.subject_gate or self.representation == "sentence_embedding"

    @property
    def source(self) -> int | str | None:
        """What the router measures: None (the final norm), a layer index, or an embedding model id."""
        return self.embedding_model if self.representation == "sentence_embedding" else self.layer


class SteeringMap:
    name = "steering_map"

    @staticmethod
    def validate(pack) -> None:
        config = SteeringMapConfig.of(pack)
        d = config.hidden_size
        for edit in pack.edits:
            check_owned(edit, {part_name(edit.id, part) for part in PARTS}, ", ".join(PARTS))
            t = {part: pack.tensors[part_name(edit.id, part)] for part in PARTS}
            k = t["map.basis"].shape[-1] if t["map.basis"].ndim == 2 else -1  # -1: no shape matches
            shapes = {"map.basis": [d, k if k >= 0 else "k"], "map.core": [k, k], "map.bias": [d],
                      "scope.centroid": [config.scope_size], "scope.threshold": [1]}
            for part, shape in shapes.items():
                if list(t[part].shape) != shape:
                    raise PackFormatError(f"edit {edit.id!r}: {part} has shape {list(t[part].shape)}, expected "
                                          f"{shape} (hidden_size={d}, map rank k={k}, scope_size="
                                          f"{config.scope_size})")
            if k > d:
                raise PackFormatError(f"edit {edit.id!r}: map.basis has {k} columns, more than hidden_size={d}")
            threshold = t["scope.threshold"].item()
            top = 2.0 if config.metric == "cosine" else float("inf")
            if not 0 < threshold <= top:
                raise PackFormatError(f"edit {edit.id!r}: scope.threshold {threshold:.4g} is out of range for the "
                                      f"{config.metric} metric: give a distance in (0, {top:g}]")
            if config.site is not None and threshold != 2.0:
                raise PackFormatError(f"edit {edit.id!r}: scope.threshold {threshold:.4g} in a pack with site="
                                      f"{config.site}: a uniform pack acts on every prompt, so its scope is the "
                                      "whole cosine range, 2.0")

    @staticmethod
    def modules(kind_config: dict, model: nn.Module) -> list[str]:
        """The modules the fingerprint must cover. The map reads the last hidden state,
        which every weight shapes; the final norm and the last layer's MLP output
        projection are the witnesses."""
        anatomy = anatomy_of(model)
        return sorted([anatomy.final_norm, anatomy.mlp_out(anatomy.num_layers - 1)])

    @staticmethod
    def check_model(pack, model: nn.Module) -> None:
        config = SteeringMapConfig.of(pack)
        if config.representation == "sentence_embedding":
            check_installed(config.embedding_model)
        if config.reads_text and tokenizer_of(model) is None:
            raise IncompatiblePackError("the pack's steering router reads the prompt's text (a sentence-embedding "
                                        "router or the subject gate), so it needs the model's tokenizer: "
                                        "load_edits(model, pack, tokenizer=tokenizer)")
        try:
            anatomy = anatomy_of(model)
        except AnatomyError as e:
            raise IncompatiblePackError(f"the pack steers the final norm's output, which hf_kedit cannot find "
                                        f"in this model: {e}") from None
        for what, layer in (("router reads", config.layer), ("maps act on", config.site)):
            if layer is not None and layer >= anatomy.num_layers:
                raise IncompatiblePackError(f"the pack's {what} layer {layer}; this model has "
                                            f"{anatomy.num_layers} layers (0 to {anatomy.num_layers - 1})")
        if hidden_size(model) != config.hidden_size:
            raise IncompatiblePackError(f"the pack's maps act on hidden size {config.hidden_size}; this model's "
                                        f"hidden size is {hidden_size(model)}")

    class Runtime(HookedRuntime):
        """Every attached steering_map pack of one model: the router hook on the final
        norm, a hook per router layer that reads its representation, and the base
        model's call hooks (`HookedRuntime`); for uniform packs, a hook per site
        layer that applies their maps everywhere."""

        kind = "steering_map"
        why_unmergeable = "its maps act on hidden states (the last one of prompts in their scope, or a layer's output)"

        def __init__(self, model: nn.Module):
            super().__init__(model)
            self.norm = model.get_submodule(self.anatomy.final_norm)
            self.packs: dict[str, list[Steering]] = {}
            self.router: Router | None = None
            self.handles: list = []

        def put(self, name: str, pack) -> None:
            """Attach `pack` as `name`, or replace the pack of that name in place;
            all or nothing: everything is computed before a hook changes."""
            self._commit({**self.packs, name: steerings_of(pack)})

        def remove(self, name: str) -> None:
            self._commit({n: p for n, p in self.packs.items() if n != name})

        def _commit(self, packs: dict[str, list[Steering]]) -> None:
            routed = [s for pack in packs.values() for s in pack if s.site is None]
            sites: dict[int, list[Steering]] = {}
            for s in (s for pack in packs.values() for s in pack if s.site is not None):
                sites.setdefault(s.site, []).append(s)
            router = Router(routed) if routed else None
            read = {layer: self.layers[layer] for layer in (router.hidden_layers if router else ())}
            shifts = {site: UniformMaps(steerings) for site, steerings in sites.items()}
            for handle in self.handles:
                handle.remove()
            self.packs, self.router, self.handles = packs, router, []
            self.local = threading.local()  # routings of earlier prompts refer to the old router's edits
            self.watch_calls(router is not None)
            for site, maps in shifts.items():
                self.handles.append(self.layers[site].register_forward_hook(
                    lambda m, args, out, maps=maps: maps(out) if self.enabled else None))
            if router is None:
                return
            self.handles.append(self.norm.register_forward_hook(self._steer))
            for layer, module in read.items():
                self.handles.append(module.register_forward_hook(
                    lambda m, args, out, layer=layer: self._capture(layer, out), prepend=True))

        def _capture(self, layer: int, output) -> None:
            call = self.call
            if self.enabled and call is not None and not call.continuing:
                h = hidden_states(output)
                call.captured[layer] = at_last(h, call.selection((0, 1), h.device))

        def _steer(self, module, args, output):
            call = self.call
            if not self.enabled or call is None:
                return None
            if output.shape[:2] != call.real.shape:
                raise KeditError(f"the final norm returned hidden states of shape {list(output.shape)} for an input "
                                 f"of shape {list(call.real.shape)}: the steering router cannot find the last token")
            router, real = self.router.on(output.device), call.real.to(output.device)
            if call.continuing:  # a generated step: this thread's latest prompt call decided the scope
                routed = getattr(self.local, "routed", None)
                if routed is None:
                    return None
                if routed.shape[0] != output.shape[0]:
                    raise KeditError(f"a generation step of batch size {output.shape[0]} continues a prompt of batch "
                                     f"size {routed.shape[0]}: the steering router cannot tell which row is which")
                where = real & router.every_step(routed)[:, None]
            else:
                last = call.selection((0, 1), output.device)
                texts = call.prompt_texts(tokenizer_of(self.model)) if router.reads_text else None
                queries = {None: at_last(output, last), **call.captured,
                           **{m: embed(m, texts).to(output.device) for m in router.embedding_models}}
                routed = self.local.routed = router.route(queries, texts)
                # after the last prompt token come teacher-forced answer tokens (inside `prompt_lengths`):
                # generated steps, steered where the routed edit applies at every step
                answer = real & (last.long().cumsum(1) > 0) & ~last
                where = (last & (routed >= 0)[:, None]) | (answer & router.every_step(routed)[:, None])
            if not where.any():
                return None
            return router.apply(output, routed, where)


def at_last(h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[B, d] float32: each row of `h` [B, T, d] at its position marked in `last` [B, T]
    (position 0 for a row with none; the router leaves such rows alone)."""
    return h[torch.arange(h.shape[0], device=h.device), last.int().argmax(1)].float()


@dataclass
class Steering:
    """One attached edit: its map (U, M, b), centroid, threshold, and its pack's
    router source (None: final norm, a layer index, or an embedding model id),
    metric, apply mode, with the subject gate the subject, and the site of a
    uniform pack."""

    basis: torch.Tensor
    core: torch.Tensor
    bias: torch.Tensor
    centroid: torch.Tensor
    threshold: float
    source: int | str | None
    metric: str
    every: bool
    subject: str | None = None
    site: int | None = None


def steerings_of(pack) -> list[Steering]:
    """The pack's edits as router entries (float32)."""
    config = SteeringMapConfig.of(pack)
    out = []
    for e in pack.edits:
        t = {part: pack.tensors[part_name(e.id, part)].float() for part in PARTS}
        out.append(Steering(t["map.basis"], t["map.core"], t["map.bias"], t["scope.centroid"],
                            t["scope.threshold"].item(), config.source, config.metric, config.apply == "every",
                            e.subject if config.subject_gate else None, config.site))
    return out


class UniformMaps:
    """The forward hook's work at one site: the maps of every uniform edit there,
    applied in order at every position (in float32, cast once per device). Shifts
    (rank 0) that follow each other are summed once here, so a site of shifts
    costs one addition per forward."""

    def __init__(self, steerings: list[Steering]):
        self.maps = []
        for s in steerings:
            if s.basis.shape[1] == 0 and self.maps and self.maps[-1][0].shape[1] == 0:
                basis, core, bias = self.maps[-1]
                self.maps[-1] = (basis, core, bias + s.bias)
            else:
                self.maps.append((s.basis, s.core, s.bias))
        self.cast = {}

    def __call__(self, output):
        h = hidden_states(output)
        if h.device not in self.cast:
            self.cast[h.device] = [tuple(t.to(h.device) for t in m) for m in self.maps]
        edited = h.float()
        for basis, core, bias in self.cast[h.device]:
            edited = edited + bias if basis.shape[1] == 0 else mapped(edited, basis, core, bias)
        edited = edited.to(h.dtype)
        return (edited, *output[1:]) if isinstance(output, (tuple, list)) else edited


class Router:
    """Every attached edit's scope and map, fused: per (source, metric) group the
    centroids [E_g, r] and thresholds [E_g], so one forward call costs one
    distance product per group whatever the number of edits."""

    def __init__(self, steerings: list[Steering], device=None):
        self.steerings = steerings
        self.maps = [(s.basis.to(device), s.core.to(device), s.bias.to(device)) for s in steerings]
        self.every = torch.tensor([s.every for s in steerings], device=device)
        groups = {}
        for i, s in enumerate(steerings):
            groups.setdefault((s.source, s.metric), []).append(i)
        self.groups = [(source, metric, torch.tensor(idx, device=device),
                        torch.stack([steerings[i].centroid for i in idx]).to(device),
                        torch.tensor([steerings[i].threshold for i in idx], device=device))
                       for (source, metric), idx in groups.items()]
        self.hidden_layers = sorted({s for s, _ in groups if isinstance(s, int)})
        self.embedding_models = sorted({s for s, _ in groups if isinstance(s, str)})
        self.gated = [(i, s.subject) for i, s in enumerate(steerings) if s.subject is not None]
        self.reads_text = bool(self.gated or self.embedding_models)
        self.cast = {}

    def on(self, device) -> "Router":
        """This router with its tensors on `device` (cast once per device)."""
        if self.every.device == device:
            return self
        if device not in self.cast:
            self.cast[device] = Router(self.steerings, device)
        return self.cast[device]

    def route(self, queries: dict, texts: list[str] | None = None) -> torch.Tensor:
        """[B] the index of the edit each row is routed to, −1 for none. `queries`
        maps a source (None: final norm, a layer, an embedding model id) to [B, r]
        representations; `texts`: the rows' prompts, for the subject gate."""
        batch = queries[None].shape[0]
        ratios = torch.full((batch, len(self.steerings)), float("inf"), device=self.every.device)
        for source, metric, idx, centroids, thresholds in self.groups:
            ratios[:, idx] = scope_distances(queries[source], centroids, metric) / thresholds
        if self.gated:
            edits, subjects = zip(*self.gated)
            named = names_subject(texts, subjects).to(ratios.device)
            ratios[:, list(edits)] = ratios[:, list(edits)].masked_fill(~named, float("inf"))
        best, routed = ratios.min(1)
        return torch.where(best <= 1, routed, torch.full_like(routed, -1))

    def every_step(self, routed: torch.Tensor) -> torch.Tensor:
        """[B] bool: the row is routed to an edit that applies at every generated step."""
        return (routed >= 0) & self.every[routed.clamp_min(0)]

    def apply(self, h: torch.Tensor, routed: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """`h` [B, T, d] with each routed row's map applied at `where` [B, T] (in
        float32); every other entry is returned bit-identical."""
        edited = h.clone()
        for index in routed[where.any(1)].unique().tolist():
            rows = where & (routed == index)[:, None]
            edited[rows] = mapped(h[rows].float(), *self.maps[index]).to(h.dtype)
        return edited
