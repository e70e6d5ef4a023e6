"""Shard checksums on load: each shard against the sha256 and size config.json recorded, hashed once per file."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import FormatError, LoadError, shorten
from ..format import ModelFolder
from ..format.container import sha256_file

if TYPE_CHECKING:
    pass

VerifyMode = bool | Literal["auto"]

# # config.json's quantization_config.files records {shard: {sha256, size}} at write time. Every load checks them
# (verify="auto"): a shard is hashed once, and the success is remembered by file identity (resolved path, device,
# inode, size, mtime_ns, ctime_ns, expected sha256) in a small JSON cache, so loading the same files again costs a
# stat per shard. Any write to a file changes its ctime (which no user call can set back), so a changed file is
# hashed again. verify=True hashes regardless of the cache; verify=False skips the check (unsafe: a corrupted shard
# then loads and computes garbage).

_SHA256 = re.compile(r"[0-9a-f]{64}")
VERIFY_CACHE_ENTRIES = 1024  # entries of files that still exist; the oldest are dropped beyond this
_warned_unverified: set[str] = set()


def verify_cache_path() -> Path:
    """``$QFORMAT_CACHE/verified.json``, by default ``~/.cache/qformat/verified.json``."""
    base = os.environ.get("QFORMAT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "qformat") / "verified.json"


def _read_verify_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or corrupt: start afresh
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == 1 else None
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def _write_verify_cache(path: Path, entries: dict[str, dict]) -> None:
    """Atomically (a temporary file renamed over the cache); a cache that cannot be written only costs a rehash."""
    entries = {k: v for k, v in entries.items() if os.path.exists(k)}  # forget deleted folders
    if len(entries) > VERIFY_CACHE_ENTRIES:
        newest = sorted(entries, key=lambda k: entries[k].get("at", 0))[-VERIFY_CACHE_ENTRIES:]
        entries = {k: entries[k] for k in newest}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"version": 1, "entries": entries}, handle)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _identity(path: Path, expected: str) -> tuple[str, list]:
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, expected]


def _recorded_checksums(folder: ModelFolder) -> tuple[Path, dict[str, Any] | None]:
    """(config.json path, {shard: expected entry}) for the shards this load reads; None where nothing is recorded."""
    if folder.path.is_dir():
        config_path = folder.root / "config.json"
        files = folder.quantization_config.get("files")
        if files is None:
            return config_path, None
        if not isinstance(files, dict) or set(files) != set(folder.shards):
            raise FormatError("checksum_mismatch", "quantization_config.files must list exactly the shards "
                              f"{sorted(folder.shards)[:4]}", file=str(config_path), field="quantization_config.files")
        return config_path, files
    # a single shard: its folder's config.json may record it
    config_path = folder.root / "config.json"
    try:
        config = json.loads(config_path.read_text())
        files = config["quantization_config"]["files"]
        entry = files[folder.shards[0]]
    except (OSError, ValueError, KeyError, TypeError):
        return config_path, None
    return config_path, {folder.shards[0]: entry}


def verify_shards(folder: ModelFolder, verify: VerifyMode = "auto") -> int:
    """Check the folder's shards against the sha256 and size config.json recorded when they were written.

    ``verify="auto"``: hash each shard unless the cache says these exact files were verified already;
    ``True``: hash every shard (and fail if the folder records no checksums); ``False``: check nothing (unsafe).
    A folder without recorded checksums (written by an old version, or a single file without its folder) loads with
    a warning under "auto". Returns the number of shards hashed. A mismatch raises ``FormatError("checksum_mismatch")``
    naming the shard.
    """
    if verify not in (True, False, "auto"):
        raise ValueError(f"verify must be True, False or 'auto', not {verify!r}")
    if verify is False:
        return 0
    config_path, files = _recorded_checksums(folder)
    if files is None:
        if verify is True:
            raise LoadError(f"{shorten(folder.path)}: config.json records no shard checksums "
                            "(quantization_config.files), so verify=True cannot be honoured; pass verify='auto' to "
                            "load it unverified")
        key = str(folder.path.resolve())
        if key not in _warned_unverified:
            _warned_unverified.add(key)
            warnings.warn(f"{shorten(folder.path)}: config.json records no shard checksums "
                          "(quantization_config.files); the shards are loaded unverified", UserWarning, stacklevel=3)
        return 0
    cache_path = verify_cache_path()
    cache = _read_verify_cache(cache_path) if verify == "auto" else {}
    verified: dict[str, dict] = {}
    for shard, expected in sorted(files.items()):
        target = folder.root / shard
        if not isinstance(expected, dict) or not _SHA256.fullmatch(str(expected.get("sha256"))):
            raise FormatError("bad_config", "each files entry must be an object with a sha256 (64 hex digits) and "
                              "a size", file=str(config_path), field=f"quantization_config.files.{shard}")
        size = target.stat().st_size
        if size != expected.get("size"):
            raise FormatError("checksum_mismatch", f"size is {size}, config.json records {shorten(repr(expected.get('size')), 40)}: "
                              "the shard is truncated or was changed after it was written", file=str(target))
        key, identity = _identity(target, expected["sha256"])
        if verify == "auto" and cache.get(key, {}).get("id") == identity:
            continue
        actual = sha256_file(target)
        if actual != expected["sha256"]:
            raise FormatError("checksum_mismatch", f"sha256 is {actual}, config.json records {expected['sha256']}: "
                              "the shard was changed after it was written (a corrupted download or copy, or an "
                              "edit); download or convert it again", file=str(target))
        verified[key] = {"id": identity, "at": time.time()}
    if verified:
        _write_verify_cache(cache_path, {**_read_verify_cache(cache_path), **verified})  # re-read: other processes
    return len(verified)
