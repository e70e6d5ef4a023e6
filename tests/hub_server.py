"""A small Hub-protocol HTTP server so tests can drive the *real* huggingface_hub client on 127.0.0.1.

It implements what huggingface_hub 2.x uses for create_repo, repo_info/model_info, list_repo_tree, list_repo_refs,
create_branch, preupload, the git-LFS batch API (basic transfer + verify), commit (NDJSON), validate-yaml and
resolve/download, with git-like history: every commit has a 40-hex sha, branches and ``refs/pr/N`` point at commits,
and old commits stay readable. Xet is not implemented, so clients must run with Xet disabled.

Auth follows the Hub: a valid ``Authorization: Bearer`` token is required for writes and for private repos; an
unknown token is refused with 401 on every request. Test hooks: :meth:`HubServer.inject` fails or drops the next
requests of a route, ``stats`` counts stored LFS objects and commits, ``downloads`` lists files served by GET.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Patterns a new Hub repo's default .gitattributes stores with LFS (a subset).
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.onnx", "*.msgpack",
                "*.npy", "*.npz", "*.pkl", "*.model", "*.zip", "*.gz", "*.tar")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
REGULAR_MAX = 10 * 1024 * 1024  # the Hub sends anything bigger than 10 MiB to LFS
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_SHA = re.compile(r"[0-9a-f]{40}")
_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), name) for m, p, name in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("GET", rf"/api/models/{_REPO}/refs", "refs"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", "branch"),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_put"),
        ("POST", rf"/lfs-verify/{_REPO}", "lfs_verify"),
        ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(frozen=True)
class Entry:
    size: int
    git_oid: str  # git blob sha1; for LFS files, of the pointer file (as on the Hub)
    sha256: str | None = None  # LFS oid, None for regular git files

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size)) if self.sha256 else 0


@dataclass
class Commit:
    sha: str
    parent: str | None
    tree: dict[str, Entry]
    title: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    root: Path  # objects/<sha256> for LFS objects, objects/<git sha1> for regular blobs
    created: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str:
        rev = rev.removeprefix("refs/heads/")
        if rev in self.branches:
            return self.branches[rev]
        if (m := re.fullmatch(r"refs/pr/(\d+)", rev)) and int(m[1]) in self.prs:
            return self.prs[int(m[1])]
        if _SHA.fullmatch(rev) and rev in self.commits:
            return rev
        raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def obj(self, key: str) -> Path:
        return self.root / "objects" / key


@dataclass
class Fault:
    route: str
    count: int
    status: int
    drop: bool
    skip: int


class HubServer:
    """In-process Hub. ``tokens`` is a set of valid tokens (user ``user``) or a ``{token: username}`` dict."""

    def __init__(self, root: Path, tokens: Iterable[str] | dict[str, str] = ("secret",)) -> None:
        self.root = Path(root)
        self.tokens = dict(tokens) if isinstance(tokens, dict) else {t: "user" for t in tokens}
        self.repos: dict[str, Repo] = {}
        self.stats: Counter[str] = Counter()  # lfs_uploaded, commits, and requests:<route>
        self.downloads: list[tuple[str, str]] = []  # (repo_id, path) served by GET resolve
        self.lock = threading.RLock()
        self._faults: list[Fault] = []
        self._secret = secrets.token_bytes(16)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- test hooks ----
    def inject(self, route: str, count: int = 1, *, status: int = 500, drop: bool = False, skip: int = 0) -> None:
        """Fail the next ``count`` requests of ``route`` (after letting ``skip`` through): answer ``status``,
        or with ``drop`` close the connection without any response."""
        with self.lock:
            self._faults.append(Fault(route, count, status, drop, skip))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def _take_fault(self, route: str) -> Fault | None:
        with self.lock:
            for f in self._faults:
                if f.route == route and f.count > 0:
                    if f.skip > 0:
                        f.skip -= 1
                        return None
                    f.count -= 1
                    return f
        return None

    # ---- direct repo access (seeding and assertions) ----
    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                raise HttpError(409, "You already created this model repo")
            repo = Repo(repo_id, private, self.root / "repos" / repo_id.replace("/", "--"))
            (repo.root / "objects").mkdir(parents=True)
            self.repos[repo_id] = repo
            sha = self._commit(repo, None, {".gitattributes": self._put_regular(repo, GITATTRIBUTES)}, "initial commit")
            repo.branches["main"] = sha
            return repo

    def put_files(self, repo_id: str, files: dict[str, bytes], *, lfs: Iterable[str] = (), branch: str = "main",
                  message: str = "seed") -> str:
        """Commit ``files`` straight into a branch, bypassing HTTP; paths in ``lfs`` are stored as LFS."""
        with self.lock:
            repo = self.repos[repo_id]
            tree = dict(repo.commits[repo.branches[branch]].tree)
            for path, data in files.items():
                tree[path] = self._put_lfs(repo, data) if path in set(lfs) else self._put_regular(repo, data)
            repo.branches[branch] = self._commit(repo, repo.branches[branch], tree, message)
            return repo.branches[branch]

    def tree(self, repo_id: str, rev: str = "main") -> dict[str, Entry]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(rev)].tree)

    def read(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        repo = self.repos[repo_id]
        e = self.tree(repo_id, rev)[path]
        return repo.obj(e.sha256 or e.git_oid).read_bytes()

    # ---- storage ----
    def _put_regular(self, repo: Repo, data: bytes) -> Entry:
        oid = git_blob_sha1(data)
        repo.obj(oid).write_bytes(data)
        return Entry(len(data), oid)

    def _put_lfs(self, repo: Repo, data: bytes) -> Entry:
        oid = hashlib.sha256(data).hexdigest()
        repo.obj(oid).write_bytes(data)
        return Entry(len(data), git_blob_sha1(lfs_pointer(oid, len(data))), oid)

    def _commit(self, repo: Repo, parent: str | None, tree: dict[str, Entry], title: str) -> str:
        digest = "".join(f"{p}\0{e.git_oid}\n" for p, e in sorted(tree.items()))
        sha = hashlib.sha1(f"{parent}\n{digest}\n{title}\n{time.time_ns()}\n{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, tree, title, _now())
        return sha

    def sign(self, repo_id: str, oid: str) -> str:
        return hmac.new(self._secret, f"{repo_id}:{oid}".encode(), "sha256").hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response carries Content-Length
    timeout = 10  # idle keep-alive connections close, so stopped servers do not pin threads forever

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    # ---- plumbing ----
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():  # header values must be one latin-1 line
            self.send_header(k, " ".join(v.splitlines()).encode("latin-1", "replace").decode("latin-1"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._read_body() if self.command in ("POST", "PUT") else b""
        found = next(((n, m) for meth, pat, n in ROUTES if meth == self.command and (m := pat.fullmatch(url.path))),
                     None)
        if found is None:
            return self._send(404, {"error": f"no route for {self.command} {url.path}"})
        name, m = found
        self.hub.stats[f"requests:{name}"] += 1
        if fault := self.hub._take_fault(name):
            if fault.drop:  # simulate a network cut: no status line at all
                self.close_connection = True
                return
            return self._send(fault.status, {"error": f"injected failure ({name})"})
        args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
        try:
            getattr(self, f"h_{name}")(body=body, **args)
        except HttpError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message}, headers)
        except Exception as e:  # a server bug must surface as a 500, not as a dropped connection the client retries
            self._send(500, {"error": f"server bug: {type(e).__name__}: {e}"})

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        user = self.hub.tokens.get(auth.removeprefix("Bearer ").strip())
        if user is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            # Like the Hub, a private repo is indistinguishable from a missing one without credentials.
            raise HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and user is None:
            raise HttpError(401, "You must be authenticated to write to this repository")
        return repo

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as e:
            raise HttpError(400, f"invalid JSON body: {e}") from None

    # ---- API ----
    def h_whoami(self, body: bytes) -> None:
        if (user := self._user()) is None:
            raise HttpError(401, "Invalid user token.")
        self._send(200, {"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token"}})

    def h_create_repo(self, body: bytes) -> None:
        if (user := self._user()) is None:
            raise HttpError(401, "You must be authenticated to create a repository")
        req = self._json(body)
        if req.get("type", "model") != "model":
            raise HttpError(400, "this test Hub only hosts model repos")
        repo_id = f"{req.get('organization') or user}/{req['name']}"
        private = req.get("visibility") == "private" or bool(req.get("private"))
        url = f"{self.hub.endpoint}/{repo_id}"
        try:
            self.hub.create_repo(repo_id, private=private)
        except HttpError as e:
            return self._send(409, {"error": e.message, "url": url})
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def h_validate_yaml(self, body: bytes) -> None:
        content = self._json(body).get("content", "")
        errors: list[dict[str, str]] = []
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        try:
            meta = yaml.safe_load(m[1]) if m else {}
        except yaml.YAMLError as e:
            meta, errors = {}, [{"message": f"invalid YAML: {e}"}]
        if not isinstance(meta, dict):
            meta, errors = {}, [{"message": "metadata must be a YAML mapping"}]
        if "base_model_relation" in meta and meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
            errors.append({"message": f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}'})
        if "base_model" in meta and not isinstance(meta["base_model"], (str, list)):
            errors.append({"message": '"base_model" must be a string or a list of strings'})
        warnings = [] if m else [{"message": "empty or missing yaml metadata in repo card"}]
        self._send(400 if errors else 200, {"errors": errors, "warnings": warnings})

    def h_repo_info(self, body: bytes, repo: str, rev: str = "main") -> None:
        r = self._repo(repo)
        with self.hub.lock:
            commit = r.commits[r.resolve(rev)]
        card = _front_matter(r, commit)
        blobs = self.query.get("blobs") in ("1", "true", "True")
        siblings = [{"rfilename": p, **({"size": e.size, "blobId": e.git_oid} if blobs else {}),
                     **({"lfs": {"sha256": e.sha256, "size": e.size, "pointerSize": e.pointer_size}}
                        if blobs and e.sha256 else {})} for p, e in sorted(commit.tree.items())]
        self._send(200, {
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "author": repo.split("/")[0], "sha": commit.sha, "lastModified": commit.date, "createdAt": r.created,
            "private": r.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": list(card.get("tags") or []), "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"), "cardData": card or None, "siblings": siblings,
        })

    def h_tree(self, body: bytes, repo: str, rev: str, path: str = "") -> None:
        r = self._repo(repo)
        with self.hub.lock:
            commit = r.commits[r.resolve(rev)]
        recursive = self.query.get("recursive") in ("1", "true", "True")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        files = {p: e for p, e in commit.tree.items() if p.startswith(prefix)}
        if prefix and not files:
            raise HttpError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        dirs: dict[str, list[str]] = {}
        for p, e in files.items():
            parts = p[len(prefix):].split("/")
            for i in range(1, len(parts)):
                dirs.setdefault(prefix + "/".join(parts[:i]), []).append(e.git_oid)
        out: list[dict[str, Any]] = []
        for d, oids in sorted(dirs.items()):
            if recursive or "/" not in d[len(prefix):]:
                out.append({"type": "directory", "oid": hashlib.sha1("".join(sorted(oids)).encode()).hexdigest(),
                            "size": 0, "path": d})
        for p, e in sorted(files.items()):
            if recursive or "/" not in p[len(prefix):]:
                item: dict[str, Any] = {"type": "file", "oid": e.git_oid, "size": e.size, "path": p}
                if e.sha256:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
                out.append(item)
        self._send(200, out)

    def h_refs(self, body: bytes, repo: str) -> None:
        r = self._repo(repo)
        with self.hub.lock:
            data = {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in r.branches.items()],
                    "converts": [], "tags": [],
                    "pullRequests": [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                                     for n, s in sorted(r.prs.items())]}
        if self.query.get("include_prs") not in ("1", "true", "True"):
            data.pop("pullRequests")
        self._send(200, data)

    def h_branch(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        with self.hub.lock:
            if rev in r.branches:
                raise HttpError(409, f"Branch {rev} already exists")
            r.branches[rev] = r.resolve(self._json(body).get("startingPoint") or "main")
        self._send(200, {})

    def h_preupload(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        with self.hub.lock:
            tree = r.commits[r.resolve(rev)].tree
        files = []
        for f in self._json(body).get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = (any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
                   or f.get("size", 0) > REGULAR_MAX or b"\0" in sample)
            e = tree.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": (e.sha256 or e.git_oid) if e else None})
        self._send(200, {"files": files, "commitOid": r.resolve(rev)})

    def h_lfs_batch(self, body: bytes, repo: str) -> None:
        r = self._repo(repo, write=True)
        req = self._json(body)
        if req.get("operation") != "upload":
            raise HttpError(400, "only the upload operation is supported")
        objects = []
        for o in req.get("objects", []):
            oid, size = o.get("oid"), o.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "invalid oid or size"}})
            elif r.obj(oid).exists():  # already stored: no actions, the client skips the upload
                objects.append({"oid": oid, "size": size})
            else:
                href = f"{self.hub.endpoint}/lfs-upload/{repo}/{oid}?size={size}&sig={self.hub.sign(repo, oid)}"
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": href, "expires_in": 3600},
                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{repo}"}}})
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def h_lfs_put(self, body: bytes, repo: str, oid: str) -> None:
        # Pre-signed like an S3 URL: the client sends no Authorization header here.
        if not hmac.compare_digest(self.query.get("sig", ""), self.hub.sign(repo, oid)) or repo not in self.hub.repos:
            raise HttpError(403, "invalid upload signature")
        if str(len(body)) != self.query.get("size") or hashlib.sha256(body).hexdigest() != oid:
            raise HttpError(400, f"uploaded content does not match oid {oid} / size {self.query.get('size')}")
        target = self.hub.repos[repo].obj(oid)
        tmp = target.with_name(f"{oid}.{secrets.token_hex(4)}.part")
        tmp.write_bytes(body)
        tmp.replace(target)  # atomic: a half-written object is never visible
        with self.hub.lock:
            self.hub.stats["lfs_uploaded"] += 1
        self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def h_lfs_verify(self, body: bytes, repo: str) -> None:
        r = self._repo(repo, write=True)
        req = self._json(body)
        p = r.obj(str(req.get("oid")))
        if not p.exists() or p.stat().st_size != req.get("size"):
            raise HttpError(422, f"object {req.get('oid')} is missing or has the wrong size")
        self._send(200, {})

    def h_commit(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        lines = [self._json(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        create_pr = self.query.get("create_pr") in ("1", "true", "True")
        with self.hub.lock:
            head = r.resolve(rev)
            pr = re.fullmatch(r"refs/pr/(\d+)", rev)
            if not create_pr and not pr and rev.removeprefix("refs/heads/") not in r.branches:
                raise HttpError(400, f"cannot commit to {rev}: not a branch")
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HttpError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(r.commits[head].tree)
            for op in lines[1:]:
                self._apply(r, tree, op.get("key"), op.get("value") or {})
            sha = self.hub._commit(r, head, tree, header.get("summary") or "update")
            pr_url = None
            if create_pr:
                num = max([0, *r.prs]) + 1
                r.prs[num] = sha
                pr_url = f"{self.hub.endpoint}/{repo}/discussions/{num}"
            elif pr:
                r.prs[int(pr[1])] = sha
            else:
                r.branches[rev.removeprefix("refs/heads/")] = sha
            self.hub.stats["commits"] += 1
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.endpoint}/{repo}/commit/{sha}",
                         "hookOutput": "", "pullRequestUrl": pr_url})

    def _apply(self, r: Repo, tree: dict[str, Entry], key: str | None, v: dict[str, Any]) -> None:
        path = str(v.get("path", "")).strip("/")
        if not path:
            raise HttpError(400, f"commit operation {key} has no path")
        if key == "file":
            if v.get("encoding") != "base64":
                raise HttpError(400, "only base64 file content is supported")
            tree[path] = self.hub._put_regular(r, base64.b64decode(v["content"]))
        elif key == "lfsFile":
            oid = str(v.get("oid"))
            if not r.obj(oid).exists():
                raise HttpError(422, f"LFS object {oid} for {path} was never uploaded")
            size = r.obj(oid).stat().st_size
            if v.get("size") not in (None, size):
                raise HttpError(422, f"LFS object {oid} has size {size}, commit says {v.get('size')}")
            tree[path] = Entry(size, git_blob_sha1(lfs_pointer(oid, size)), oid)
        elif key == "deletedFile":
            if tree.pop(path, None) is None:
                raise HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            for p in [p for p in tree if p.startswith(path + "/")]:
                del tree[p]
        else:
            raise HttpError(400, f"unknown commit operation {key!r}")

    def h_resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
        r = self._repo(repo)
        with self.hub.lock:
            sha = r.resolve(rev)
            e = r.commits[sha].tree.get(path)
        if e is None:
            raise HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "ETag": f'"{e.sha256 or e.git_oid}"'}
        if e.sha256:
            headers |= {"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)}
        data = b"" if self.command == "HEAD" else r.obj(e.sha256 or e.git_oid).read_bytes()
        status = 200
        if (rng := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))) and self.command == "GET":
            start, end = int(rng[1]), int(rng[2]) if rng[2] else e.size - 1
            if start >= e.size:
                raise HttpError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{e.size}"})
            data, status = data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{e.size}"
        if self.command == "GET":
            with self.hub.lock:
                self.hub.downloads.append((repo, path))
            return self._send(status, data, headers, "application/octet-stream")
        # HEAD: announce the real size without a body.
        self.send_response(200)
        for k, v in {**headers, "Content-Length": str(e.size), "Content-Type": "application/octet-stream"}.items():
            self.send_header(k, v)
        self.end_headers()


def _front_matter(repo: Repo, commit: Commit) -> dict[str, Any]:
    """The README.md metadata, which the Hub exposes as ``cardData``."""
    e = commit.tree.get("README.md")
    if e is None:
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---", repo.obj(e.sha256 or e.git_oid).read_text(errors="replace"), re.S)
    try:
        meta = yaml.safe_load(m[1]) if m else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def start_hub_server(tmp_path: Path, tokens: Iterable[str] | dict[str, str] = ("secret",)) -> HubServer:
    """Start a Hub on a free 127.0.0.1 port storing repos under ``tmp_path``; call ``.stop()`` when done."""
    return HubServer(Path(tmp_path) / "hub", tokens)


__all__ = ["Entry", "HubServer", "git_blob_sha1", "lfs_pointer", "start_hub_server"]
