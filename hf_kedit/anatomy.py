"""Where the parts of any causal LM are: decoder layers, MLP output projections,
final norm, LM head. No per-model table to maintain: the layers are the
`nn.ModuleList` as long as the config says, the rest is looked up by the
names the model families use."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import AnatomyError

# The second MLP projection, relative to a decoder layer, in the order tried.
MLP_OUT_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.fc_out", "mlp.dense_4h_to_h", "mlp.fc2",
                 "fc2", "mlp.w2", "feed_forward.w2", "feed_forward.down_proj", "ffn.down_proj")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")


@dataclass(frozen=True)
class Anatomy:
    """The module names of a causal LM's parts.

    Example:
        >>> a = anatomy_of(model)
        >>> a.mlp_out(5)
        'model.layers.5.mlp.down_proj'
    """

    layers: str
    num_layers: int
    mlp_out_suffix: str
    final_norm: str
    lm_head: str

    def layer(self, index: int) -> str:
        if not 0 <= index < self.num_layers:
            raise AnatomyError(f"layer {index} is out of range: the model has {self.num_layers} "
                               f"layers (0 to {self.num_layers - 1})")
        return f"{self.layers}.{index}"

    def mlp_out(self, index: int) -> str:
        return f"{self.layer(index)}.{self.mlp_out_suffix}"


def anatomy_of(model: nn.Module) -> Anatomy:
    """Find the parts of `model`; raise `AnatomyError` naming what was looked for."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = getattr(config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == num_layers and len(m) > 0]
    if not lists:
        raise AnatomyError(f"no nn.ModuleList of length config.num_hidden_layers={num_layers} in "
                           f"{type(model).__name__}: cannot find the decoder layers")
    layers_name, layers = min(lists, key=lambda item: item[0].count("."))

    first = layers[0]
    suffix = next((s for s in MLP_OUT_NAMES if _has_weighted(first, s)), None)
    if suffix is None:
        raise AnatomyError(f"no MLP output projection in {layers_name}.0 ({type(first).__name__}); "
                           f"looked for {', '.join(MLP_OUT_NAMES)}")

    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head and head is not None), None)
    if head_name is None:
        raise AnatomyError(f"{type(model).__name__}.get_output_embeddings() names no submodule: "
                           "cannot find the LM head")

    norms = [n for n, _ in model.named_modules()
             if n.rsplit(".", 1)[-1] in FINAL_NORM_NAMES and not n.startswith(layers_name + ".")]
    if not norms:
        raise AnatomyError(f"no final norm outside {layers_name} in {type(model).__name__}; "
                           f"looked for a module named {', '.join(FINAL_NORM_NAMES)}")
    return Anatomy(layers=layers_name, num_layers=len(layers), mlp_out_suffix=suffix,
                   final_norm=min(norms, key=lambda n: n.count(".")), lm_head=head_name)


def _has_weighted(module: nn.Module, name: str) -> bool:
    try:
        return isinstance(module.get_submodule(name).weight, torch.Tensor)
    except AttributeError:
        return False


def is_linear(module: nn.Module) -> bool:
    """Whether `module` is a linear map of its input (`nn.Linear` or GPT-2's `Conv1D`),
    which a low-rank weight change can act on as an added output."""
    return isinstance(module, (nn.Linear, Conv1D))


def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the other modules whose `weight` is the same parameter (tied
    input and output embeddings): writing into one writes into all of them.

    Example:
        >>> shared_weights(gpt2)
        {'transformer.wte': ['lm_head'], 'lm_head': ['transformer.wte']}
    """
    owners: dict[int, dict[int, str]] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), {}).setdefault(id(m), name)
    return {name: [o for o in names.values() if o != name]
            for names in owners.values() if len(names) > 1 for name in names.values()}


def weight_layout(module: nn.Module) -> str:
    """"out_in" for `nn.Linear` (y = x Wᵀ), "in_out" for GPT-2's `Conv1D` (y = x W)."""
    return "in_out" if isinstance(module, Conv1D) else "out_in"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module, whatever its weight layout."""
    rows, cols = module.weight.shape
    return (cols, rows) if weight_layout(module) == "in_out" else (rows, cols)


def execution_device(model: nn.Module, name: str = "") -> torch.device:
    """The device the submodule `name` of `model` computes on: the execution
    device of accelerate's hook on it or on the nearest module above it (a model
    dispatched with a device map, or offloaded to CPU or disk, whose weights wait
    on `meta` between forwards), else that of its first parameter not on `meta`.

    Example:
        >>> execution_device(model, "model.layers.5.mlp.down_proj")
        device(type='cpu')
    """
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:depth])), "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):  # accelerate's SequentialHook holds several
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device)
    for p in (*model.get_submodule(name).parameters(), *model.parameters()):
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where `model`'s input ids go: the device its input embedding computes on
    (`model.device`, the first parameter's, is `meta` on an offloaded model)."""
    embeddings = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embeddings), "")
    return execution_device(model, name)


@contextmanager
def weight_present(module: nn.Module, weight: torch.Tensor | None = None, device: str | None = "cpu"):
    """`weight`, or the module's weight where it can be read: accelerate's
    offloaded weights brought to `device` for the block (None: to the device
    the module computes on). The tensor stays valid in the block even if a
    forward of the module offloads its weight again meanwhile."""
    if weight is not None:
        yield weight
    # accelerate's offload keeps weights on `meta` until forward; bring them in to read them.
    elif module.weight.device.type == "meta":
        from accelerate.utils import align_module_device
        with align_module_device(module, execution_device=device):
            yield module.weight.detach()
    else:
        yield module.weight.detach()


def hidden_states(layer_output):
    """The hidden-state tensor of a decoder layer's output, which is a tensor in
    some architectures and transformers versions and a tuple in others."""
    return layer_output[0] if isinstance(layer_output, (tuple, list)) else layer_output
