"""Publishing converted models to the Hugging Face Hub and fetching models from it.

Everything goes through huggingface_hub so the usual configuration applies: tokens from ``--token``, ``HF_TOKEN`` or
the login cache, the endpoint from ``HF_ENDPOINT``, the download cache from ``HF_HOME``/``HF_HUB_CACHE``, and
``HF_HUB_OFFLINE``. A push never writes into the local folder; it only uploads files whose content differs from the
target revision, retries transient failures (already-stored LFS objects are not sent again, so a retried or re-run
push resumes), and checks the committed tree against local sha256/git hashes before reporting success.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from qformat.errors import QformatError, shorten
from qformat.format.container import INDEX_NAME, QUANT_METHOD, SIDE_FILES
from qformat.model_card import render_model_card

log = logging.getLogger(__name__)
T = TypeVar("T")

# What loading a qformat (or plain HF) model needs; weights are added from the index once it is known.
MODEL_FILE_PATTERNS = sorted({"config.json", INDEX_NAME, "README.md", *SIDE_FILES})
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
BACKOFF_S = 2.0  # first retry delay; doubles per attempt (bounded by max_attempts)
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_QUERY = re.compile(r"\?[^\s']*")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class HubError(QformatError):
    """A Hub operation failed; the message says what to do. The local folder is never left modified."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str  # the branch pushed to, or the PR ref (refs/pr/N) with create_pr
    commit_sha: str
    commit_url: str | None  # None when nothing had changed and no commit was made
    pr_url: str | None
    uploaded: tuple[str, ...]
    skipped: tuple[str, ...]  # identical content already on the Hub


# ---------------------------------------------------------------------------------------------------------- push


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_NAME_BYTES = 255  # a file name longer than this cannot be opened on common filesystems


def validate_model_folder(folder: str | os.PathLike[str]) -> list[str]:
    """Check ``folder`` is a complete qformat model folder; return its files (posix paths) to upload.

    Every problem (a missing or malformed config, index or shard header, an unusable file name) is a one-line
    :class:`HubError` naming the file.
    """
    folder = Path(folder)
    try:
        return _validate_model_folder(folder)
    except OSError as e:  # e.g. a path over the system's length limit
        raise HubError(f"cannot read {shorten(e.filename or folder)}: {e.strerror or e}") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{shorten(path)} is not a valid JSON object: {shorten(e, 200)}") from None
    if not isinstance(value, dict):
        raise HubError(f"{shorten(path)} is not a valid JSON object: it holds a {type(value).__name__}")
    return value


def _plain_file_name(name: str) -> bool:
    return (bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and "\0" not in name
            and len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES)


def _validate_model_folder(folder: Path) -> list[str]:
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise HubError(f"{shorten(folder)} is not a directory")
    if not cfg_path.is_file():
        raise HubError(f"{shorten(folder)} is not a model folder: config.json is missing")
    qc = _read_json_object(cfg_path).get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        raise HubError(f"{shorten(cfg_path)}: quantization_config.quant_method is {shorten(repr(method), 60)}, "
                       "expected 'qformat'; convert the model with `qformat convert` before pushing")
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in
                                                                         weight_map.values()):
            raise HubError(f"{shorten(index)} has no valid weight_map (tensor name -> shard file name)")
        shards = sorted(set(weight_map.values()))
        bad = next((s for s in shards if not _plain_file_name(s)), None)
        if bad is not None:
            raise HubError(f"{shorten(index)} names the shard {shorten(repr(bad), 80)}: not a plain file name of "
                           f"at most {MAX_NAME_BYTES} bytes")
    else:
        shards = ["model.safetensors"]
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise HubError(f"{shorten(folder)} is incomplete: missing weight file(s) "
                       f"{shorten(', '.join(missing), 200)}")
    for s in shards:
        _check_safetensors(folder / s)
    # Hidden entries (.cache from local_dir downloads, .git, editor files) are not part of the model.
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _check_safetensors(path: Path) -> None:
    """Catch truncated files (an interrupted conversion or copy) and malformed headers before publishing them."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= min(size - 8, MAX_HEADER_BYTES) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise HubError(f"{shorten(path)} is not a valid safetensors file (bad header)")
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise HubError(f"{shorten(path)} is not a valid safetensors file (bad header: tensor "
                           f"{shorten(repr(name), 80)} has no valid data_offsets)")
        ends.append(offsets[1])
    end = max(ends, default=0)
    if 8 + n + end != size:
        raise HubError(f"{shorten(path)} is truncated or corrupt: header describes {8 + n + end} bytes, file has "
                       f"{size}")


def _check_recorded_checksums(folder: Path, local: dict[str, tuple[str, str]]) -> None:
    """A shard whose sha256 differs from the one config.json recorded at conversion is corrupted: do not publish it.
    (The hashes were computed for the upload anyway, so this costs nothing.)"""
    qc = _read_json_object(folder / "config.json").get("quantization_config")
    files = qc.get("files") if isinstance(qc, dict) else None
    if not isinstance(files, dict):
        return
    for shard, entry in sorted(files.items()):
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if shard in local and local[shard][0] != expected:
            raise HubError(f"{shorten(folder / shard)} does not match the sha256 config.json recorded when it was "
                           "written: the shard was changed or corrupted since; convert again (or restore it) "
                           "before pushing")


def _file_hashes(data_or_path: bytes | Path) -> tuple[str, str]:
    """(sha256, git blob sha1): the Hub identifies LFS files by the first and regular git files by the second."""
    if isinstance(data_or_path, bytes):
        blob = hashlib.sha1(b"blob %d\0" % len(data_or_path) + data_or_path).hexdigest()
        return hashlib.sha256(data_or_path).hexdigest(), blob
    h256 = hashlib.sha256()
    h1 = hashlib.sha1(b"blob %d\0" % data_or_path.stat().st_size)
    with open(data_or_path, "rb") as f:
        while chunk := f.read(1 << 20):
            h256.update(chunk)
            h1.update(chunk)
    return h256.hexdigest(), h1.hexdigest()


def _remote_hashes(api: HfApi, repo_id: str, revision: str) -> dict[str, tuple[str | None, str]]:
    """path -> (LFS sha256 or None, git blob id) at ``revision``."""
    return {f.path: (f.lfs.sha256 if f.lfs else None, f.blob_id)
            for f in api.list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(f, RepoFile)}


def _same(remote: tuple[str | None, str] | None, local: tuple[str, str]) -> bool:
    return remote is not None and (remote[0] == local[0] if remote[0] else remote[1] == local[1])


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    max_attempts: int = 3,
    base_model: str | None = None,
) -> PushResult:
    """Upload a converted qformat folder to ``repo_id`` in one commit (or one pull request with ``create_pr``).

    Without ``revision`` the repo is created if needed; with it, the repo must exist and the branch is created from
    ``main`` if missing. A README.md model card is generated (in memory) when the folder has none. ``base_model``:
    the Hub id the model derives from, set as the uploaded card's ``base_model`` (``base_model_relation:
    quantized``) whatever the folder's card says; the local folder is not modified.
    """
    folder = Path(folder)
    files = validate_model_folder(folder)
    local = {p: _file_hashes(folder / p) for p in files}
    _check_recorded_checksums(folder, local)
    token = _resolve_token(token)
    endpoint = _endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token, library_name="qformat")
    branch = revision or "main"

    with _hub_errors(endpoint, repo_id, "push to"):
        if revision in (None, constants.DEFAULT_REVISION):
            repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True).repo_id
        else:
            try:
                api.repo_info(repo_id)
            except RepositoryNotFoundError as e:
                raise HubError(f"repository {repo_id} does not exist on {endpoint} (or the token cannot see it); "
                               "push once without --revision to create it, then push to a revision") from e
            if not revision.startswith("refs/"):  # pushing to refs/pr/N adds to an existing PR
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = _remote_hashes(api, repo_id, branch)

    card = None
    if "README.md" not in local:
        card = render_model_card(folder, source_card_metadata=_source_card(api, folder), repo_id=repo_id).encode()
    if base_model is not None:
        card = with_base_model(card.decode() if card is not None else (folder / "README.md").read_text(),
                               base_model).encode()
    if card is not None:
        local["README.md"] = _file_hashes(card)
    changed = [p for p in local if not _same(remote.get(p), local[p])]
    skipped = tuple(p for p in local if p not in changed)
    if not changed:
        log.info("%s@%s already has identical content; nothing to push", repo_id, branch)
        with _hub_errors(endpoint, repo_id, "read"):
            sha = api.repo_info(repo_id, revision=branch).sha or ""
        return PushResult(repo_id, branch, sha, None, None, (), skipped)

    def commit() -> Any:
        # Fresh operations each attempt; objects stored by a failed attempt are reported present by the LFS
        # batch API and not sent again. Note: a retried create_pr whose first response was lost may open a second PR.
        ops = [CommitOperationAdd(p, card if p == "README.md" and card is not None else str(folder / p))
               for p in changed]
        for op in ops:  # reuse our hashes so multi-GB shards are not read once more just to hash them
            op.upload_info.sha256 = bytes.fromhex(local[op.path_in_repo][0])
        return api.create_commit(repo_id, ops, commit_message=message or _default_message(folder),
                                 revision=revision, create_pr=create_pr)

    info = _with_retries(commit, max_attempts, endpoint, repo_id, folder)
    target = info.pr_revision or branch
    with _hub_errors(endpoint, repo_id, "verify"):
        after = _remote_hashes(api, repo_id, info.oid)
    bad = [p for p in local if not _same(after.get(p), local[p])]
    if bad:
        raise HubError(f"checksum verification failed after pushing to {repo_id}@{target} (commit {info.oid}): "
                       f"{', '.join(bad)} differ from the local files; push again to repair")
    return PushResult(repo_id, target, info.oid, info.commit_url, info.pr_url, tuple(changed), skipped)


def _with_retries(fn: Callable[[], T], max_attempts: int, endpoint: str, repo_id: str, folder: Path) -> T:
    for attempt in range(1, max(1, max_attempts) + 1):
        try:
            return fn()
        except Exception as e:  # classified below; anything non-transient is re-raised as a HubError at once
            if not _is_transient(e):
                raise _translate(e, endpoint, repo_id, "push to") from e
            if attempt >= max_attempts:
                raise HubError(
                    f"push to {repo_id} on {endpoint} was interrupted after {attempt} attempt(s): {_describe(e)}. "
                    f"Files already uploaded stay on the Hub and are skipped next time: run the same push again to "
                    f"resume. The local folder {folder} was not modified.") from e
            delay = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("push to %s failed (%s); retrying in %.0fs", repo_id, _describe(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def with_base_model(card_text: str, base_model: str) -> str:
    """A model card with ``base_model`` (+ ``base_model_relation: quantized``) set in its YAML metadata."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(base_model)
    except HFValidationError as e:
        raise HubError(f"--base-model {base_model!r} is not a Hub model id (namespace/name): {e}") from None
    card = ModelCard(card_text)
    card.data.base_model = base_model
    card.data.base_model_relation = "quantized"
    return str(card)


def _default_message(folder: Path) -> str:
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    return f"Upload {qc.get('method', 'qformat')} quantized model (qformat)"


def _source_card(api: HfApi, folder: Path) -> dict[str, Any] | None:
    """Best effort: the source model's card metadata (for its license); a card is still written without it."""
    source = (json.loads((folder / "config.json").read_text()).get("quantization_config") or {}).get("source")
    source_id = source.get("id") if isinstance(source, dict) else None
    if not source_id:
        return None
    try:
        data = api.model_info(source_id, revision=source.get("revision")).card_data
        return data.to_dict() if data is not None else None
    except Exception as e:  # the source may be private, local-only or on another endpoint
        log.info("could not read the model card of %s: %s", source_id, e)
        return None


# ---------------------------------------------------------------------------------------------------------- load


def download_model(
    repo_id: str,
    revision: str | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    allow_patterns: list[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download the files a model needs (config, tokenizer, card, the safetensors named by the index) into the HF
    cache and return the snapshot folder. Other files in the repo (``*.bin``, ``*.gguf``, ...) are not fetched."""
    endpoint = _endpoint(endpoint)
    kw: dict[str, Any] = {"token": token, "endpoint": endpoint, "cache_dir": cache_dir}
    with _download_errors(endpoint, repo_id, revision):
        if allow_patterns is not None:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, **kw))
        meta = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILE_PATTERNS, **kw))
        # Pin the second call to the commit just resolved so metadata and weights come from the same revision.
        pinned = meta.name if _COMMIT_SHA.fullmatch(meta.name) else revision
        index = meta / INDEX_NAME
        weights = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["*.safetensors"]
        return Path(snapshot_download(repo_id, revision=pinned, allow_patterns=weights, **kw))


class _download_errors:
    """Context manager turning what a download raises into a HubError that says what to do."""

    def __init__(self, endpoint: str, repo_id: str, revision: str | None) -> None:
        self.endpoint, self.repo_id, self.revision = endpoint, repo_id, revision

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        if e is None or isinstance(e, HubError) or not isinstance(e, Exception):
            return
        repo_id, revision, endpoint = self.repo_id, self.revision, self.endpoint
        if isinstance(e, LocalEntryNotFoundError):
            if constants.HF_HUB_OFFLINE:
                raise HubError(f"HF_HUB_OFFLINE is set and {repo_id} (revision {revision or 'main'}) is not in the "
                               "local cache; unset HF_HUB_OFFLINE or pass a local folder") from e
            raise HubError(f"could not reach {endpoint} to download {repo_id}; pass a local folder or set "
                           "HF_HUB_OFFLINE=1 with a populated cache") from e
        if isinstance(e, RevisionNotFoundError):
            raise HubError(f"revision {revision!r} not found in {repo_id} on {endpoint}") from e
        if isinstance(e, RepositoryNotFoundError):
            raise HubError(f"model {repo_id} not found on {endpoint}; check the id, and for a private repo set "
                           "HF_TOKEN or log in with `hf auth login`") from e
        raise _translate(e, endpoint, repo_id, "download") from e  # network errors come under several types


# ------------------------------------------------------------------------------------------------ GGUF repositories


@dataclass(frozen=True)
class RepoFiles:
    """The files of a Hub repo at one commit."""

    repo_id: str
    commit: str
    files: tuple[str, ...]

    @property
    def gguf_files(self) -> list[str]:
        return sorted(f for f in self.files if f.lower().endswith(".gguf"))

    @property
    def is_gguf_repo(self) -> bool:
        """A repo of GGUF files (``org/Model-GGUF``: one or several quantizations, no transformers config)."""
        return bool(self.gguf_files) and "config.json" not in self.files


def list_repo_files(repo_id: str, revision: str | None = None, *, token: str | None = None,
                    endpoint: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> RepoFiles:
    """The repo's files at ``revision`` (one API call; nothing is downloaded). With ``HF_HUB_OFFLINE``: the
    ``.gguf`` files and config.json of the cached snapshot."""
    endpoint = _endpoint(endpoint)
    with _download_errors(endpoint, repo_id, revision):
        if constants.HF_HUB_OFFLINE:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.gguf", "config.json"],
                                            local_files_only=True, token=token, cache_dir=cache_dir))
            names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            return RepoFiles(repo_id, folder.name, tuple(sorted(names)))
        info = HfApi(endpoint=endpoint, token=token, library_name="qformat").model_info(repo_id, revision=revision)
        return RepoFiles(repo_id, info.sha or revision or constants.DEFAULT_REVISION,
                         tuple(sorted(s.rfilename for s in info.siblings or ())))


def choose_gguf_file(listing: RepoFiles, gguf_file: str | None = None) -> str:
    """``gguf_file`` when the repo holds it, else the repo's only ``.gguf``; a HubError listing the repo's ``.gguf``
    files when ``gguf_file`` is not one of them, or when there are several and none was chosen."""
    available = listing.gguf_files
    where = f"{listing.repo_id} (revision {listing.commit[:12]})"
    names = ", ".join(available)
    if gguf_file is not None:
        if gguf_file in available:
            return gguf_file
        held = f"its .gguf files: {names}" if available else "it holds no .gguf file"
        raise HubError(f"gguf_file {gguf_file!r} is not in {where}; {held}")
    if len(available) == 1:
        return available[0]
    if not available:
        raise HubError(f"{where} holds no .gguf file")
    raise HubError(f"{where} holds {len(available)} .gguf files; choose one with -p gguf_file=NAME (gguf_file= in "
                   f"Python): {names}")


def download_gguf(repo_id: str, gguf_file: str | None = None, revision: str | None = None, *,
                  token: str | None = None, endpoint: str | None = None,
                  cache_dir: str | os.PathLike[str] | None = None, listing: RepoFiles | None = None) -> Path:
    """Download one GGUF file of a Hub repo (``gguf_file``, or the repo's only one: :func:`choose_gguf_file`, checked
    before any download) into the HF cache and return its path there; no other file of the repo is fetched."""
    endpoint = _endpoint(endpoint)
    listing = listing or list_repo_files(repo_id, revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    name = choose_gguf_file(listing, gguf_file)
    with _download_errors(endpoint, repo_id, revision):
        # By the revision asked for, not the listed commit: the cache then maps that revision (main) to the
        # snapshot, so the same import works offline later.
        return Path(hf_hub_download(repo_id, name, revision=revision, token=token, endpoint=endpoint,
                                    cache_dir=cache_dir))


def resolve_import_source(source: str | os.PathLike[str], revision: str | None = None, *,
                          gguf_file: str | None = None, gguf: bool = False, token: str | None = None,
                          endpoint: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """What an import reads: a local path as is; for a Hub id, one GGUF file (:func:`download_gguf`) when
    ``gguf_file`` is given, ``gguf`` is set (the GGUF importer was named) or the repo holds ``.gguf`` files and no
    config.json; otherwise the model's files (:func:`download_model`)."""
    local = _local_source(source, revision)
    if local is not None:
        return local
    repo_id = os.fspath(source)
    listing = list_repo_files(repo_id, revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    if gguf_file is not None or gguf or listing.is_gguf_repo:
        return download_gguf(repo_id, gguf_file, revision, token=token, endpoint=endpoint, cache_dir=cache_dir,
                             listing=listing)
    return download_model(repo_id, revision, token=token, endpoint=endpoint, cache_dir=cache_dir)


def is_gguf_repo(source: str | os.PathLike[str], revision: str | None = None) -> bool:
    """Whether ``source`` is the Hub id of a GGUF repo (never a local path): an importer reads it, not a method.
    False, without a request, for what is neither a local path nor a Hub id (the caller's own error says so)."""
    try:
        if _local_source(source, revision) is not None:
            return False
    except HubError:
        return False
    return list_repo_files(os.fspath(source), revision).is_gguf_repo


def resolve_model_source(
    source: str | os.PathLike[str],
    revision: str | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local folder or ``.gguf`` file is returned as is; anything shaped like ``namespace/name`` is a Hub id and is
    downloaded (see :func:`download_model`)."""
    local = _local_source(source, revision)
    if local is not None:
        return local
    return download_model(os.fspath(source), revision, token=token, endpoint=endpoint, cache_dir=cache_dir)


def _local_source(source: str | os.PathLike[str], revision: str | None) -> Path | None:
    """The local path ``source`` names, or None when it is a Hub id; a HubError when it is neither."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    try:
        exists = path.exists()
    except OSError as e:  # e.g. a name over the system's length limit: neither a usable path nor a Hub id
        raise HubError(f"cannot use {shorten(repr(text))} as a path: {e.strerror or e}") from None
    if exists:
        if revision is not None:
            raise HubError(f"--revision applies to Hub ids, but {text} is a local path")
        return path
    looks_local = text.endswith(".gguf") or text.startswith((".", "/", "~")) or "\\" in text
    if looks_local or not _REPO_ID.fullmatch(text) or "--" in text or ".." in text:
        raise HubError(f"{shorten(repr(text))} is neither an existing local path nor a Hub model id (namespace/name)")
    return None


# ---------------------------------------------------------------------------------------------------------- errors


def _endpoint(endpoint: str | None) -> str:
    # HF_ENDPOINT is read at call time too: huggingface_hub only reads it at import.
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _resolve_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token found: pass --token, set HF_TOKEN, or log in with `hf auth login` "
                       f"(`huggingface-cli login`); checked $HF_TOKEN and the login cache at {constants.HF_TOKEN_PATH}")
    return token


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _is_network(e: BaseException) -> bool:
    # By class name: huggingface_hub has used requests, httpx and httpx2 across versions.
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "Timeout",
                         "RemoteProtocolError", "ConnectError", "OfflineModeIsEnabled"})


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None) if isinstance(e, HfHubHTTPError) else None


def _is_transient(e: BaseException) -> bool:
    return any(_is_network(c) or _status(c) in TRANSIENT_STATUS for c in _chain(e))


def _describe(e: BaseException) -> str:
    root = next((c for c in _chain(e) if isinstance(c, HfHubHTTPError) or _is_network(c)), e)
    first_line = str(root).strip().splitlines()[0] if str(root).strip() else ""
    first_line = _QUERY.sub("", first_line)  # signed upload URLs are long and carry credentials
    return f"{type(root).__name__}: {first_line}"


def _translate(e: BaseException, endpoint: str, repo_id: str, action: str) -> HubError:
    chain = _chain(e)
    if isinstance(e, HubError):
        return e
    if any(isinstance(c, RevisionNotFoundError) for c in chain):
        return HubError(f"revision not found in {repo_id} on {endpoint}: {_describe(e)}")
    if any(isinstance(c, RepositoryNotFoundError) for c in chain):
        return HubError(f"repository {repo_id} not found on {endpoint}, or the token cannot access it")
    status = next((s for c in chain if (s := _status(c)) is not None), None)
    if status in (401, 403):
        return HubError(f"{endpoint} refused the credentials to {action} {repo_id} (HTTP {status}): check that the "
                        "token (--token, HF_TOKEN or the login cache) is valid and has write access")
    if any(_is_network(c) for c in chain):
        return HubError(f"could not reach {endpoint} to {action} {repo_id}: {_describe(e)}")
    return HubError(f"failed to {action} {repo_id} on {endpoint}: {_describe(e)}")


class _hub_errors:
    """Context manager turning huggingface_hub/network exceptions into HubError with the endpoint and repo named."""

    def __init__(self, endpoint: str, repo_id: str, action: str) -> None:
        self.endpoint, self.repo_id, self.action = endpoint, repo_id, action

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        if e is not None and not isinstance(e, HubError) and isinstance(e, Exception):
            raise _translate(e, self.endpoint, self.repo_id, self.action) from e
