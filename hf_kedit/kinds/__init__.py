"""Kinds: what a pack holds and how it acts at inference.

A kind is a class with
- `name`: the manifest's `kind` value;
- `validate(pack)`: raise `PackFormatError` if the pack's tensors and
  `kind_config` are not a well-formed pack of this kind (no model needed);
- `modules(kind_config, model)`: names of the modules whose weights a pack
  of that config touches or reads, which its fingerprint must cover;
- `check_model(pack, model)`: raise `IncompatiblePackError` if the pack does
  not fit `model`;
- `Runtime(model)`: the one object per model and kind that carries every
  attached pack of the kind in fused hooks, with `put(name, pack)`,
  `remove(name)`, `merge(name)`, `unmerge(name)`, `merged` (names),
  `enabled`, and `originals` (module name -> the weight before merged packs
  changed it; empty for kinds that never merge). `put`, `remove` and
  `merge` are all or nothing: one that raises has changed nothing. Forward
  calls may run in several threads at once; attaching and removing may not
  overlap them.
The edit stack (`attach.py`) only talks to kinds through this.
"""
from ..errors import PackFormatError
from .basis_intervention import BasisIntervention
from .codebook import Codebook
from .singular_scale import SingularScale
from .steering_map import SteeringMap
from .weight_delta import WeightDelta

KINDS = {kind.name: kind for kind in (WeightDelta, BasisIntervention, SteeringMap, SingularScale, Codebook)}


def kind_named(name: str):
    """The kind class called `name`; `PackFormatError` for an unknown one."""
    if name not in KINDS:
        raise PackFormatError(f"unknown pack kind {name!r}: this hf_kedit knows {sorted(KINDS)}; "
                              "the pack may need a newer hf_kedit")
    return KINDS[name]
