"""The in-memory test hub (tests/hub_server.py) driven by the real huggingface_hub client."""

import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

# conftest.py points HF_ENDPOINT at the test hub before huggingface_hub is imported.
import huggingface_hub
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import HubServer

README = "---\nlicense: mit\ntags:\n- kedit\n---\n# A knowledge pack\n"
WEIGHTS = bytes(range(256)) * 8 + b"\x00\xff\x00"  # binary, not valid utf-8


@pytest.fixture(scope="module")
def endpoint(hub_server):
    url = os.environ["HF_ENDPOINT"]
    assert huggingface_hub.constants.ENDPOINT == url.rstrip("/") == hub_server.url
    return url


def _write(folder: Path, files: dict) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.fixture(scope="module")
def pushed(endpoint, tmp_path_factory):
    """A repo with two commits on main: v1 (tagged "v1") then v2 that changes sub/config.json."""
    api, repo_id = HfApi(), f"tester/pack-{uuid.uuid4().hex[:8]}"
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.startswith(endpoint)
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409

    files = {"README.md": README, "weights.bin": WEIGHTS, "sub/config.json": '{"v": 1}'}
    folder = _write(tmp_path_factory.mktemp("pack"), files)
    v1 = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v1").oid
    api.create_tag(repo_id, tag="v1")
    _write(folder, {"sub/config.json": '{"v": 2}'})
    v2 = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v2").oid
    return {"api": api, "repo_id": repo_id, "v1": v1, "v2": v2, "folder": folder}


def test_commits_move_main_and_tags_stay(pushed):
    api, repo_id, v1, v2 = pushed["api"], pushed["repo_id"], pushed["v1"], pushed["v2"]
    assert len(v1) == 40 and len(v2) == 40 and v1 != v2
    assert api.repo_info(repo_id).sha == v2
    assert api.repo_info(repo_id, revision="v1").sha == v1
    assert api.repo_info(repo_id, revision=v1).sha == v1
    assert sorted(api.list_repo_files(repo_id)) == ["README.md", "sub/config.json", "weights.bin"]
    refs = api.list_repo_refs(repo_id)
    assert {(t.name, t.target_commit) for t in refs.tags} == {("v1", v1)}
    assert {(b.name, b.target_commit) for b in refs.branches} == {("main", v2)}
    history = api.list_repo_commits(repo_id)
    assert [c.commit_id for c in history[:2]] == [v2, v1] and len(history) == 3
    assert [c.title for c in history[:2]] == ["v2", "v1"]
    sizes = {f.path: f.size for f in api.list_repo_tree(repo_id, recursive=True) if hasattr(f, "size")}
    assert sizes["weights.bin"] == len(WEIGHTS)
    top = {(type(f).__name__, f.path) for f in api.list_repo_tree(repo_id)}
    assert top == {("RepoFile", "README.md"), ("RepoFile", "weights.bin"), ("RepoFolder", "sub")}


def test_unchanged_upload_makes_no_commit(pushed):
    api, repo_id = pushed["api"], pushed["repo_id"]
    assert api.upload_folder(repo_id=repo_id, folder_path=pushed["folder"]).oid == pushed["v2"]
    assert api.repo_info(repo_id).sha == pushed["v2"]


def test_snapshot_download_at_each_revision(pushed, tmp_path):
    repo_id, v1, v2 = pushed["repo_id"], pushed["v1"], pushed["v2"]
    latest = Path(snapshot_download(repo_id, cache_dir=tmp_path))
    assert latest.name == v2
    assert (latest / "sub/config.json").read_text() == '{"v": 2}'
    assert (latest / "weights.bin").read_bytes() == WEIGHTS
    assert (latest / "README.md").read_text() == README
    for rev in ("v1", v1):
        old = Path(snapshot_download(repo_id, revision=rev, cache_dir=tmp_path))
        assert old.name == v1 and (old / "sub/config.json").read_text() == '{"v": 1}'
        assert (old / "weights.bin").read_bytes() == WEIGHTS
    offline = Path(snapshot_download(repo_id, cache_dir=tmp_path, local_files_only=True))
    assert offline == latest and (offline / "sub/config.json").read_text() == '{"v": 2}'
    never_fetched = tmp_path / "empty-cache"
    with pytest.raises(Exception):
        snapshot_download(repo_id, cache_dir=never_fetched, local_files_only=True)


def test_hf_hub_download_and_range(pushed, endpoint, tmp_path):
    repo_id, v1 = pushed["repo_id"], pushed["v1"]
    assert Path(hf_hub_download(repo_id, "weights.bin", cache_dir=tmp_path)).read_bytes() == WEIGHTS
    old = hf_hub_download(repo_id, "sub/config.json", revision=v1, cache_dir=tmp_path)
    assert Path(old).read_text() == '{"v": 1}'
    request = urllib.request.Request(f"{endpoint}/{repo_id}/resolve/main/weights.bin", headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206 and response.read() == WEIGHTS[10:20]
        assert response.headers["X-Repo-Commit"] == pushed["v2"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=tmp_path)


def test_branch_with_slash(pushed, tmp_path):
    api, repo_id, v1 = pushed["api"], pushed["repo_id"], pushed["v1"]
    branch = "exp/new-fact"
    api.create_branch(repo_id, branch=branch, revision="v1")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(repo_id, branch=branch)
    assert err.value.response.status_code == 409
    folder = _write(tmp_path / "extra", {"extra.txt": "only on the branch"})
    on_branch = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=branch).oid
    assert api.list_repo_commits(repo_id, revision=branch)[1].commit_id == v1
    snap = Path(snapshot_download(repo_id, revision=branch, cache_dir=tmp_path / "cache"))
    assert snap.name == on_branch
    assert (snap / "extra.txt").read_text() == "only on the branch"
    assert (snap / "sub/config.json").read_text() == '{"v": 1}'
    assert "extra.txt" not in api.list_repo_files(repo_id)


def test_create_commit_deletes_and_stale_parent(pushed, tmp_path):
    api, repo_id = pushed["api"], pushed["repo_id"]
    api.create_branch(repo_id, branch="trim")
    head = api.repo_info(repo_id, revision="trim").sha
    op = huggingface_hub.CommitOperationDelete
    api.create_commit(repo_id, [op("weights.bin")], commit_message="drop", revision="trim", parent_commit=head)
    assert sorted(api.list_repo_files(repo_id, revision="trim")) == ["README.md", "sub/config.json"]
    with pytest.raises(HfHubHTTPError) as err:  # "trim" moved on since `head`
        api.create_commit(repo_id, [op("sub/", is_folder=True)], commit_message="x", revision="trim",
                          parent_commit=head)
    assert err.value.response.status_code == 412
    api.create_commit(repo_id, [op("sub/", is_folder=True)], commit_message="drop folder", revision="trim")
    assert api.list_repo_files(repo_id, revision="trim") == ["README.md"]
    assert len(api.list_repo_files(repo_id)) == 3  # main untouched
    new_card = README.replace("# A knowledge pack", "# Trimmed")  # a README commit is yaml-checked first
    api.upload_file(path_or_fileobj=new_card.encode(), path_in_repo="README.md", repo_id=repo_id, revision="trim")
    assert Path(hf_hub_download(repo_id, "README.md", revision="trim", cache_dir=tmp_path)).read_text() == new_card


def test_missing_things_raise_the_client_errors(pushed, tmp_path):
    api, repo_id = pushed["api"], pushed["repo_id"]
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("tester/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/does-not-exist", "README.md", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "README.md", revision="no-such-branch", cache_dir=tmp_path)


def test_delete_repo(endpoint, tmp_path):
    api, repo_id = HfApi(), f"tester/doomed-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=_write(tmp_path, {"data.txt": "x"}))
    snap = Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=tmp_path / "cache"))
    assert (snap / "data.txt").read_text() == "x"
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(repo_id)  # a model repo of that name does not exist
    api.delete_repo(repo_id, repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(repo_id, repo_type="dataset")
    api.delete_repo(repo_id, repo_type="dataset", missing_ok=True)


def test_free_port_and_unknown_route():
    with HubServer().start() as hub:
        assert hub.port > 0 and hub.url == f"http://127.0.0.1:{hub.port}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{hub.url}/api/no-such-route")
        assert err.value.code == 404 and "error" in json.loads(err.value.read())
