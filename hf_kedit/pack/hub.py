"""Where a pack or statistics source lives (a folder or a Hub repo), pushing and
pulling. It knows nothing of the files inside: the pack format and
`stats` name them."""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from huggingface_hub.utils import HFValidationError, validate_repo_id


def is_repo_id(text: str) -> bool:
    """Whether `text` is a valid Hub repo id ("name" or "user/name"), by the Hub's own rules.

    Example:
        >>> is_repo_id("user/edits"), is_repo_id("user/..")
        (True, False)
    """
    if not text.isprintable() or any(c.isspace() for c in text):  # huggingface_hub 0.x lets "user/name\n" pass
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") <= 1


def resolve_source(source: str | os.PathLike, revision: str | None = None, token: str | None = None,
                   allow_patterns=None, repo_type: str | None = None) -> tuple[Path, str | None]:
    """A local folder for `source`, and the Hub commit sha it came from (None for
    a local folder). An existing path wins; a path-like string that does not exist
    is a `FileNotFoundError`, never a confusing repo-id error. `repo_type`:
    "dataset" for a dataset repo (a model repo unless told)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a folder or a Hub repo id 'user/name', got {type(source).__name__}: {source!r}")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; give a folder (an edit pack holds kedit_config.json, "
                                    "shared statistics kedit_stats.json) or a Hub repo id")
        return path, None
    text = str(source)
    if isinstance(source, os.PathLike) or text.startswith((".", "/", "~")) or not is_repo_id(text):
        raise FileNotFoundError(f"no such folder: {text} (nor is it a Hub repo id 'user/name')")
    folder = Path(snapshot_download(text, revision=revision, allow_patterns=allow_patterns, token=token,
                                    repo_type=repo_type))
    return folder, folder.name


def push_pack(pack, repo_id: str, branch: str | None = None, private: bool = False,
              commit_message: str | None = None, token: str | None = None) -> str:
    """Upload `pack` to `repo_id` as one commit (creating the repo, and the branch
    from main, if needed); returns the commit sha."""
    return push_folder(lambda folder: pack.save_pretrained(folder, repo_id=repo_id), repo_id,
                       commit_message or f"hf_kedit: {len(pack.edits)} {pack.method} edits", branch, private, token)


def push_folder(write: Callable[[Path], object], repo_id: str, commit_message: str, branch: str | None = None,
                private: bool = False, token: str | None = None) -> str:
    """Upload the files `write(folder)` puts into an empty folder to `repo_id` as
    one commit (creating the repo, and the branch from main, if needed); returns
    the commit sha."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if branch and branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=branch, commit_message=commit_message)
    return info.oid


def pull_folder(repo_id: str, local_dir: str | Path, revision: str | None = None, token: str | None = None,
                allow_patterns=None) -> Path:
    """Download a repo's files (those matching `allow_patterns`) into `local_dir`."""
    return Path(snapshot_download(repo_id, revision=revision, local_dir=str(local_dir),
                                  allow_patterns=allow_patterns, token=token))


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, which manifests record to catch corrupted downloads."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_listed_safetensors(path: Path, sha256: str, where, error: type[Exception], again: str) -> dict:
    """The tensors of a safetensors file a manifest lists with its sha256 (shared
    statistics, a trained editor), or `error` saying it is missing, corrupted or
    unreadable and that the fix is to `again` (e.g. "push the statistics again")."""
    if not path.is_file():
        raise error(f"{where} lacks {path.name}, which its manifest lists; {again}")
    if file_sha256(path) != sha256:
        raise error(f"{where}: {path.name} is corrupted (its sha256 differs from the manifest's); {again}")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise error(f"{where}: {path.name} is not a readable safetensors file ({e})") from None
