"""A trained MEND editor as an artifact of its own, like shared key statistics:
a folder (or a Hub repo) with the editor's tensors and a manifest that says
which model's weights it was trained on, cached under the hf_kedit cache per
(model weights, edited modules) and read back with a check of every part.

An editor folder:
    kedit_editor.json     manifest: format_version, method, base_model (fingerprint of the
                          edited modules), targets (module names, in order), shapes ([in, out]
                          each), rank, hidden_layers, training (what it was trained on, how
                          long), created_with, and the sha256 of editor.safetensors
    editor.safetensors    the editor's parameters and normalisation buffers (float32)

Example:
    >>> save_editor(editor, "smollm2-mend", model, training={"edits": 12000})
    >>> editor = load_editor(model, "smollm2-mend")          # or a Hub repo id
    >>> push_editor("smollm2-mend", "me/smollm2-mend")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...anatomy import execution_device
from ...cache import cache_root
from ...errors import EditorError
from ...pack.fingerprint import base_model_record
from ...pack.format import read_manifest
from ...pack.hub import file_sha256, push_folder, read_listed_safetensors, resolve_source
from ...version import __version__
from .editor import MENDEditor

EDITOR_MANIFEST = "kedit_editor.json"
EDITOR_WEIGHTS = "editor.safetensors"
EDITOR_FORMAT_VERSION = 1


def cached_editor_dir(model, targets: list[str]) -> Path:
    """Where the local cache keeps the editor of `model`'s `targets` (whether or not it exists)."""
    record = base_model_record(model, targets)
    identity = [record["model_type"], targets, [record["fingerprint"][t]["sha256_bf16"] for t in targets]]
    return cache_root() / "editors" / hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def save_editor(editor: MENDEditor, folder: str | os.PathLike, model, training: dict) -> Path:
    """Write `editor` (trained on `model`) and its manifest into `folder`, replacing
    what an earlier save left there; `training` says what it was trained on."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in editor.state_dict().items()}
    tmp = folder / (EDITOR_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / EDITOR_WEIGHTS)
    manifest = {"format_version": EDITOR_FORMAT_VERSION, "method": "mend",
                "base_model": base_model_record(model, editor.targets), "targets": editor.targets,
                "shapes": [list(s) for s in editor.shapes], "rank": editor.rank,
                "hidden_layers": editor.hidden_layers, "training": training,
                "created_with": f"hf_kedit {__version__}", "sha256": file_sha256(folder / EDITOR_WEIGHTS)}
    (folder / EDITOR_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return folder


def load_editor(model, source: str | os.PathLike | None, targets: list[str]) -> tuple[MENDEditor, dict]:
    """The editor of `model`'s `targets` and its manifest, from `source` (a folder or
    Hub repo id `save_editor`/`push_editor` wrote) or, with None, from the local cache
    (where `train_mend` leaves it). `EditorError` if there is none, it is malformed,
    or it was trained on other weights or other modules."""
    if source is None:
        folder = cached_editor_dir(model, targets)
        if not (folder / EDITOR_MANIFEST).is_file():
            raise EditorError(f"no MEND editor for this model's {targets} in the local cache: train one "
                              "(hf_kedit.methods.learned.mend.train_mend, or `kedit train-mend --data ...`), or "
                              "give editor_source, a folder or Hub repo an editor was pushed to")
        where = folder
    else:
        folder, _ = resolve_source(source, allow_patterns=[EDITOR_MANIFEST, EDITOR_WEIGHTS])
        where = source
    manifest = _read_manifest(folder, where)
    if manifest["targets"] != list(targets):
        raise EditorError(f"{where} is an editor of {manifest['targets']}, not of {list(targets)}: give the "
                          "layers it was trained for (the method's `layers` setting), or train one for these")
    mine = base_model_record(model, targets)["fingerprint"]
    theirs = manifest["base_model"]["fingerprint"]
    for name in targets:
        if theirs.get(name, {}).get("sha256_bf16") != mine[name]["sha256_bf16"]:
            raise EditorError(f"the editor in {where} was trained on another model's {name} "
                              f"({manifest['base_model'].get('name_or_path') or 'unnamed'}): train one on this "
                              "model, or give an editor trained on it")
    shapes = [tuple(s) for s in manifest["shapes"]]
    editor = MENDEditor(targets, shapes, manifest["rank"], manifest["hidden_layers"])
    editor.load_state_dict(_read_tensors(folder, where, manifest, editor))
    return editor.to(execution_device(model, targets[0])), manifest


def push_editor(folder: str | os.PathLike, repo_id: str, branch: str | None = None, private: bool = False,
                token: str | None = None) -> str:
    """Upload an editor folder (`save_editor`'s, or `cached_editor_dir(...)`) to `repo_id`
    as one commit; returns the commit sha."""
    folder = Path(folder)
    manifest = _read_manifest(folder, folder)

    def write(out: Path) -> None:
        for name in (EDITOR_MANIFEST, EDITOR_WEIGHTS):
            shutil.copyfile(folder / name, out / name)

    return push_folder(write, repo_id, f"hf_kedit: MEND editor of {len(manifest['targets'])} weights", branch,
                       private, token)


def _read_manifest(folder: Path, where) -> dict:
    path = folder / EDITOR_MANIFEST
    if not path.is_file():
        raise EditorError(f"{where} holds no {EDITOR_MANIFEST}: it is not an editor folder that save_editor wrote")
    manifest = read_manifest(path, EditorError)
    if manifest.get("format_version") != EDITOR_FORMAT_VERSION:
        raise EditorError(f"{where}: {EDITOR_MANIFEST} has format_version {manifest.get('format_version')!r}; "
                          f"this hf_kedit reads version {EDITOR_FORMAT_VERSION}")
    base_model = manifest.get("base_model")
    fingerprint = base_model.get("fingerprint") if isinstance(base_model, dict) else None
    targets, shapes = manifest.get("targets"), manifest.get("shapes")
    well_formed = (isinstance(fingerprint, dict) and all(isinstance(v, dict) for v in fingerprint.values())
                   and isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
                   and isinstance(shapes, list) and len(shapes) == len(targets)
                   and all(isinstance(s, list) and len(s) == 2 and all(type(n) is int and n > 0 for n in s)
                           for s in shapes)
                   and all(type(manifest.get(k)) is int and manifest[k] >= c for k, c in (("rank", 1),
                                                                                       ("hidden_layers", 0)))
                   and isinstance(manifest.get("sha256"), str))
    if not well_formed:
        raise EditorError(f"{where}: {EDITOR_MANIFEST} must hold base_model.fingerprint (an object per module), "
                          "targets (module names), shapes ([in, out] per target), rank (≥ 1), hidden_layers "
                          "(≥ 0) and sha256; save the editor again")
    return manifest


def _read_tensors(folder: Path, where, manifest: dict, editor: MENDEditor) -> dict[str, torch.Tensor]:
    tensors = read_listed_safetensors(folder / EDITOR_WEIGHTS, manifest["sha256"], where, EditorError,
                                      "save or push the editor again")
    expected = editor.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [n for n in expected if n in tensors and (tensors[n].shape != expected[n].shape
                                                      or tensors[n].dtype != torch.float32)]
    if missing or extra or wrong:
        raise EditorError(f"{where}: {EDITOR_WEIGHTS} does not fit its manifest (missing {missing[:3]}, extra "
                          f"{extra[:3]}, wrong shape or dtype {wrong[:3]}); save the editor again")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise EditorError(f"{where}: {EDITOR_WEIGHTS} holds NaN or inf values; train the editor again")
    return tensors
