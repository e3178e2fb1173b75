"""Methods make packs: each takes a model, a tokenizer and edit requests and
returns an `EditPack`, leaving the model as it found it."""
from __future__ import annotations

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
