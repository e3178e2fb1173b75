"""Methods make packs: each takes a model, a tokenizer and edit requests and
returns an `EditPack`, leaving the model as it found it."""
from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from ..fingerprint import base_model_record
from ..kinds.weight_delta import WeightDelta, factor_names, module_entry
from ..pack import Edit, EditPack


def weight_delta_pack(model: nn.Module, method: str, hyperparameters: dict, edits: list[Edit],
                      factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> EditPack:
    """A `weight_delta` pack from per-edit, per-module factors `(A [r, in], B [out, r])`."""
    tensors, modules, owned = {}, set(), {}
    for edit in edits:
        owned[edit.id] = []
        for module, (A, B) in factors[edit.id].items():
            a, b = factor_names(edit.id, module)
            tensors[a], tensors[b] = A.detach().float().cpu(), B.detach().float().cpu()
            owned[edit.id] += [a, b]
            modules.add(module)
    edits = [Edit(**{**e.__dict__, "tensors": owned[e.id]}) for e in edits]
    return EditPack(WeightDelta.name, method, edits, tensors, base_model_record(model, sorted(modules)),
                    hyperparameters, {"modules": {m: module_entry(model, m) for m in sorted(modules)}})


def make_pack(method: str, model: nn.Module, tokenizer, edits: list[Edit], settings: dict | None = None,
              progress: bool = True) -> EditPack:
    """Run the method called `method` on `edits` with `settings` (its config's fields).

    Example:
        >>> pack = make_pack("lora", model, tokenizer, edits, {"rank": 2})
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: the methods that make packs are {sorted(METHODS)}")
    edit, config_class = METHODS[method]
    known = {f.name for f in fields(config_class)}
    unknown = set(settings or {}) - known
    if unknown:
        raise ValueError(f"{method} has no setting {sorted(unknown)}; its settings are {sorted(known)}")
    return edit(model, tokenizer, edits, config_class(**(settings or {})), progress=progress)


# The methods import `weight_delta_pack` from this module, so they are registered last.
from .lora import LoRAConfig, lora_edit  # noqa: E402
from .memit import MEMITConfig, memit_edit  # noqa: E402
from .rome import ROMEConfig, rome_edit  # noqa: E402
from .steam import STEAMConfig, steam_edit  # noqa: E402

METHODS = {"lora": (lora_edit, LoRAConfig), "memit": (memit_edit, MEMITConfig), "rome": (rome_edit, ROMEConfig),
           "steam": (steam_edit, STEAMConfig)}
