"""Methods make packs: each takes a model, a tokenizer and edit requests and
returns an `EditPack`, leaving the model as it found it."""
from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from ..errors import EditRequestError
from ..pack.fingerprint import base_model_record
from ..kinds import steering_map
from ..kinds.basis_intervention import BasisIntervention, BasisInterventionConfig, part_name
from ..kinds.weight_delta import WeightDelta, factor_names, module_entry
from ..pack import Edit, EditPack, check_edits


def owning_pack(kind: str, method: str, hyperparameters: dict, edits: list[Edit],
                tensors: dict[str, dict[str, torch.Tensor]], base_model: dict, kind_config: dict) -> EditPack:
    """A pack of `kind` in which edit `e` owns the named tensors `tensors[e.id]`
    (stored float32 on the CPU): what lets a single edit be removed or selected."""
    stored = {name: t.detach().float().cpu().contiguous() for e in edits for name, t in tensors[e.id].items()}
    edits = [Edit(**{**e.__dict__, "tensors": list(tensors[e.id])}) for e in edits]
    return EditPack(kind, method, edits, stored, base_model, hyperparameters, kind_config)


def weight_delta_pack(model: nn.Module, method: str, hyperparameters: dict, edits: list[Edit],
                      factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> EditPack:
    """A `weight_delta` pack from per-edit, per-module factors `(A [r, in], B [out, r])`."""
    tensors = {e.id: {name: t for module, pair in factors[e.id].items()
                      for name, t in zip(factor_names(e.id, module), pair)} for e in edits}
    modules = sorted({module for e in edits for module in factors[e.id]})
    kind_config = {"modules": {m: module_entry(model, m) for m in modules}}
    return owning_pack(WeightDelta.name, method, hyperparameters, edits, tensors,
                       base_model_record(model, WeightDelta.modules(kind_config, model)), kind_config)


def basis_intervention_pack(model: nn.Module, method: str, hyperparameters: dict, edits: list[Edit],
                            config: BasisInterventionConfig,
                            parts: dict[str, dict[int, dict[str, torch.Tensor]]]) -> EditPack:
    """A `basis_intervention` pack from per-edit, per-layer tensors (`parts[edit_id][layer][part]`,
    part one of "rotation", "source.weight", "source.bias", "gate.weight", "gate.bias").
    The fingerprint covers what `BasisIntervention.modules` names."""
    tensors = {e.id: {part_name(e.id, layer, part): t for layer, by_part in parts[e.id].items()
                      for part, t in by_part.items()} for e in edits}
    record = base_model_record(model, BasisIntervention.modules(config.to_dict(), model))
    config.base_model_name_or_path, config.revision = record["name_or_path"] or None, record["revision"]
    return owning_pack(BasisIntervention.name, method, hyperparameters, edits, tensors, record, config.to_dict())


def steering_map_pack(model: nn.Module, method: str, hyperparameters: dict, edits: list[Edit],
                      config: steering_map.SteeringMapConfig, parts: dict[str, dict[str, torch.Tensor]]) -> EditPack:
    """A `steering_map` pack from per-edit tensors (`parts[edit_id][part]`, part one of
    "map.basis", "map.core", "map.bias", "scope.centroid", "scope.threshold"). The
    fingerprint covers what `SteeringMap.modules` names."""
    tensors = {e.id: {steering_map.part_name(e.id, part): t for part, t in parts[e.id].items()} for e in edits}
    record = base_model_record(model, steering_map.SteeringMap.modules(config.to_dict(), model))
    return owning_pack(steering_map.SteeringMap.name, method, hyperparameters, edits, tensors, record,
                       config.to_dict())


def check_requests(requests: list[Edit], subject_slot: bool = True) -> None:
    """Raise `EditRequestError` naming the first request a method cannot carry out:
    not a non-empty list of `Edit`s, a blank subject, prompt or target, a bad or
    repeated id, or (`subject_slot`, the locate-and-edit methods, which edit at the
    subject's last token) a prompt without exactly one "{}" where the subject goes.
    Every method calls it first, before any statistics or optimisation.

    Example:
        >>> check_requests([Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English")])
    """
    if not isinstance(requests, (list, tuple)) or not requests:
        raise EditRequestError(f"give a non-empty list of Edit requests, got {requests!r}")
    strangers = [r for r in requests if not isinstance(r, Edit)]
    if strangers:
        raise EditRequestError(f"requests must be hf_kedit.Edit objects, got {type(strangers[0]).__name__}: "
                               f"{strangers[0]!r}")
    check_edits(requests, EditRequestError)
    for edit in requests if subject_slot else ():
        if edit.prompt.count("{}") != 1:
            raise EditRequestError(f"edit {edit.id!r}: the prompt {edit.prompt!r} must hold \"{{}}\" exactly once, "
                                   f"where the subject goes{_slot_hint(edit)}")


def _slot_hint(edit: Edit) -> str:
    if edit.prompt.count("{}") == 0 and edit.subject in edit.prompt:
        return f": write {edit.prompt.replace(edit.subject, '{}', 1)!r}"
    if edit.prompt.count("{}") == 0:
        return f" (the subject {edit.subject!r} does not occur in it)"
    return ""


def check_layers(layers: list[int], num_layers: int, setting: str) -> None:
    """Raise `EditRequestError` unless `layers` (what the setting `setting` gave)
    are layer indices of a model with `num_layers` layers."""
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad or not layers:
        raise EditRequestError(f"{setting} gives layers {bad or layers}, out of range: the model has {num_layers} "
                               f"layers (0 to {num_layers - 1}); give indices in that range or relative depths "
                               "in [0, 1)")


def make_pack(method: str, model: nn.Module, tokenizer, edits: list[Edit], settings: dict | None = None,
              progress: bool = True) -> EditPack:
    """Run the method called `method` on `edits` with `settings` (its config's fields).

    Example:
        >>> pack = make_pack("lora", model, tokenizer, edits, {"rank": 2})
    """
    if method not in METHODS:
        raise EditRequestError(f"unknown method {method!r}: the methods that make packs are {sorted(METHODS)}")
    edit, config_class = METHODS[method]
    known = {f.name for f in fields(config_class)}
    unknown = set(settings or {}) - known
    if unknown:
        raise EditRequestError(f"{method} has no setting {sorted(unknown)}; its settings are {sorted(known)}")
    return edit(model, tokenizer, edits, config_class(**(settings or {})), progress=progress)


# The methods import the pack builders above from this module, so they are registered last.
from .actadd import ActAddConfig, actadd_edit  # noqa: E402
from .baft import BaFTConfig, baft_edit  # noqa: E402
from .lora import LoRAConfig, lora_edit  # noqa: E402
from .memit import MEMITConfig, memit_edit  # noqa: E402
from .reft import ReFTConfig, reft_edit  # noqa: E402
from .rome import ROMEConfig, rome_edit  # noqa: E402
from .sake import SAKEConfig, sake_edit  # noqa: E402
from .steam import STEAMConfig, steam_edit  # noqa: E402

METHODS = {"actadd": (actadd_edit, ActAddConfig), "baft": (baft_edit, BaFTConfig), "lora": (lora_edit, LoRAConfig),
           "memit": (memit_edit, MEMITConfig), "reft": (reft_edit, ReFTConfig), "rome": (rome_edit, ROMEConfig),
           "sake": (sake_edit, SAKEConfig), "steam": (steam_edit, STEAMConfig)}
