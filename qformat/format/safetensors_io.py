"""Safetensors files: a validating, memory-mapped reader and a deterministic, atomic writer.

We parse the header ourselves (instead of through the safetensors package) to enforce size limits, reject duplicate
names that a JSON parser would silently merge, name the failing field, and write bytes that depend only on content:
the package writes ``__metadata__`` from a hash map, so its output bytes vary from run to run.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from .codecs import TensorInfo
from .dtypes import NUMPY_BY_NAME, dtype_name

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package's own limit
MAX_TENSORS = 1_000_000
QFORMAT_METADATA_KEY = "qformat"

_UMASK = os.umask(0)
os.umask(_UMASK)

if sys.byteorder != "little":  # safetensors is little-endian; we map and write host order directly
    raise ImportError("qformat.format supports little-endian hosts only")


class _DuplicateKeys(dict):
    """A parsed JSON object that named a key twice; reported after parsing, when its position is known."""

    duplicate: str


def _keep_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            marked = _DuplicateKeys(out)
            marked.duplicate = key
            return marked
        out[key] = value
    return out


def _find_duplicate(value: Any, path: list[str]) -> list[str] | None:
    if isinstance(value, _DuplicateKeys):
        return [*path, value.duplicate]
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        if isinstance(child, (dict, list)) and (found := _find_duplicate(child, [*path, str(key)])):
            return found
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A JSON string may escape a lone UTF-16 surrogate ("\\ud800"): valid JSON syntax, but not a Unicode string, so
# not UTF-8 encodable (printing or re-writing such a name fails). Surrogates only enter through such escapes.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_surrogate(value: Any, path: list[str]) -> list[str] | None:
    """The path to the first key or string value that holds a lone surrogate (keys shown escaped)."""
    if isinstance(value, str):
        return None if _is_unicode(value) else path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        where = [*path, safe_text(key) if isinstance(key, str) else str(key)]
        if isinstance(key, str) and not _is_unicode(key):
            return where
        if isinstance(child, (str, dict, list)) and (found := _find_surrogate(child, where)):
            return found
    return None


def safe_text(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) written as a backslash escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_json(text: str | bytes, what: str, file: str, tensor_level: int | None = None) -> Any:
    """Strict JSON: no NaN/Infinity, no key named twice in one object, bounded nesting.

    ``tensor_level``: the depth at which keys are tensor (or record) names, so a duplicate can be reported as
    belonging to one.
    """
    given_text = isinstance(text, str)  # may hold surrogates as such; decoded bytes only through escapes
    if isinstance(text, bytes):
        try:  # strictly: json.loads(bytes) would accept UTF-16/32 and UTF-8-encoded surrogates ("surrogatepass")
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError("bad_header", f"{what} is not valid UTF-8: {exc}", file=file) from None
    try:
        value = json.loads(text, object_pairs_hook=_keep_duplicates, parse_constant=_reject_constant)
    except ValueError as exc:
        raise FormatError("bad_header", f"{what} is not valid JSON: {exc}", file=file) from None
    except RecursionError:
        raise FormatError("bad_header", f"{what} nests too deeply", file=file) from None
    if _SURROGATE_ESCAPE.search(text) or (given_text and not _is_unicode(text)):
        bad = _find_surrogate(value, [])
        if bad is not None:
            raise FormatError("bad_header", f"{what} holds a string that is not valid Unicode (a lone surrogate "
                              "such as \\ud800): names and values must be UTF-8 text", file=file,
                              field="/".join(bad) or None)
    path = _find_duplicate(value, [])
    if path is not None:
        tensor = path[tensor_level] if tensor_level is not None and len(path) > tensor_level else None
        raise FormatError("duplicate_name", f"{what} names {path[-1]!r} twice in one object", file=file,
                          tensor=tensor, field="/".join(path))
    return value


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset within the data section
    end: int

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.dtype, self.shape, self.end - self.begin)


class SafetensorsFile:
    """A memory-mapped safetensors file with its header validated; tensors are read lazily as numpy views."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        where = str(self.path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise FormatError("truncated", "file is shorter than the 8-byte header length", file=where)
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                    raise FormatError("bad_header", f"header length {header_len} exceeds the file or the "
                                      f"{MAX_HEADER_BYTES}-byte limit", file=where)
                header_bytes = handle.read(header_len)
        except OSError as exc:
            raise FormatError("unreadable", f"cannot read file: {exc.strerror or exc}", file=where) from None
        header = parse_json(header_bytes, "the safetensors header", where, tensor_level=0)
        if not isinstance(header, dict):
            raise FormatError("bad_header", "the header must be a JSON object", file=where)
        self.data_start = 8 + header_len
        self.metadata: dict[str, str] = header.pop("__metadata__", {})
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise FormatError("bad_header", "__metadata__ must map strings to strings", file=where,
                              field="__metadata__")
        if len(header) > MAX_TENSORS:
            raise FormatError("limit_exceeded", f"more than {MAX_TENSORS} tensors", file=where)
        self.entries: dict[str, TensorEntry] = {}
        for name, raw in header.items():
            self.entries[name] = self._entry(name, raw, where)
        self._check_layout(size - self.data_start, where)
        self._mmap: np.memmap | None = None

    @staticmethod
    def _entry(name: str, raw: Any, where: str) -> TensorEntry:
        def fail(code: str, message: str, fld: str) -> FormatError:
            return FormatError(code, message, file=where, tensor=name, field=fld)

        if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
            raise fail("bad_header", "a tensor entry needs exactly dtype, shape and data_offsets", "entry")
        dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
        if not isinstance(dtype, str) or dtype not in NUMPY_BY_NAME:
            raise fail("bad_dtype", f"unsupported dtype {dtype!r}", "dtype")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise fail("bad_header", f"shape must be at most 8 non-negative integers, got {shape!r}", "shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise fail("bad_header", f"data_offsets must be [begin, end] with begin <= end, got {offsets!r}",
                       "data_offsets")
        itemsize = NUMPY_BY_NAME[dtype].itemsize
        if int(np.prod([d for d in shape if d], dtype=object)) * itemsize >= 1 << 63:
            # an empty tensor may still have huge dims: no array library can represent [2^40 - 1, 0, 2^40 - 1]
            raise fail("bad_header", f"shape {shape!r}: its non-zero dims times the item size reach 2**63 bytes",
                       "shape")
        expected = int(np.prod(shape, dtype=object)) * itemsize
        if offsets[1] - offsets[0] != expected:
            raise fail("shape_mismatch", f"{dtype} {shape} needs {expected} bytes, data_offsets cover "
                       f"{offsets[1] - offsets[0]}", "data_offsets")
        return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])

    def _check_layout(self, data_size: int, where: str) -> None:
        # Like the safetensors package: the data section is covered exactly, without holes or overlaps.
        cursor = 0
        for entry in sorted(self.entries.values(), key=lambda e: (e.begin, e.end)):
            if entry.begin != cursor:
                raise FormatError("bad_offsets", f"data_offsets leave a hole or overlap at byte {cursor}", file=where,
                                  tensor=entry.name, field="data_offsets")
            cursor = entry.end
        if cursor != data_size:
            code = "truncated" if cursor > data_size else "bad_offsets"
            raise FormatError(code, f"tensors need {cursor} data bytes, the file holds {data_size}", file=where)

    # -- access ---------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> TensorInfo | None:
        entry = self.entries.get(name)
        return entry.info if entry else None

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file (no copy)."""
        entry = self.entries.get(name)
        if entry is None:
            raise FormatError("missing_tensor", f"tensor {name!r} is not in the file", file=str(self.path),
                              tensor=name)
        if entry.begin == entry.end:
            return np.zeros(entry.shape, dtype=NUMPY_BY_NAME[entry.dtype])
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self.data_start + entry.begin: self.data_start + entry.end]
        return raw.view(NUMPY_BY_NAME[entry.dtype]).reshape(entry.shape)

    def close(self) -> None:
        self._mmap = None


# ---------------------------------------------------------------------------------------------------------------
# writing

def _layout(tensors: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    # Widest dtypes first, then by name: every tensor starts aligned to its element size, and the order is fixed.
    return iter(sorted(tensors.items(), key=lambda kv: (-kv[1].dtype.itemsize, kv[0])))


def serialize_header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name, array in _layout(tensors):
        header[name] = {"dtype": dtype_name(array), "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8)  # pad so the data section starts 8-byte aligned


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file, fsync, rename); identical input gives identical bytes."""
    path = Path(path)
    header = serialize_header(tensors, metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)))
            handle.write(header)
            for _, array in _layout(tensors):
                handle.write(np.ascontiguousarray(array).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; written models should follow the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
