"""A tiny in-memory Hugging Face Hub, served over HTTP on 127.0.0.1 for the tests.

There is no internet where the tests run, yet hf_kedit pushes and pulls its packs through the
real `huggingface_hub` client. This server speaks just enough of the Hub's HTTP API for that
client to work unchanged once `HF_ENDPOINT` points at it (set it *before* importing
huggingface_hub, which reads it at import time):

- repos: create (409 when it exists, still with a "url"), delete, info (at a branch, tag or sha);
- commits: `preupload` answers "regular" for every file, so content travels base64 inside the
  ndjson `commit` call and no LFS/Xet endpoint is needed; `parentCommit` and `create_pr` honoured;
- refs: branches, tags, `refs/pr/N`, listing; commit history; tree listing; README yaml check;
- files: HEAD/GET `/{repo}/resolve/{rev}/{path}` (datasets under `/datasets/...`) with `ETag`,
  `X-Repo-Commit` and simple `Range` support; misses carry the `X-Error-Code` the client maps to
  RepositoryNotFoundError / RevisionNotFoundError / EntryNotFoundError.

Everything lives in memory: repos keyed by (repo_type, repo_id), each with its commits
(sha -> files {path: bytes} + parent), branches (name -> sha, "main" starts at an empty commit)
and tags (name -> sha).

    with HubServer().start() as hub:   # or hub = HubServer(port).start(); ...; hub.stop()
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", None: "model"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"  # "org/name", or a bare "name"
_API = r"^/api/(?P<type>models|datasets|spaces)/" + _REPO
_REV = r"(?P<rev>[^/]+)"  # revisions arrive quoted with safe="" (refs%2Fpr%2F1)
_RESOLVE = r"^/(?:(?P<type>datasets|spaces)/)?" + _REPO + r"/resolve/" + _REV + r"/(?P<path>.+)$"
_ROUTES = [  # (method, path regex, handler); the first match wins
    ("POST", r"^/api/repos/create$", "create_repo"),
    ("DELETE", r"^/api/repos/delete$", "delete_repo"),
    ("POST", r"^/api/validate-yaml$", "validate_yaml"),
    ("GET", r"^/api/whoami-v2$", "whoami"),
    ("GET", _API + r"/tree/" + _REV + r"(?:/(?P<path>.*))?$", "tree"),
    ("GET", _API + r"/refs$", "refs"),
    ("GET", _API + r"/commits/" + _REV + "$", "commits"),
    ("POST", _API + r"/preupload/" + _REV + "$", "preupload"),
    ("POST", _API + r"/commit/" + _REV + "$", "commit"),
    ("POST", _API + r"/branch/" + _REV + "$", "create_branch"),
    ("POST", _API + r"/tag/" + _REV + "$", "create_tag"),
    ("GET", _API + r"(?:/revision/" + _REV + ")?$", "repo_info"),
    ("GET", _RESOLVE, "resolve"),
    ("HEAD", _RESOLVE, "resolve"),
]
_USER = "hub-test-user"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _git_oid(data: bytes) -> str:
    """Git blob sha1, as the Hub reports for regular files (and as the client compares)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class _Repo:
    def __init__(self, repo_id: str, private: bool):
        self.id, self.private, self.created = repo_id, private, _now()
        self.commits: dict[str, dict] = {}  # sha -> {"files", "parent", "title", "message", "date"}
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}


class HubServer:
    def __init__(self, port: int = 0):
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.port: int = self._httpd.server_address[1]
        self.url: str = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ state helpers

    def repo(self, type_: str | None, repo_id: str) -> _Repo:
        repo = self.repos.get((_TYPES[type_], repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def resolve(self, repo: _Repo, rev: str) -> str:
        """Branch, tag or full commit sha -> commit sha."""
        sha = repo.branches.get(rev) or repo.tags.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def new_commit(self, repo: _Repo, files: dict, parent: str | None, title: str, message: str = "") -> str:
        seed = f"{repo.id}|{parent}|{time.time_ns()}|{next(self._counter)}"
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = {"files": files, "parent": parent, "title": title, "message": message, "date": _now()}
        return sha

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries a Content-Length

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        self.hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            for verb, pattern, name in _ROUTES:
                match = re.match(pattern, url.path) if verb == method else None
                if match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.hub.lock:
                        return getattr(self, "_" + name)(**args)
            raise HubError(404, f"No route for {method} {url.path}")
        except HubError as err:
            headers = {"X-Error-Message": str(err).encode("ascii", "replace").decode(), **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": str(err)}, err.status, headers)
        except Exception as err:  # a bug here should read as a 500, not as a dropped connection
            self._json({"error": f"test hub failure: {err!r}"}, 500, {"X-Error-Message": "test hub failure"})

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _payload(self) -> dict:
        return json.loads(self.body or b"{}")

    # ------------------------------------------------------------------ repos

    def _create_repo(self):
        data = self._payload()
        name, org = data["name"], data.get("organization")
        repo_id, repo_type = f"{org}/{name}" if org else name, data.get("type") or "model"
        answer = {"url": self.hub.repo_url(repo_type, repo_id), "name": repo_id, "id": repo_id}
        if (repo_type, repo_id) in self.hub.repos:  # the client reads "url" even from the 409
            return self._json({**answer, "error": "You already created this repo"}, 409)
        repo = _Repo(repo_id, bool(data.get("private")) or data.get("visibility") == "private")
        repo.branches["main"] = self.hub.new_commit(repo, {}, None, "initial commit")
        self.hub.repos[(repo_type, repo_id)] = repo
        self._json(answer)

    def _delete_repo(self):
        data = self._payload()
        repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
        if self.hub.repos.pop((data.get("type") or "model", repo_id), None) is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        self._json({})

    def _repo_info(self, type, repo, rev="main"):
        r = self.hub.repo(type, repo)
        sha = self.hub.resolve(r, rev)
        files = r.commits[sha]["files"]
        blobs = self.query.get("blobs", [""])[0].lower() in ("1", "true")
        siblings = [
            {"rfilename": p, **({"size": len(d), "blobId": _git_oid(d)} if blobs else {})}
            for p, d in sorted(files.items())
        ]
        self._json({
            "id": repo, "author": repo.split("/")[0] if "/" in repo else _USER, "sha": sha,
            "private": r.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "createdAt": r.created, "lastModified": r.commits[sha]["date"], "siblings": siblings,
        })

    def _whoami(self):
        self._json({"type": "user", "name": _USER, "fullname": _USER, "orgs": [], "auth": {}})

    def _validate_yaml(self):
        self._json({"errors": [], "warnings": []})

    # ------------------------------------------------------------------ refs and history

    def _refs(self, type, repo):
        r = self.hub.repo(type, repo)

        def refs(names: dict, prefix: str) -> list:
            return [{"name": n, "ref": prefix + n, "targetCommit": s} for n, s in sorted(names.items())]

        branches = {n: s for n, s in r.branches.items() if not n.startswith("refs/pr/")}
        prs = [{"name": n.split("/")[-1], "ref": n, "targetCommit": s}
               for n, s in r.branches.items() if n not in branches]
        self._json({"branches": refs(branches, "refs/heads/"), "tags": refs(r.tags, "refs/tags/"),
                    "converts": [], "pullRequests": prs})

    def _create_branch(self, type, repo, rev):
        r = self.hub.repo(type, repo)
        start = self.hub.resolve(r, self._payload().get("startingPoint") or "main")
        if rev in r.branches:
            raise HubError(409, f"Reference {rev} already exists")
        r.branches[rev] = start
        self._json({})

    def _create_tag(self, type, repo, rev):
        r = self.hub.repo(type, repo)
        sha, tag = self.hub.resolve(r, rev), self._payload()["tag"]
        if tag in r.tags:
            raise HubError(409, f"Tag {tag} already exists")
        r.tags[tag] = sha
        self._json({})

    def _commits(self, type, repo, rev):
        r = self.hub.repo(type, repo)
        sha, history = self.hub.resolve(r, rev), []
        while sha is not None:
            c = r.commits[sha]
            history.append({"id": sha, "title": c["title"], "message": c["message"],
                            "authors": [{"user": _USER}], "date": c["date"]})
            sha = c["parent"]
        self._json(history)

    # ------------------------------------------------------------------ files

    def _tree(self, type, repo, rev, path=""):
        r = self.hub.repo(type, repo)
        files = r.commits[self.hub.resolve(r, rev)]["files"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = self.query.get("recursive", [""])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for p, data in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):  # folders on the way
                folders.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": p, "size": len(data), "oid": _git_oid(data)})
        if prefix and not entries and not folders:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)]
        self._json(entries)

    def _resolve(self, repo, rev, path, type=None):
        r = self.hub.repo(type, repo)
        sha = self.hub.resolve(r, rev)
        data = r.commits[sha]["files"].get(path)
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"ETag": f'"{_git_oid(data)}"', "X-Repo-Commit": sha, "Content-Type": "application/octet-stream",
                   "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET":
            start, end = int(match[1]), min(int(match[2] or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers)
        self._send(200, data, headers)

    def _preupload(self, type, repo, rev):
        r = self.hub.repo(type, repo)
        current = r.commits[self.hub.resolve(r, rev)]["files"] if rev in r.branches else {}
        self._json({"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": _git_oid(current[f["path"]]) if f["path"] in current else None}
            for f in self._payload().get("files", [])
        ]})

    def _commit(self, type, repo, rev):
        r = self.hub.repo(type, repo)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        branch, pr_url = rev, None
        if self.query.get("create_pr", ["0"])[0] in ("1", "true"):
            num = 1 + sum(b.startswith("refs/pr/") for b in r.branches)
            branch, pr_url = f"refs/pr/{num}", f"{self.hub.repo_url(_TYPES[type], repo)}/discussions/{num}"
            r.branches[branch] = self.hub.resolve(r, rev)
        if branch not in r.branches:
            raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
        head = r.branches[branch]
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(r.commits[head]["files"])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                raw = value["content"]
                files[value["path"]] = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            elif key != "header":
                raise HubError(400, f"Unsupported commit operation {key!r} (this test hub takes regular files only)")
        sha = self.hub.new_commit(r, files, head, header.get("summary", ""), header.get("description", ""))
        r.branches[branch] = sha
        self._json({"commitUrl": f"{self.hub.repo_url(_TYPES[type], repo)}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": pr_url, "success": True})
