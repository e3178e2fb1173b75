"""What a method carries from one batch of a sequence of edits to the next
(AlphaEdit's keys of earlier edits, UltraEdit's running normalisation), kept
beside the packs between sessions as one safetensors file: the tensors, and in
its metadata the history's kind, the edit count and the fingerprint of the
modules it was made on, so it is never continued on other weights."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import EditRequestError
from ..pack import Edit, check_edits


class History:
    """A sequence's state: `tensors` (named float32 tensors), `n_edits` made so
    far, `base_model` (the fingerprint record of the edited modules, from the
    first batch) and, for histories whose every pack holds the whole sequence
    (`replaces_packs`), the `edits` made so far. Subclasses name their `kind`.

    Example:
        >>> history.save("edits-history.safetensors")
        >>> history = EditedKeys.load("edits-history.safetensors")
    """

    kind = "history"

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, n_edits: int = 0,
                 base_model: dict | None = None, edits: list[Edit] | None = None):
        self.tensors, self.n_edits, self.base_model = dict(tensors or {}), n_edits, base_model
        self.edits = list(edits or [])

    @property
    def replaces_packs(self) -> bool:
        """Whether the next batch's pack holds every edit so far and so takes the
        place of the last one (attach it after removing that), rather than joining it."""
        return False

    def check(self, record: dict) -> None:
        """`EditRequestError` if this history was made on modules whose weights differ
        from `record`'s (a `base_model_record`); else adopt `record` if it is the first."""
        if self.base_model is None:
            self.base_model = record
        elif self.base_model["fingerprint"] != record["fingerprint"]:
            raise EditRequestError(f"this {type(self).__name__} was made on other weights of the edited modules: "
                                   f"start an empty {type(self).__name__}() for this model, or load the one saved "
                                   "with its packs")

    def save(self, path: str | Path) -> None:
        """Write the history to one safetensors file."""
        save_file({name: t.contiguous() for name, t in self.tensors.items()}, str(path),
                  metadata={"format": "pt", "history": self.kind, "n_edits": str(self.n_edits),
                            "base_model": json.dumps(self.base_model),
                            "edits": json.dumps([asdict(e) for e in self.edits])})

    @classmethod
    def load(cls, path: str | Path) -> "History":
        """What `save` wrote; `EditRequestError` if the file is not such a file or holds another kind."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name).clone() for name in f.keys()}  # own memory, not the mapped file
            kind, n_edits, base_model = metadata["history"], int(metadata["n_edits"]), json.loads(
                metadata["base_model"])
            edits = [Edit(**record) for record in json.loads(metadata.get("edits", "[]"))]
            check_edits(edits, EditRequestError)
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
            raise EditRequestError(f"{path} is not a file {cls.__name__}.save wrote ({type(e).__name__}: {e})") \
                from None
        if kind != cls.kind:
            raise EditRequestError(f"{path} holds a {kind} history, not a {cls.kind} one")
        if not all(t.dtype == torch.float32 for t in tensors.values()):
            raise EditRequestError(f"{path}: every tensor of a history is float32")
        return cls(tensors, n_edits, base_model, edits)
