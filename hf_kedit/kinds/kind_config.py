"""The base of the kinds' `kind_config` dataclasses: read from a manifest's dict
with unknown fields refused, checked by the subclass, and parsed once per pack;
and the check that an edit owns exactly the tensors its kind gives it."""
from __future__ import annotations

import copy
from dataclasses import asdict, fields

from ..errors import PackFormatError


class KindConfig:
    """A subclass is a dataclass with `kind` (the kind's name, for messages) and
    `check()`, which raises `PackFormatError` naming the first field that is wrong.

    Example:
        >>> config = SteeringMapConfig.of(pack)          # parsed once, then cached on the pack
        >>> SteeringMapConfig.from_dict({"hidden_size": 576, "scope_size": 576}).to_dict()["metric"]
        'cosine'
    """

    kind = ""

    def check(self) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict):
        """The config in `config`; `PackFormatError` naming the first field that is wrong."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known) if isinstance(config, dict) else config
        if not isinstance(config, dict) or unknown:
            raise PackFormatError(f"{cls.kind} pack: kind_config must be an object with the fields "
                                  f"{sorted(known)}; unknown: {unknown}")
        self = cls(**config)
        self.check()
        return self

    @classmethod
    def of(cls, pack):
        """`pack.kind_config` parsed: validating, checking against a model and
        attaching a pack read it once (again only if the dict was changed since)."""
        cached = pack.__dict__.get("_kind_config")
        if cached is None or cached[0] != pack.kind_config:
            cached = pack.__dict__["_kind_config"] = (copy.deepcopy(pack.kind_config), cls.from_dict(pack.kind_config))
        return cached[1]


def check_owned(edit, expected: set[str], parts: str) -> None:
    """`PackFormatError` unless `edit` owns exactly the tensors `expected` (`parts`
    says which they are, for the message: "map.basis, map.core at layers [1]")."""
    owned = set(edit.tensors)
    if owned != expected:
        raise PackFormatError(f"edit {edit.id!r} must own exactly its {parts}; missing "
                              f"{sorted(expected - owned)[:5]}, unexpected {sorted(owned - expected)[:5]}")
