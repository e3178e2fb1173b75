"""Attaching, stacking and removing packs: one `EditStack` per model.

Everything that can fail is checked before the model is touched, so a pack
that fails to attach leaves the model exactly as it was.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .errors import EditConflictError, KeditError
from .pack.fingerprint import check_base_model
from .pack.format import collection_paused
from .kinds import kind_named
from .kinds.prompt_calls import set_tokenizer, tokenizer_of
from .pack import EditPack

ON_CONFLICT = ("error", "last")


@dataclass
class AttachedPack:
    name: str
    pack: EditPack
    merged: bool = False

    @property
    def kind(self) -> str:
        return self.pack.kind


class EditStack:
    """The ordered packs attached to one model.

    Example:
        >>> stack = stack_of(model)
        >>> [p.name for p in stack.list()]
        ['user/edits']
        >>> with stack.disable():
        ...     base_logits = model(ids).logits
        >>> stack.remove("user/edits")
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.packs: dict[str, AttachedPack] = {}
        self.runtimes: dict[str, object] = {}
        self._disabled = 0  # depth of nested `disable()` blocks
        self._remerge: list[str] = []  # what the outermost `disable()` unmerged

    def list(self) -> list[AttachedPack]:
        return list(self.packs.values())

    def __len__(self) -> int:
        return len(self.packs)

    def add(self, pack: EditPack, name: str, merge: bool = False, verify: str = "strict",
            on_conflict: str = "error", tokenizer=None) -> None:
        """Attach `pack` as `name` (checks everything first; see `load_edits`)."""
        self._check_enabled("attach a pack")
        with collection_paused():  # attaching makes many objects that stay alive, as reading does
            if tokenizer is None:
                return self._add(pack, name, merge, verify, on_conflict)
            previous = tokenizer_of(self.model)
            set_tokenizer(self.model, tokenizer)
            try:
                self._add(pack, name, merge, verify, on_conflict)
            except Exception:
                set_tokenizer(self.model, previous)
                raise

    def _add(self, pack: EditPack, name: str, merge: bool, verify: str, on_conflict: str) -> None:
        if not isinstance(pack, EditPack):
            raise TypeError(f"expected an EditPack, got {type(pack).__name__}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, got {name!r}")
        if name in self.packs:
            raise KeditError(f"a pack named {name!r} is attached already; remove it first or pass another name=")
        if on_conflict not in ON_CONFLICT:
            raise ValueError(f"on_conflict={on_conflict!r}: use one of {ON_CONFLICT}")
        kind = kind_named(pack.kind)
        kind.check_model(pack, self.model)
        merged_away = {m: w for runtime in self.runtimes.values() for m, w in runtime.originals.items()}
        check_base_model(pack.base_model, self.model, verify=verify, base_weights=merged_away,
                         covers=kind.modules(pack.kind_config, self.model))
        self._check_not_attached(pack)
        pack, superseded = self._resolve_conflicts(pack, on_conflict)

        runtime = self.runtimes.get(pack.kind) or kind.Runtime(self.model)
        runtime.put(name, pack)  # all or nothing
        self.runtimes[pack.kind] = runtime
        self.packs[name] = AttachedPack(name, pack)
        if merge:
            try:
                self.merge(name)
            except Exception:
                self.remove(name)  # a pack that cannot attach as asked leaves no trace
                raise
        for older, edit_ids in superseded.items():
            self.remove(older, edit_ids=edit_ids)

    def remove(self, name: str, edit_ids=None) -> None:
        """Detach pack `name`, or only its edits `edit_ids`; bit-exact either way."""
        self._check_enabled("remove a pack")
        attached = self._get(name)
        runtime = self.runtimes[attached.kind]
        if edit_ids is not None:
            unknown = set(edit_ids) - {e.id for e in attached.pack.edits}
            if unknown:
                raise KeyError(f"pack {name!r} has no edits {sorted(unknown)}")
            keep = [e.id for e in attached.pack.edits if e.id not in set(edit_ids)]
            if keep:
                selected = attached.pack.select(keep)  # refuses to split edits that share tensors, before any change
                merged = attached.merged
                if merged:
                    self.unmerge(name)
                attached.pack = selected
                runtime.put(name, attached.pack)
                if merged:
                    self.merge(name)
                return
        runtime.remove(name)
        del self.packs[name]

    def merge(self, name: str) -> None:
        """Write pack `name` into the weights (kinds that can merge); the touched
        matrices are kept, so `unmerge` restores them bit-exactly."""
        self._check_enabled("merge a pack")
        attached = self._get(name)
        if not attached.merged:
            self.runtimes[attached.kind].merge(name)
            attached.merged = True

    def unmerge(self, name: str) -> None:
        self._check_enabled("unmerge a pack")
        self._unmerge(name)

    def _unmerge(self, name: str) -> None:
        attached = self._get(name)
        if attached.merged:
            self.runtimes[attached.kind].unmerge(name)
            attached.merged = False

    @contextmanager
    def disable(self):
        """Run the base model: hooks off and merged packs taken out of the weights.
        Blocks nest (the packs come back when the outermost ends); attaching,
        removing, merging or unmerging inside one is refused with `KeditError`.

        Example:
            >>> with stack_of(model).disable():
            ...     base_logits = model(ids).logits
        """
        if not self._disabled:
            merged = [p.name for p in self.packs.values() if p.merged]
            for name in merged:
                self._unmerge(name)
            for runtime in self.runtimes.values():
                runtime.enabled = False
            self._remerge = merged
        self._disabled += 1
        try:
            yield self.model
        finally:
            self._disabled -= 1
            if not self._disabled:
                for runtime in self.runtimes.values():
                    runtime.enabled = True
                remerge, self._remerge = self._remerge, []
                for name in remerge:
                    self.merge(name)

    def edits(self):
        """(pack name, edit) for every attached edit, in attach order."""
        return [(p.name, e) for p in self.packs.values() for e in p.pack.edits]

    def _check_enabled(self, action: str) -> None:
        if self._disabled:
            raise KeditError(f"cannot {action} inside stack_of(model).disable(): the block runs the base model and "
                             "restores the packs it found when it ends; leave the block first")

    def _get(self, name: str) -> AttachedPack:
        if name not in self.packs:
            raise KeyError(f"no pack named {name!r} is attached; attached: {list(self.packs)}")
        return self.packs[name]

    def _check_not_attached(self, pack: EditPack) -> None:
        """The same edit (same id, fields and tensors) attached twice would act twice."""
        if not self.packs:  # nothing to compare with: the new pack's tensors need not be hashed yet
            return
        new = set(pack.edit_digests.values())
        twice = [(p.name, edit_id) for p in self.packs.values() for edit_id, digest in p.pack.edit_digests.items()
                 if digest in new]
        if twice:
            where = ", ".join(f"{eid!r} in pack {name!r}" for name, eid in twice[:5])
            raise KeditError(f"this pack's edits are attached already ({where}): the same edit attached twice "
                             "would act twice; remove the attached copy first")

    def _resolve_conflicts(self, pack: EditPack, on_conflict: str):
        """Edits sharing subject and prompt must agree on the target. With "last",
        the newest edit wins: every earlier one that disagrees is dropped (returned
        by pack name; None for an edit of `pack` itself), except one that owns its
        tensors with edits that stay (a joint LoRA fit, BaFT's shared bases): it
        stays attached, with a warning."""
        # only attached edits that share a (subject, prompt) with the new pack are held: attaching the
        # hundredth pack of a sequence must not rebuild an index of every edit before it
        keys = {(e.subject, e.prompt) for e in pack.edits}
        held: dict[tuple, list] = {}
        for p in self.packs.values():
            for e in p.pack.edits:
                if (e.subject, e.prompt) in keys:
                    held.setdefault((e.subject, e.prompt), []).append((p.name, e))
        conflicts, superseded, dropped_here = [], {}, set()
        for e in pack.edits:
            key = (e.subject, e.prompt)
            older = [(name, o) for name, o in held.get(key, []) if o.target_new != e.target_new]
            for older_name, o in older:
                where = f"pack {older_name!r}" if older_name else "the same pack"
                conflicts.append(f"{e.text!r}: {o.target_new!r} ({where}) vs {e.target_new!r}")
                if older_name is None:
                    dropped_here.add(o.id)
                else:
                    superseded.setdefault(older_name, []).append(o.id)
            held[key] = [entry for entry in held.get(key, []) if entry not in older] + [(None, e)]
        if conflicts and on_conflict == "error":
            raise EditConflictError("conflicting edits (same subject and prompt, different target): "
                                    + "; ".join(conflicts) + ". Pass on_conflict='last' to let the newest win")
        bound = []
        for older_name, ids in [*superseded.items(), (None, sorted(dropped_here))]:
            # An edit that owns its tensors with edits that stay cannot come off alone: it stays attached.
            groups = (self.packs[older_name].pack if older_name else pack).sharing_groups
            stays = {i for group in groups if not set(group) <= set(ids) for i in group}
            bound += [f"{i!r} ({f'pack {older_name!r}' if older_name else 'the same pack'})" for i in ids if i in stays]
            if older_name:
                superseded[older_name] = [i for i in ids if i not in stays]
            else:
                dropped_here -= stays
        superseded = {name: ids for name, ids in superseded.items() if ids}
        if conflicts:
            warnings.warn("newest edit wins for: " + "; ".join(conflicts), stacklevel=3)
        if bound:
            warnings.warn(f"earlier edits {', '.join(bound[:5])}{' ...' if len(bound) > 5 else ''} share their "
                          "tensors with edits that stay, so they stay attached beside the newer ones; remove "
                          "their whole pack to drop them", stacklevel=3)
        if dropped_here:
            pack = pack.select([e.id for e in pack.edits if e.id not in dropped_here])
        return pack, superseded


def stack_of(model: nn.Module) -> EditStack:
    """The model's `EditStack` (created empty on first use)."""
    stack = model.__dict__.get("_kedit_stack")
    if stack is None:
        stack = model.__dict__["_kedit_stack"] = EditStack(model)
    return stack


def load_edits(model: nn.Module, source, name: str | None = None, revision: str | None = None,
               merge: bool = False, verify: str = "strict", on_conflict: str = "error",
               token: str | None = None, tokenizer=None) -> nn.Module:
    """Attach an edit pack to `model` and return the model.

    `source` is an `EditPack`, a local folder or a Hub repo id (`revision`: a
    branch, tag or commit sha). The pack is validated in full and checked
    against the model before any hook is added; on failure the model is
    unchanged. `verify="shapes"` skips the weight fingerprint. `tokenizer`: the
    model's tokenizer, kept for packs whose router reads the prompt's text
    (steering packs with a sentence-embedding router or the subject gate).

    Example:
        >>> model = load_edits(model, "user/edits")
        >>> model = load_edits(model, "./more-edits", merge=True)
    """
    if isinstance(source, EditPack):
        pack = source
        name = name or f"pack-{len(stack_of(model)) + 1}"
    else:
        pack = EditPack.from_pretrained(source, revision=revision, token=token)
        name = name or os.fspath(source)
    stack_of(model).add(pack, name, merge=merge, verify=verify, on_conflict=on_conflict, tokenizer=tokenizer)
    return model


def remove_edits(model: nn.Module, name: str, edit_ids=None) -> nn.Module:
    """Detach the pack attached as `name` (or only its edits `edit_ids`)."""
    stack_of(model).remove(name, edit_ids=edit_ids)
    return model
