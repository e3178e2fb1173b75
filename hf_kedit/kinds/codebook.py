"""`codebook`: GRACE's discrete key-value memory (Hartvigsen et al., NeurIPS
2023) at the MLP output projection of one decoder layer.

Each edit owns one entry: a key (the projection's input at the edit prompt's
last token, [key_size]), a value (what the projection returns there instead,
[value_size]) and a deferral radius. At a position the memory reads, the
projection's input is the query; the entry whose key is nearest (Euclidean
distance) replaces the projection's output with its value if the query lies
within that entry's radius, and the output is left bit-identical otherwise. A
negative radius never fires.

Which positions are read: in a forward call over an empty KV cache (a prompt),
each row's last prompt token, as GRACE replaces the last token; inside
`prompt_lengths(...)` also the teacher-forced answer tokens after it, and in a
call that continues a cache every token of the step, because GRACE's cached
generation queries each new token. Teacher-forced scoring thus reads the
positions cached generation reads.

One hook per edited layer serves every attached codebook pack: the entries of
all packs at that layer are one `KeyIndex`, so a forward call costs one batched
search per layer whatever the number of entries. The search is exact but reads
the full keys only where it must: distances measured in a few principal
directions of the keys bound the true ones from below, so keys whose bound is
beyond every radius cannot fire and are never compared in full. Entries of
packs made apart are not reconciled when stacked: the nearest key decides.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..anatomy import anatomy_of, linear_shape
from ..errors import AnatomyError, IncompatiblePackError, KeditError, PackFormatError
from .hooked_runtime import HookedRuntime
from .kind_config import KindConfig, check_owned

PARTS = ("codebook.key", "codebook.value", "codebook.radius")


def part_name(edit_id: str, part: str) -> str:
    """The tensor name of an edit's `part` ("codebook.key", "codebook.value" or "codebook.radius")."""
    return f"{edit_id}.{part}"


BOUND_WIDTH = 64  # principal directions the lower bounds are measured in: [N, 64] products instead of [N, key_size]


def principal_basis(keys: torch.Tensor, width: int) -> torch.Tensor:
    """[d, w] orthonormal columns near the top right singular directions of `keys`
    [N, d], w = min(width, N, d): a randomized range finder with a fixed seed, so
    the same keys give the same basis and the caller's random state is untouched."""
    n, d = keys.shape
    width = min(width, n, d)
    if width == 0:
        return keys.new_zeros(d, 0)
    generator = torch.Generator(device=keys.device).manual_seed(0)
    sketch = keys.T @ torch.randn(n, width, generator=generator, device=keys.device, dtype=keys.dtype)
    for _ in range(2):  # power iterations pull the sketch toward the keys' dominant directions
        sketch = keys.T @ (keys @ torch.linalg.qr(sketch).Q)
    return torch.linalg.qr(sketch).Q


class KeyIndex:
    """Exact nearest-key search over keys [N, d] with radii [N], cheap where
    queries fall within no radius (almost every token a model generates).

    For an orthonormal basis P, |q − k|² = |Pᵀ(q − k)|² + |r(q) − r(k)|² with r
    the parts outside P, and |r(q) − r(k)| ≥ | |r(q)| − |r(k)| |: a lower bound
    that costs a product in P's few dimensions. A key whose bound exceeds the
    largest radius is farther than any radius, so the nearest key can fire only
    if it is among the keys within that reach, and only those are compared in
    full. Whether the basis is good changes the speed, never the answer.

    Example:
        >>> index = KeyIndex(torch.eye(3), torch.full((3,), 0.5))
        >>> index.nearest(torch.tensor([[0.9, 0.0, 0.0], [0.5, 0.5, 0.0]])).tolist()
        [0, -1]
    """

    def __init__(self, keys: torch.Tensor, radii: torch.Tensor, basis: torch.Tensor | None = None):
        self.keys, self.radii = keys, radii
        self.basis = principal_basis(keys, BOUND_WIDTH) if basis is None else basis
        self.norms = keys.pow(2).sum(1)
        # the bounds are taken in float64: |q|² − |Pᵀq|² cancels, and rounding must not push a key out
        projected = (keys @ self.basis).double()
        self.projected = projected
        self.projected_norms = projected.pow(2).sum(1)
        self.residual_norms = (self.norms.double() - self.projected_norms).clamp_min(0).sqrt()
        self.reach = float(radii.max()) if len(radii) else -1.0

    def to(self, device) -> "KeyIndex":
        return KeyIndex(self.keys.to(device), self.radii.to(device), self.basis.to(device))

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """[M] the index of each query's [M, d] nearest key, or −1 where that key's radius does not reach it."""
        entry = torch.full((len(queries),), -1, dtype=torch.long, device=queries.device)
        if self.reach < 0 or len(queries) == 0:
            return entry
        projected = (queries @ self.basis).double()
        query_norms = queries.pow(2).sum(1).double()
        projected_norms = projected.pow(2).sum(1)
        residual_norms = (query_norms - projected_norms).clamp_min(0).sqrt()
        bound = (projected_norms[:, None] + self.projected_norms - 2 * projected @ self.projected.T
                 + (residual_norms[:, None] - self.residual_norms) ** 2)
        # slack for the float32 inputs' own rounding: a key at the edge stays a candidate
        slack = 1e-6 * (query_norms[:, None] + self.norms.double())
        candidate = bound - slack <= self.reach ** 2
        rows = candidate.any(1).nonzero().squeeze(1)
        if len(rows) == 0:
            return entry
        columns = candidate[rows].any(0).nonzero().squeeze(1)
        near = queries[rows]
        score = (self.norms[columns] - 2 * near @ self.keys[columns].T).masked_fill(
            ~candidate[rows][:, columns], float("inf"))
        best = columns[score.argmin(1)]
        # the winner's distance is taken directly, so whether it fires does not rest on the expanded form's rounding
        distance = (near - self.keys[best]).norm(dim=1)
        entry[rows] = torch.where(distance <= self.radii[best], best, torch.full_like(best, -1))
        return entry


@dataclass
class CodebookConfig(KindConfig):
    """A `codebook` pack's `kind_config`: `layer`, the decoder layer whose MLP
    output projection the entries act on; `key_size` and `value_size`, that
    projection's input and output widths.

    Example:
        >>> CodebookConfig(layer=25, key_size=1536, value_size=576).to_dict()["key_size"]
        1536
    """

    kind = "codebook"

    layer: int = -1
    key_size: int = 0
    value_size: int = 0

    def check(self) -> None:
        """`PackFormatError` naming the first field that is wrong."""
        if type(self.layer) is not int or self.layer < 0:
            raise PackFormatError(f"codebook pack: layer={self.layer!r}; give the index of the decoder layer whose "
                                  "MLP output projection the entries act on (an integer from 0)")
        for name in ("key_size", "value_size"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise PackFormatError(f"codebook pack: {name} must be a positive integer, got {getattr(self, name)!r}")


class Codebook:
    name = "codebook"

    @staticmethod
    def validate(pack) -> None:
        config = CodebookConfig.of(pack)
        shapes = {"codebook.key": [config.key_size], "codebook.value": [config.value_size], "codebook.radius": [1]}
        for edit in pack.edits:
            check_owned(edit, {part_name(edit.id, part) for part in PARTS}, ", ".join(PARTS))
            for part, shape in shapes.items():
                t = pack.tensors[part_name(edit.id, part)]
                if list(t.shape) != shape:
                    raise PackFormatError(f"edit {edit.id!r}: {part} has shape {list(t.shape)}, expected {shape} "
                                          f"(key_size={config.key_size}, value_size={config.value_size})")

    @staticmethod
    def modules(kind_config: dict, model: nn.Module) -> list[str]:
        """The edited projection: its input is the key, its output what a value replaces."""
        return [anatomy_of(model).mlp_out(kind_config["layer"])]

    @staticmethod
    def check_model(pack, model: nn.Module) -> None:
        config = CodebookConfig.of(pack)
        try:
            anatomy = anatomy_of(model)
        except AnatomyError as e:
            raise IncompatiblePackError(f"the pack's codebook acts on an MLP output projection, which hf_kedit "
                                        f"cannot find in this model: {e}") from None
        if config.layer >= anatomy.num_layers:
            raise IncompatiblePackError(f"the pack's codebook is at layer {config.layer}; this model has "
                                        f"{anatomy.num_layers} layers (0 to {anatomy.num_layers - 1})")
        module = model.get_submodule(anatomy.mlp_out(config.layer))
        shape = linear_shape(module) if hasattr(module, "weight") else None
        if shape != (config.value_size, config.key_size):
            raise IncompatiblePackError(f"the pack's codebook maps keys of width {config.key_size} to values of "
                                        f"width {config.value_size}; {anatomy.mlp_out(config.layer)} of this model "
                                        f"is {'not a linear module' if shape is None else f'{shape[1]} -> {shape[0]}'}")

    class Runtime(HookedRuntime):
        """Every attached codebook pack of one model: per edited layer, a hook on its
        MLP output projection holding the entries of all packs there, and the base
        model's call hooks (`HookedRuntime`)."""

        kind = "codebook"
        why_unmergeable = "its entries replace an MLP's output only where a query falls within a key's radius"

        def __init__(self, model: nn.Module):
            super().__init__(model)
            self.packs: dict[str, tuple[int, Memory]] = {}
            self.memories: dict[int, Memory] = {}
            self.handles: list = []

        def put(self, name: str, pack) -> None:
            """Attach `pack` as `name`, or replace the pack of that name in place;
            all or nothing: the memories are built before a hook changes."""
            config = CodebookConfig.of(pack)
            self._commit({**self.packs, name: (config.layer, Memory.of(pack))})

        def remove(self, name: str) -> None:
            self._commit({n: p for n, p in self.packs.items() if n != name})

        def _commit(self, packs: dict[str, tuple[int, "Memory"]]) -> None:
            by_layer: dict[int, list[Memory]] = {}
            for layer, memory in packs.values():
                by_layer.setdefault(layer, []).append(memory)
            memories = {layer: Memory.joined(parts) for layer, parts in by_layer.items()}
            modules = {layer: self.model.get_submodule(self.anatomy.mlp_out(layer)) for layer in memories}
            for handle in self.handles:
                handle.remove()
            self.packs, self.memories, self.handles = packs, memories, []
            self.local = threading.local()
            self.watch_calls(bool(memories))
            for layer, module in modules.items():
                self.handles.append(module.register_forward_hook(partial(self._recall, layer)))

        def _recall(self, layer: int, module, args, output):
            call = self.call
            if not self.enabled or call is None:
                return None
            queries, outputs = by_token(args[0] if args else None, call.real.shape), by_token(output, call.real.shape)
            if queries is None or outputs is None:
                raise KeditError(f"the MLP output projection of layer {layer} was called without its input as "
                                 f"the first argument, one row per token of the model's input "
                                 f"{list(call.real.shape)}: the codebook cannot read its queries")
            real = call.real.to(output.device)
            if call.continuing:
                where = real
            else:
                last = call.selection((0, 1), output.device)
                where = last | (real & (last.long().cumsum(1) > 0))  # the last prompt token and any answer after it
            memory = self.memories[layer].on(output.device)
            # the input may sit where the caller left it when accelerate moves it inside forward: the
            # queries are picked there and only they are moved
            entry = memory.index.nearest(queries[where.to(queries.device)].to(output.device).float())
            fires = entry >= 0
            if not fires.any():
                return None
            rows = outputs[where]
            rows[fires] = memory.values[entry[fires]].to(output.dtype)
            edited = outputs.clone()
            edited[where] = rows
            return edited.reshape(output.shape)


def by_token(x, shape) -> torch.Tensor | None:
    """`x` as [batch, tokens, width] for an input of `shape` [batch, tokens]: as it is,
    or unflattened where the model runs its MLP on [batch · tokens, width] (OPT);
    None if it is neither."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[:-1].numel() != shape.numel():
        return None
    return x.reshape(*shape, x.shape[-1])


class Memory:
    """The entries of one layer, fused: keys [N, key_size] searched through a
    `KeyIndex`, values [N, value_size] and radii [N], float32, with a copy per
    device the hook runs on."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor, index: KeyIndex | None = None):
        self.keys, self.values, self.radii = keys, values, radii
        self._index = index
        self.cast = {}

    @property
    def index(self) -> KeyIndex:
        """The search over the keys, built on first use (a pack's own memory is only
        joined with the others at its layer, and only the joined one is searched)."""
        if self._index is None:
            self._index = KeyIndex(self.keys, self.radii)
        return self._index

    @classmethod
    def of(cls, pack) -> "Memory":
        """The pack's entries, in the order of its edits."""
        parts = [torch.stack([pack.tensors[part_name(e.id, part)].float().reshape(-1) for e in pack.edits])
                 for part in PARTS]
        return cls(parts[0], parts[1], parts[2].reshape(-1))

    @classmethod
    def joined(cls, memories: list["Memory"]) -> "Memory":
        """One memory of all `memories`' entries, its index built now (before any hook changes)."""
        keys, values, radii = (torch.cat([getattr(m, part) for m in memories]) for part in ("keys", "values", "radii"))
        return cls(keys, values, radii, KeyIndex(keys, radii))

    def on(self, device) -> "Memory":
        """This memory with its tensors on `device` (moved once per device)."""
        if self.keys.device == device:
            return self
        if device not in self.cast:
            index = self.index.to(device)
            self.cast[device] = Memory(index.keys, self.values.to(device), index.radii, index)
        return self.cast[device]
