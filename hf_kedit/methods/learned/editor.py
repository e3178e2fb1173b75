"""MEND's editor network (Mitchell et al., ICLR 2022): the gradient of an edit's
loss at a linear layer is a sum of rank-one terms, ∇W = Σₜ δₜ uₜᵀ (uₜ the layer's
input at token t, δₜ the loss's gradient at its output). The editor maps each
pair (uₜ, δₜ), normalised, to a pair (ũₜ, δ̃ₜ) and the edit is
ΔW = −αₗ Σₜ δ̃ₜ ũₜᵀ, with one learned step size αₗ per edited weight: a low-rank
update, stored as the factors A = ũ, B = −αₗ δ̃ᵀ of a `weight_delta` pack.

One network serves every edited weight of a shape, told apart by a per-weight
scale and shift of each layer's pre-activation (MEND's "shared" editor). Each
network layer is residual and starts as the identity, so an untrained editor
passes the normalised gradient through.

Example:
    >>> editor = MENDEditor.for_model(model, ["model.layers.29.mlp.down_proj"], rank=64)
    >>> grads = edit_gradients(model, editor.targets, ids, labels)
    >>> factors = editor.factors(grads)   # {module: (A [n, in], B [out, n])}
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ...anatomy import linear_shape
from ..teacher_forcing import frozen


def shape_key(in_features: int, out_features: int) -> str:
    """The name of the network that edits weights of this shape."""
    return f"{in_features}x{out_features}"


class EditorLayer(nn.Module):
    """x + act(scaleₘ ⊙ (U V x + b) + shiftₘ), U [dim, rank] starting at zero: the identity
    at initialisation; m the edited weight (mode) the input comes from."""

    def __init__(self, dim: int, rank: int, modes: int, relu: bool):
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(modes, dim))
        self.shift = nn.Parameter(torch.zeros(modes, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (F.linear(F.linear(x, self.down), self.up) + self.bias) * self.scale[mode] + self.shift[mode]
        return x + (pre.clamp(min=0) if self.relu else pre)  # clamp, not relu: MEND's choice, same values


class GradientEditor(nn.Module):
    """The editor of the weights of one shape [out, in]: normalises (u, δ) with
    statistics read from training edits, runs `hidden_layers` + 1 editor layers
    on their concatenation and splits the result into (ũ, δ̃)."""

    def __init__(self, in_features: int, out_features: int, modes: int, rank: int, hidden_layers: int = 1):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dim = in_features + out_features
        self.layers = nn.ModuleList([EditorLayer(dim, min(rank, dim), modes, relu=i < hidden_layers)
                                     for i in range(hidden_layers + 1)])
        for name, size in (("u_mean", in_features), ("u_std", in_features), ("delta_mean", out_features),
                           ("delta_std", out_features)):
            self.register_buffer(name, torch.zeros(size) if "mean" in name else torch.ones(size))

    def set_normalisation(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Normalise inputs by the per-dimension mean and standard deviation of these rows."""
        self.u_mean.copy_(u.mean(0)), self.u_std.copy_(u.std(0))
        self.delta_mean.copy_(delta.mean(0)), self.delta_std.copy_(delta.std(0))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([(u.float() - self.u_mean) / (self.u_std + 1e-7),
                       (delta.float() - self.delta_mean) / (self.delta_std + 1e-7)], -1)
        for layer in self.layers:
            x = layer(x, mode)
        return x.split([self.in_features, self.out_features], -1)


class MENDEditor(nn.Module):
    """MEND's editor for a list of weights (`targets`, linear layers of a model):
    one `GradientEditor` per weight shape and one step size per weight.

    Example:
        >>> editor = MENDEditor.for_model(model, modules, rank=64)
    """

    def __init__(self, modules: list[str], shapes: list[tuple[int, int]], rank: int, hidden_layers: int = 1,
                 edit_lr: float = 1e-4):
        super().__init__()
        self.targets, self.shapes = list(modules), [tuple(s) for s in shapes]  # shape: (in, out)
        self.rank, self.hidden_layers = rank, hidden_layers
        keys = [shape_key(*s) for s in self.shapes]
        self.nets = nn.ModuleDict({key: GradientEditor(*shape, keys.count(key), rank, hidden_layers)
                                   for key, shape in zip(keys, self.shapes)})
        self.modes = [keys[:i].count(key) for i, key in enumerate(keys)]
        self.edit_lr = nn.Parameter(torch.full((len(self.targets),), float(edit_lr)))

    @classmethod
    def for_model(cls, model: nn.Module, modules: list[str], rank: int, hidden_layers: int = 1,
                  edit_lr: float = 1e-4) -> "MENDEditor":
        """An untrained editor for `model`'s linear layers `modules`."""
        shapes = [tuple(reversed(linear_shape(model.get_submodule(m)))) for m in modules]
        return cls(modules, shapes, rank, hidden_layers, edit_lr)

    def net_of(self, index: int) -> GradientEditor:
        return self.nets[shape_key(*self.shapes[index])]

    def factors(self, grads: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module, the update's factors (A = ũ [n, in], B = −α δ̃ᵀ [out, n]) from its
        gradient's factors (u [n, in], δ [n, out]): ΔW = B A."""
        out = {}
        for i, module in enumerate(self.targets):
            u, delta = grads[module]
            u_new, delta_new = self.net_of(i)(u, delta, self.modes[i])
            out[module] = (u_new, -self.edit_lr[i] * delta_new.T)
        return out


def edit_gradients(model: nn.Module, modules: list[str], ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                        torch.Tensor]:
    """The factors of the gradient of row 0's target cross-entropy (mean over its
    `labels` [1, T ≤ width] ≠ −100) at each linear layer of `modules`: per module
    (u [n, in], δ [n, out]) over the n tokens where both are non-zero, ∇W = δᵀ u;
    and the detached logits of every row (other rows, right-padded, ride along
    unscored). No weight gradient is computed."""
    inputs, probes = {}, {}

    def probe(name):
        def hook(module, args, out):
            inputs[name] = args[0].detach()
            probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[name]
        return hook

    handles = [model.get_submodule(name).register_forward_hook(probe(name)) for name in modules]
    try:
        with frozen(model), torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=attention_mask).logits
            scored = labels[0, 1:] != -100
            loss = F.cross_entropy(logits[0, :labels.shape[1] - 1][scored].float(), labels[0, 1:][scored])
            deltas = torch.autograd.grad(loss, [probes[name] for name in modules])
    finally:
        for handle in handles:
            handle.remove()
    grads = {}
    for name, delta in zip(modules, deltas):
        u, d = inputs[name][0], delta[0]
        keep = (u != 0).any(-1) & (d != 0).any(-1)
        grads[name] = (u[keep].float(), d[keep].float())
    return grads, logits.detach()
