"""Building packs: every method hands its tensors to one of these, so every pack is
made the same way (each edit owns its named tensors, stored float32 on the CPU,
and the fingerprint covers what the kind names)."""
from __future__ import annotations

import torch
from torch import nn

from ..kinds import codebook, singular_scale, steering_map
from ..kinds.basis_intervention import BasisIntervention, BasisInterventionConfig, owner_of, part_name
from ..kinds.weight_delta import WeightDelta, factor_names, module_entry
from ..pack import Edit, EditPack
from ..pack.fingerprint import base_model_record


def owning_pack(kind: str, method: str, hyperparameters: dict, edits: list[Edit],
                tensors: dict[str, dict[str, torch.Tensor]], base_model: dict, kind_config: dict) -> EditPack:
    """A pack of `kind` in which edit `e` owns the named tensors `tensors[e.id]`
    (stored float32 on the CPU): what lets a single edit be removed or selected."""
    named = {name: t for e in edits for name, t in tensors[e.id].items()}  # tensors edits own together: once
    stored = {name: t.detach().float().cpu().contiguous() for name, t in named.items()}
    edits = [Edit(**{**e.__dict__, "tensors": list(tensors[e.id])}) for e in edits]
    return EditPack(kind, method, edits, stored, base_model, hyperparameters, kind_config)


def weight_delta_pack(model: nn.Module, method: str, hyperparameters: dict, edits: list[Edit],
                      factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]],
                      joint: bool = False) -> EditPack:
    """A `weight_delta` pack from per-edit, per-module factors `(A [r, in], B [out, r])`;
    with `joint`, `factors` holds one entry, under the first edit's id, that all
    edits own together (they come off together)."""
    owner = {e.id: edits[0].id if joint else e.id for e in edits}
    tensors = {e.id: {name: t for module, pair in factors[owner[e.id]].items()
                      for name, t in zip(factor_names(owner[e.id], module), pair)} for e in edits}
    modules = sorted({module for e in edits for module in factors[owner[e.id]]})
    kind_config = {"modules": {m: module_entry(model, m) for m in modules}}
    return owning_pack(WeightDelta.name, method, hyperparameters, edits, tensors,
                       base_model_record(model, WeightDelta.modules(kind_config, model)), kind_config)


def basis_intervention_pack(model: nn.Module, method: str, hyperparameters: dict, edits: list[Edit],
                            config: BasisInterventionConfig,
                            parts: dict[str, dict[int, dict[str, torch.Tensor]]]) -> EditPack:
    """A `basis_intervention` pack from per-edit, per-layer tensors (`parts[edit_id][layer][part]`,
    part one of "rotation", "source.weight", "source.bias", "gate.weight", "gate.bias"),
    or with `config.shared_bases` the one intervention all edits own (`parts[SHARED_OWNER]`).
    The fingerprint covers what `BasisIntervention.modules` names."""
    owner = {e.id: owner_of(config, e.id) for e in edits}
    tensors = {e.id: {part_name(owner[e.id], layer, part): t for layer, by_part in parts[owner[e.id]].items()
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


def singular_scale_pack(model: nn.Module, method: str, hyperparameters: dict, edits: list[Edit],
                        zs: dict[str, dict[str, torch.Tensor]], spectra: dict[str, torch.Tensor]) -> EditPack:
    """A `singular_scale` pack from per-edit, per-module z (`zs[edit_id][module]`), each
    edit with mix weight 1, and the singular values `spectra[module]` they were trained on."""
    tensors = {e.id: {singular_scale.mix_weight_name(e.id): torch.ones(1),
                      **{singular_scale.z_name(e.id, m): z for m, z in zs[e.id].items()}} for e in edits}
    modules = sorted({m for e in edits for m in zs[e.id]})
    kind_config = {"modules": {m: singular_scale.module_entry(model, m, spectra[m]) for m in modules},
                   "mix": singular_scale.MIX_RULE}
    kind = singular_scale.SingularScale
    return owning_pack(kind.name, method, hyperparameters, edits, tensors,
                       base_model_record(model, kind.modules(kind_config, model)), kind_config)


def codebook_pack(model: nn.Module, method: str, hyperparameters: dict, edits: list[Edit], layer: int,
                  entries: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> EditPack:
    """A `codebook` pack at `layer` from per-edit entries `(key, value, radius)`."""
    tensors = {e.id: {codebook.part_name(e.id, part): t for part, t in
                      zip(codebook.PARTS, (*entries[e.id][:2], torch.tensor([float(entries[e.id][2])])))}
               for e in edits}
    key, value, _ = entries[edits[0].id]
    kind_config = codebook.CodebookConfig(layer=layer, key_size=key.numel(), value_size=value.numel()).to_dict()
    kind = codebook.Codebook
    return owning_pack(kind.name, method, hyperparameters, edits, tensors,
                       base_model_record(model, kind.modules(kind_config, model)), kind_config)
