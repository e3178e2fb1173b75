"""`EditPack`: the format of an edit pack (version 1) and its files.

A pack is a folder, the same on disk and on the Hub:
    README.md                  model card
    kedit_config.json          manifest: format_version, kind, method, base_model, edits, tensors
    kedit_model.safetensors    every tensor, named by edit id and module
Safetensors and JSON only: nothing here can execute code from a file.
"""
from __future__ import annotations

import gc
import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import IncompatiblePackError, PackFormatError
from ..kinds import kind_named
from ..version import __version__
from .card import model_card
from .fingerprint import check_record
from .gguf import write_gguf
from .hub import file_sha256, push_pack, resolve_source

FORMAT_VERSION = 1
CONFIG_NAME = "kedit_config.json"
WEIGHTS_NAME = "kedit_model.safetensors"
CARD_NAME = "README.md"
PACK_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
EDIT_ID = re.compile(r"[A-Za-z0-9_-]+")  # matched whole (fullmatch)
SHA256 = re.compile(r"[0-9a-f]{64}")
OPTIONAL = ("kind_config", "created_with")
MANIFEST_KEYS = ("format_version", "kind", "method", "base_model", "kind_config", "edits", "tensors", "files",
                 "created_with")
METHOD_KEYS = ("name", "hyperparameters")
# A manifest takes 0.6-1 kB per edit (30,000 edits fit); one beyond the size cap is refused before it is parsed.
MAX_MANIFEST_BYTES = 32 << 20
MAX_MANIFEST_DEPTH = 64
_JSON_NAMES = {str: "string", dict: "object", list: "array"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Edit:
    """One fact edit: `prompt` holds `{}` where `subject` goes.

    Example:
        >>> Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    """

    id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    created: str = field(default_factory=_now)
    metrics: dict = field(default_factory=dict)
    tensors: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)


class EditPack:
    """Edits of one kind, made by one method, for one base model.

    Example:
        >>> pack = EditPack.from_pretrained("user/edits")      # or a local folder
        >>> pack.save_pretrained("my-edits")
        >>> pack.push_to_hub("me/my-edits")
    """

    def __init__(self, kind: str, method: str, edits: list[Edit], tensors: dict[str, torch.Tensor],
                 base_model: dict, hyperparameters: dict | None = None, kind_config: dict | None = None):
        self.kind = kind
        self.method = method
        self.edits = list(edits)
        self.tensors = dict(tensors)
        self.base_model = base_model
        self.hyperparameters = hyperparameters or {}
        self.kind_config = kind_config or {}
        self.revision: str | None = None  # the Hub commit a pulled pack came from
        self.validate()

    def __repr__(self) -> str:
        return (f"EditPack(kind={self.kind!r}, method={self.method!r}, edits={len(self.edits)}, "
                f"base_model={self.base_model.get('name_or_path')!r})")

    @property
    def edit_digests(self) -> dict[str, str]:
        """Edit id -> a sha256 of the edit: its id, fields and tensors (names, dtypes,
        shapes, bytes). Two packs holding the same edit give it the same digest."""
        if "_digests" not in self.__dict__:
            tensor_digests, digests = {}, {}
            for e in self.edits:
                h = hashlib.sha256(json.dumps([self.kind, e.id, e.subject, e.prompt, e.target_new]).encode())
                for name in sorted(e.tensors):
                    if name not in tensor_digests:  # edits that share tensors hash them once
                        tensor_digests[name] = _tensor_digest(name, self.tensors[name])
                    h.update(tensor_digests[name])
                digests[e.id] = h.hexdigest()
            self.__dict__["_digests"] = digests
        return self.__dict__["_digests"]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def sharing_groups(self) -> list[list[str]]:
        """The edit ids of each group of edits that own their tensors together
        (BaFT's shared bases, LoRA's joint fit): such edits come off together, never one alone."""
        if "_groups" not in self.__dict__:
            owners: dict[str, list[str]] = {}
            for e in self.edits:
                for name in e.tensors:
                    owners.setdefault(name, []).append(e.id)
            self.__dict__["_groups"] = list({tuple(ids): list(ids) for ids in owners.values() if len(ids) > 1}.values())
        return self.__dict__["_groups"]

    def check_separable(self, edit_ids) -> None:
        """`IncompatiblePackError` if keeping only `edit_ids` would split a group of
        edits that own their tensors together."""
        wanted = set(edit_ids)
        for group in self.sharing_groups:
            kept = wanted.intersection(group)
            if kept and len(kept) != len(group):
                raise IncompatiblePackError(
                    f"edits {sorted(set(group) - kept)[:3]} share their tensors with {sorted(kept)[:3]} "
                    f"({len(group)} edits in all, trained together): they come off together; remove the "
                    "whole group, or the pack")

    def select(self, edit_ids) -> "EditPack":
        """A pack holding only the edits in `edit_ids` (and their tensors);
        `IncompatiblePackError` if that splits edits that share their tensors."""
        self.check_separable(edit_ids)
        wanted = set(edit_ids)
        keep = [e for e in self.edits if e.id in wanted]
        tensors = {name: self.tensors[name] for e in keep for name in e.tensors}
        pack = EditPack(self.kind, self.method, keep, tensors, self.base_model, self.hyperparameters,
                        self.kind_config)
        pack.revision = self.revision
        return pack

    def extend(self, other: "EditPack") -> "EditPack":
        """One pack holding this pack's edits, then `other`'s: how sequential edits
        join an existing pack without retraining it (make `other` with this pack
        attached, so it is trained on what the stack computes). Both must be of one
        kind and method, for the same base model, with compatible `kind_config`s
        (equal, or dicts whose shared keys agree) and distinct edit ids;
        `IncompatiblePackError` otherwise.

        Example:
            >>> load_edits(model, pack, name="old")
            >>> pack = pack.extend(baft_edit(model, tokenizer, new_edits))
        """
        if (other.kind, other.method) != (self.kind, self.method):
            raise IncompatiblePackError(f"a {self.kind} pack made by {self.method} cannot hold the edits of a "
                                        f"{other.kind} pack made by {other.method}: keep them as two packs")
        shared = sorted({e.id for e in self.edits} & {e.id for e in other.edits})
        if shared:
            raise IncompatiblePackError(f"both packs hold edits {shared[:5]}: give the new edits other ids")
        clashing = sorted(set(self.tensors) & set(other.tensors))
        if clashing:
            raise IncompatiblePackError(f"both packs hold tensors named {clashing[:3]} (shared bases of two "
                                        "sequences): keep them as two packs")
        base_model = _merged(self.base_model, other.base_model, "base_model")
        kind_config = _merged(self.kind_config, other.kind_config, "kind_config")
        hyperparameters = (self.hyperparameters if self.hyperparameters == other.hyperparameters
                           else {"packs": _settings_list(self.hyperparameters) + _settings_list(other.hyperparameters)})
        return EditPack(self.kind, self.method, self.edits + other.edits, {**self.tensors, **other.tensors},
                        base_model, hyperparameters, kind_config)

    # ----- validation -------------------------------------------------------------
    def validate(self) -> None:
        """Raise `PackFormatError` unless the pack is well formed: ids unique, each
        tensor owned by one edit or by edits that own the same tensors together,
        finite, and laid out as its kind needs."""
        kind = kind_named(self.kind)
        if not self.edits:
            raise PackFormatError("the pack holds no edits")
        check_edits(self.edits)
        check_record(self.base_model)
        owned: dict[str, Edit] = {}
        for e in self.edits:
            if len(set(e.tensors)) != len(e.tensors):
                raise PackFormatError(f"edit {e.id!r} lists a tensor twice")
            for name in e.tensors:
                first = owned.setdefault(name, e)
                # Edits may own tensors together (trained together), but only all of them alike.
                if first is not e and set(first.tensors) != set(e.tensors):
                    raise PackFormatError(f"edits {first.id!r} and {e.id!r} share tensor {name!r} but not all their "
                                          "tensors: edits that share a tensor must own the same tensors")
        missing, extra = set(owned) - set(self.tensors), set(self.tensors) - set(owned)
        if missing:
            raise PackFormatError(f"edits name tensors the pack does not hold: {sorted(missing)[:5]}")
        if extra:
            raise PackFormatError(f"the pack holds tensors no edit owns: {sorted(extra)[:5]}")
        for name, t in self.tensors.items():
            if t.dtype not in DTYPES.values():
                raise PackFormatError(f"tensor {name!r} has dtype {t.dtype}; packs hold {sorted(DTYPES)}")
        for names in _finite_check_groups(self.tensors):
            if not torch.isfinite(torch.cat([self.tensors[n].reshape(-1) for n in names])).all():
                bad = next(n for n in names if not torch.isfinite(self.tensors[n]).all())
                raise PackFormatError(f"tensor {bad!r} holds NaN or inf values")
        kind.validate(self)

    # ----- files ------------------------------------------------------------------
    def manifest(self) -> dict:
        dtype_names = {v: k for k, v in DTYPES.items()}
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "method": {"name": self.method, "hyperparameters": self.hyperparameters},
            "base_model": self.base_model,
            "kind_config": self.kind_config,
            "edits": [asdict(e) for e in self.edits],
            "tensors": {n: {"shape": list(t.shape), "dtype": dtype_names[t.dtype]} for n, t in self.tensors.items()},
            "created_with": f"hf_kedit {__version__}",
        }

    def save_pretrained(self, save_directory: str | Path, repo_id: str | None = None, overwrite: bool = False) -> Path:
        """Write the pack's three files into `save_directory` (created if needed);
        `repo_id` names the Hub repo in the model card's usage example. A folder
        that holds a pack already is refused (`FileExistsError`) unless `overwrite`."""
        out = Path(save_directory)
        refuse_overwrite(out, PACK_FILES, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in self.tensors.items()}
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        manifest = self.manifest()
        manifest["files"] = {WEIGHTS_NAME: {"sha256": file_sha256(out / WEIGHTS_NAME)}}
        (out / CONFIG_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        (out / CARD_NAME).write_text(model_card(self, repo_id))
        return out

    @classmethod
    def from_pretrained(cls, source: str | Path, revision: str | None = None, token: str | None = None) -> "EditPack":
        """Read and fully validate a pack from a local folder or a Hub repo id.

        Raises `FileNotFoundError` for a path that does not exist and
        `PackFormatError` for anything malformed, naming what is wrong."""
        folder, sha = resolve_source(source, revision=revision, token=token, allow_patterns=list(PACK_FILES))
        pack = read_pack(folder)
        pack.revision = sha
        return pack

    def push_to_hub(self, repo_id: str, branch: str | None = None, private: bool = False,
                    commit_message: str | None = None, token: str | None = None) -> str:
        """Upload the pack as one commit to `repo_id` (on `branch`, default main);
        returns the commit sha."""
        return push_pack(self, repo_id, branch=branch, private=private, commit_message=commit_message, token=token)

    def export_peft(self, save_directory: str | Path, overwrite: bool = False, rank: int | None = None,
                    share: float | None = None) -> Path:
        """Write a PEFT adapter folder equivalent to this pack (weight_delta packs),
        loadable by `peft.PeftModel.from_pretrained(base, save_directory)` and by
        vLLM and TGI. A folder that holds an adapter already is refused
        (`FileExistsError`) unless `overwrite`. With `rank` or `share`, each
        weight's change is compacted to that rank, or to the rank that keeps that
        share of it (truncated SVD): many edits, one adapter of a servable rank."""
        kind = kind_named(self.kind)
        if not hasattr(kind, "export_peft"):
            raise PackFormatError(f"{self.kind} packs have no PEFT equivalent; only weight_delta packs export")
        refuse_overwrite(Path(save_directory), kind.PEFT_FILES, overwrite)
        kind.export_peft(self, save_directory, rank, share)
        return Path(save_directory)

    def export_gguf(self, path: str | Path, overwrite: bool = False, rank: int | None = None,
                    share: float | None = None) -> Path:
        """Write the llama.cpp file equivalent to this pack: a LoRA adapter for a
        weight_delta pack (`llama-cli -m base.gguf --lora path`, llama-cpp-python's
        `lora_path`), a control vector for a uniform steering pack of shifts
        (`actadd` with `site`; `llama-cli --control-vector path`). An existing
        file is refused (`FileExistsError`) unless `overwrite`; `rank`/`share`
        compact a LoRA adapter's changes as in `export_peft`.

        Example:
            >>> pack.export_gguf("edits.gguf")
        """
        path = Path(path)
        if path.exists() and not (overwrite and path.is_file()):
            raise FileExistsError(f"{path} exists already; pass overwrite=True to replace it, or give another path")
        return write_gguf(self, path, rank, share)


def _settings_list(hyperparameters: dict) -> list[dict]:
    """The settings a pack's edits were made with, as a flat list (packs that
    `extend` joined hold one entry per part), so that joins do not nest."""
    return list(hyperparameters["packs"]) if set(hyperparameters) == {"packs"} else [hyperparameters]


def _merged(a, b, where: str):
    """`a` and `b` as one: dicts merge key by key, anything else must be equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {key: _merged(a[key], b[key], f"{where}.{key}") if key in a and key in b else a.get(key, b.get(key))
                for key in {**a, **b}}
    if a != b:
        raise IncompatiblePackError(f"the packs differ in {where} ({a!r} vs {b!r}): they cannot be one pack")
    return a


def refuse_overwrite(folder: Path, names, overwrite: bool) -> None:
    """`FileExistsError` if `folder` holds any of the files `names` and not `overwrite`."""
    present = sorted(n for n in names if (folder / n).exists()) if folder.is_dir() else []
    if present and not overwrite:
        raise FileExistsError(f"{folder} holds {present} already; pass overwrite=True to replace them, "
                              "or give another folder")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; give a folder")


def read_manifest(path: Path, error: type[Exception] = PackFormatError) -> dict:
    """The JSON object in `path` (a pack's manifest, or shared statistics'); `error`
    for a file too large, too deeply nested, not JSON or not an object."""
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise error(f"{path} is {path.stat().st_size} bytes, more than a manifest may be ({MAX_MANIFEST_BYTES} "
                    "bytes): it is not an hf_kedit manifest")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path} is nested deeper than a manifest may be ({MAX_MANIFEST_DEPTH})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise error(f"{path} holds a value that does not parse: {e}") from None
    if _depth(manifest) > MAX_MANIFEST_DEPTH:
        raise error(f"{path} is nested deeper than a manifest may be ({MAX_MANIFEST_DEPTH})")
    if not isinstance(manifest, dict):
        raise error(f"{path} must hold a JSON object")
    return manifest


def _finite_check_groups(tensors: dict[str, torch.Tensor], group_size: int = 1024) -> list[list[str]]:
    """Tensor names in groups of one dtype and device, at most `group_size` each:
    one finiteness check per group instead of one per tensor (a pack of 10,000
    edits holds tens of thousands of small tensors), in groups, so the check's
    copy stays small beside the pack."""
    by_kind: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        by_kind.setdefault((t.dtype, t.device), []).append(name)
    return [names[i:i + group_size] for names in by_kind.values() for i in range(0, len(names), group_size)]


def _depth(value) -> int:
    """How deeply JSON containers nest in `value` (without recursion): level by
    level, keeping only the containers of each, as a manifest is mostly scalars."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        level = [v for item in level for v in (item.values() if isinstance(item, dict) else item)
                 if isinstance(v, (dict, list))]
    return depth


def read_pack(folder: Path) -> EditPack:
    """Read a pack folder, checking every file against the manifest."""
    with collection_paused():
        return _read_pack(folder)


@contextmanager
def collection_paused():
    """Python's cyclic garbage collector off for the block (as it was after). Reading
    a pack of 10,000 edits makes some 100,000 objects that all stay alive, so the
    collector's passes over them, a quarter of the read, free nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_pack(folder: Path) -> EditPack:
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = (f"; it holds {pickles}, but hf_kedit never loads pickle files (they can run code)"
                    if pickles else "")
            raise PackFormatError(f"{folder} is not an edit pack: {path.name} is missing{hint}")
    manifest = read_manifest(config_path)
    if "format_version" not in manifest:
        raise PackFormatError(f"{config_path} has no format_version: it is not an hf_kedit manifest")
    version = manifest["format_version"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise PackFormatError(f"{config_path}: format_version {version!r} is not supported (this hf_kedit "
                              f"reads version {FORMAT_VERSION}); a newer pack needs a newer hf_kedit")
    unknown = sorted(set(manifest) - set(MANIFEST_KEYS))
    if unknown:
        raise PackFormatError(f"{config_path}: unknown keys {unknown[:5]}; a version-{FORMAT_VERSION} manifest "
                              f"holds {list(MANIFEST_KEYS)}")
    for key, typ in (("kind", str), ("method", dict), ("base_model", dict), ("edits", list), ("tensors", dict),
                     ("kind_config", dict), ("files", dict), ("created_with", str)):
        if key in manifest and not isinstance(manifest[key], typ) or key not in manifest and key not in OPTIONAL:
            raise PackFormatError(f"{config_path}: '{key}' must be a JSON {_JSON_NAMES[typ]}")
    kind_named(manifest["kind"])
    method = manifest["method"]
    if set(method) - set(METHOD_KEYS) or not isinstance(method.get("name"), str) \
            or not isinstance(method.get("hyperparameters", {}), dict):
        raise PackFormatError(f"{config_path}: 'method' must be {{\"name\": a string, \"hyperparameters\": an "
                              f"object}}, got keys {sorted(method)}")
    for name, spec in manifest["tensors"].items():
        if not (isinstance(spec, dict) and set(spec) == {"shape", "dtype"} and isinstance(spec["shape"], list)
                and all(type(n) is int and n >= 0 for n in spec["shape"])
                and isinstance(spec["dtype"], str) and spec["dtype"] in DTYPES):
            raise PackFormatError(f"{config_path}: tensors[{name!r}] must be {{\"shape\": [ints], \"dtype\": one "
                                  f"of {sorted(DTYPES)}}}, got {spec!r}")
    if not all(isinstance(e, dict) for e in manifest["edits"]):
        raise PackFormatError(f"{config_path}: every entry of 'edits' must be a JSON object")
    entry = manifest["files"].get(WEIGHTS_NAME)
    if set(manifest["files"]) != {WEIGHTS_NAME} or not isinstance(entry, dict) or set(entry) != {"sha256"} \
            or not isinstance(entry["sha256"], str) or not SHA256.fullmatch(entry["sha256"]):
        raise PackFormatError(f"{config_path}: 'files' must be {{\"{WEIGHTS_NAME}\": {{\"sha256\": 64 hex digits}}}}, "
                              "the check that the weights arrived whole")
    if entry["sha256"] != file_sha256(weights_path):
        raise PackFormatError(f"{weights_path} is corrupted: its sha256 differs from the manifest's")
    tensors = _read_tensors(weights_path, manifest["tensors"])
    try:
        edits = [Edit(**e) for e in manifest["edits"]]
    except TypeError as e:
        raise PackFormatError(f"{config_path}: an edit entry is malformed ({e})") from None
    return EditPack(manifest["kind"], method["name"], edits, tensors, manifest["base_model"],
                    method.get("hyperparameters", {}), manifest.get("kind_config", {}))


def _read_tensors(path: Path, declared: dict) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            missing, extra = set(declared) - names, names - set(declared)
            if missing:
                raise PackFormatError(f"{path.name} lacks tensors the manifest declares: {sorted(missing)[:5]}")
            if extra:
                raise PackFormatError(f"{path.name} holds tensors the manifest does not declare: {sorted(extra)[:5]}")
            for name, spec in declared.items():
                sl = f.get_slice(name)
                shape, dtype = list(sl.get_shape()), sl.get_dtype()
                if shape != spec.get("shape"):
                    raise PackFormatError(f"tensor {name!r} has shape {shape}, the manifest says {spec.get('shape')}")
                if _safetensors_dtype(spec.get("dtype")) != dtype:
                    raise PackFormatError(f"tensor {name!r} has dtype {dtype}, the manifest says {spec.get('dtype')}")
        return load_file(str(path))
    except SafetensorError as e:
        raise PackFormatError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def check_edits(edits: list[Edit], error: type[Exception] = PackFormatError) -> None:
    """Raise `error` unless every edit's fields have their types, subject, prompt
    and target_new are not blank, and the ids are valid and unique. Packs check
    their edits with it, methods their requests (with `EditRequestError`)."""
    for e in edits:
        _check_edit_fields(e, error)
    ids = [e.id for e in edits]
    bad = [i for i in ids if not isinstance(i, str) or not EDIT_ID.fullmatch(i)]
    if bad:
        raise error(f"edit ids must match {EDIT_ID.pattern} (letters, digits, '_' and '-'): {bad[:5]}")
    if len(set(ids)) != len(ids):
        raise error(f"edit ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}; give each edit its own id")


def _check_edit_fields(e: Edit, error: type[Exception]) -> None:
    for name in ("subject", "prompt", "target_new"):
        value = getattr(e, name)
        if not isinstance(value, str) or not value.strip():
            raise error(f"edit {e.id!r}: {name} must be a non-empty string, got {value!r}")
    if e.target_true is not None and not isinstance(e.target_true, str):
        raise error(f"edit {e.id!r}: target_true must be a string or null, got {e.target_true!r}")
    if not isinstance(e.metrics, dict) or not isinstance(e.created, str):
        raise error(f"edit {e.id!r}: metrics must be an object and created a string")
    if not isinstance(e.tensors, list) or not all(isinstance(t, str) for t in e.tensors):
        raise error(f"edit {e.id!r}: tensors must be a list of tensor names, got {e.tensors!r}")


def _tensor_digest(name: str, t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{name}|{t.dtype}|{list(t.shape)}".encode())
    # Flat first: a [n, 1] tensor can be "contiguous" with a column stride ≠ 1.
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def _safetensors_dtype(name) -> str:
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}.get(name, f"unknown:{name}")
