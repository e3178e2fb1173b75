"""What a pack records of its base model, and the check that a model matches it.

The fingerprint hashes the exact weights a pack touches or reads, rounded to
bfloat16 first: a pack made on fp32 weights then verifies on the same
checkpoint loaded in fp32 or bf16. Other dtypes (fp16) cannot reproduce those
bytes, so for them a sample of weight values is compared within rounding error.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch
from torch import nn

from .errors import IncompatiblePackError

ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
SAMPLE_SIZE = 64
VERIFY_MODES = ("strict", "shapes")


def base_model_record(model: nn.Module, modules: list[str]) -> dict:
    """The manifest's `base_model` entry for a pack touching or reading `modules`."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    record = {"name_or_path": getattr(model.config, "_name_or_path", "") or "",
              "revision": getattr(model.config, "_commit_hash", None)}
    record.update({f: _field(config, model.config, f) for f in ARCHITECTURE_FIELDS})
    record["fingerprint"] = {name: _module_fingerprint(model.get_submodule(name)) for name in sorted(set(modules))}
    return record


def check_base_model(record: dict, model: nn.Module, verify: str = "strict",
                     base_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Raise `IncompatiblePackError` naming what differs between `model` and the
    pack's `record`. `verify="shapes"` skips the weight fingerprint (a fine-tuned
    sibling of the base model). `base_weights` holds the original matrices of
    modules that merged packs have changed: those are what a pack was made on."""
    base_weights = base_weights or {}
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}: use one of {VERIFY_MODES}")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for f in ARCHITECTURE_FIELDS:
        mine = _field(config, model.config, f)
        if record.get(f) is not None and mine != record[f]:
            raise IncompatiblePackError(
                f"the pack was made for a model with {f}={record[f]!r}, this model has {f}={mine!r} "
                f"(pack base model: {record.get('name_or_path') or 'unnamed'})")
    for name, expected in record["fingerprint"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise IncompatiblePackError(f"the pack touches module {name!r}, which this model does not have") from None
        shape = list(module.weight.shape)
        if shape != expected["shape"]:
            raise IncompatiblePackError(f"{name}.weight has shape {shape} here, the pack expects {expected['shape']}")
        if verify == "strict" and not _same_weights(module, expected, base_weights.get(name)):
            raise IncompatiblePackError(
                f"the weights of {name} differ from those the pack was made on "
                f"({record.get('name_or_path') or 'unnamed base model'}); load the pack on its base model, "
                "or pass verify='shapes' to attach it to a fine-tuned sibling anyway")


def _field(text_config, config, name):
    return getattr(text_config, name, getattr(config, name, None))


@contextmanager
def _weights_present(module: nn.Module, weight: torch.Tensor | None = None):
    if weight is not None:
        yield weight
    # accelerate's offload keeps weights on `meta` until forward; bring them in to read them.
    elif module.weight.device.type == "meta":
        from accelerate.utils import align_module_device
        with align_module_device(module, execution_device="cpu"):
            yield module.weight.detach()
    else:
        yield module.weight.detach()


def _module_fingerprint(module: nn.Module) -> dict:
    with _weights_present(module) as w:
        return {"shape": list(w.shape), "sha256_bf16": _bf16_hash(w), "sample": _sample(w).tolist()}


def _same_weights(module: nn.Module, expected: dict, weight: torch.Tensor | None) -> bool:
    with _weights_present(module, weight) as w:
        if w.dtype in (torch.float32, torch.bfloat16):
            return _bf16_hash(w) == expected["sha256_bf16"]
        sample, reference = _sample(w).double(), torch.tensor(expected["sample"], dtype=torch.float64)
        scale = reference.abs().mean() + 1e-12
        return bool(((sample - reference).abs() <= 1e-2 * reference.abs() + 1e-3 * scale).all())


def _bf16_hash(w: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for chunk in w.reshape(-1).split(1 << 22):
        digest.update(chunk.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _sample(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(-1)
    idx = torch.randint(0, flat.numel(), (SAMPLE_SIZE,), generator=torch.Generator().manual_seed(0))
    return flat[idx.to(flat.device)].to("cpu", torch.float32)
