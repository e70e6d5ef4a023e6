"""Editable models of a safetensors/qformat file and of a model folder, and their (re)serialization.

Mutations edit these objects; serialization then keeps everything they did not touch consistent (data offsets,
header length, ``storage_bytes``, the checksums in ``config.json``), so a mutation reaches the code behind the checks
it does not target instead of being rejected at the header.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .jsontext import Pairs, dumps

TENSOR_FIELDS = ("tensor", "row_ptr", "col_idx", "perm")


class _Missing:
    """Marks a part that is absent (not the same as JSON null); survives deepcopy as itself."""

    def __deepcopy__(self, memo: dict) -> _Missing:
        return self

    def __copy__(self) -> _Missing:
        return self

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}


@dataclass
class FileSample:
    """A safetensors file as editable parts.

    ``entries``: header entries in order, as (name, entry) pairs so a name can repeat; ``blobs``: tensor bytes by
    name; ``metadata``: ``__metadata__`` without the qformat key; ``qmeta``: the parsed qformat metadata (MISSING for
    a plain file). ``post`` edits the final bytes (container mutations).
    """

    entries: list[tuple[str, Any]]
    blobs: dict[str, bytes]
    metadata: dict[str, Any]
    qmeta: Any = MISSING
    fix_offsets: bool = True
    fix_storage: bool = True
    ascii_inner: bool = True  # escape non-ASCII in the qformat JSON (else the outer header escapes it)
    ascii_outer: bool = True  # escape non-ASCII in the header (else written as UTF-8, surrogates as invalid bytes)
    header_extra: list[tuple[str, Any]] = field(default_factory=list)
    post: list[Callable[[bytes], bytes]] = field(default_factory=list)

    # -- parsing --------------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes) -> FileSample:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        base = 8 + header_len
        metadata = dict(header.pop("__metadata__", {}))
        qmeta = json.loads(metadata.pop("qformat")) if "qformat" in metadata else MISSING
        entries, blobs = [], {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            entries.append((name, entry))
            blobs[name] = data[base + begin:base + end]
        return cls(entries, blobs, metadata, qmeta)

    def clone(self) -> FileSample:
        return FileSample(copy.deepcopy(self.entries), dict(self.blobs), copy.deepcopy(self.metadata),
                          copy.deepcopy(self.qmeta), self.fix_offsets, self.fix_storage, self.ascii_inner,
                          self.ascii_outer, list(self.header_extra), list(self.post))

    # -- access ---------------------------------------------------------------------------------------------------
    def entry(self, name: str) -> dict | None:
        for key, value in self.entries:
            if key == name and isinstance(value, dict):
                return value
        return None

    def tensor_names(self) -> list[str]:
        return [name for name, value in self.entries if isinstance(value, dict) and name in self.blobs]

    def array(self, name: str) -> np.ndarray | None:
        """The tensor as numpy (BF16 as raw uint16), or None where dtype/shape/bytes do not agree."""
        entry = self.entry(name)
        if entry is None or entry.get("dtype") not in DTYPES or name not in self.blobs:
            return None
        dtype = DTYPES[entry["dtype"]]
        shape = entry.get("shape")
        blob = self.blobs[name]
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape):
            return None
        if int(np.prod(shape, dtype=object)) * dtype.itemsize != len(blob):
            return None
        return np.frombuffer(blob, dtype=dtype).reshape(shape).copy()

    def set_tensor(self, name: str, dtype: str, array: np.ndarray) -> None:
        """Replace (or add) a tensor: entry dtype and shape follow the array."""
        entry = self.entry(name)
        if entry is None:
            entry = {"dtype": dtype, "shape": [], "data_offsets": [0, 0]}
            self.entries.append((name, entry))
        entry["dtype"] = dtype
        entry["shape"] = [int(d) for d in array.shape]
        self.blobs[name] = np.ascontiguousarray(array).astype(DTYPES.get(dtype, array.dtype), copy=False).tobytes()

    def records(self) -> dict[str, Any]:
        if isinstance(self.qmeta, dict) and isinstance(self.qmeta.get("records"), dict):
            return self.qmeta["records"]
        return {}

    # -- writing --------------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        if self.fix_storage:
            for record in self.records().values():
                if isinstance(record, dict) and "storage_bytes" in record:
                    refs = set(tensor_refs(record.get("weight")))
                    record["storage_bytes"] = sum(len(self.blobs[r]) for r in refs if r in self.blobs)
        data = []
        placed: dict[str, list[int]] = {}
        cursor = 0
        for name, entry in self.entries:
            if not isinstance(entry, dict) or name not in self.blobs:
                continue
            if name not in placed:
                blob = self.blobs[name]
                placed[name] = [cursor, cursor + len(blob)]
                data.append(blob)
                cursor += len(blob)
            if self.fix_offsets and "data_offsets" in entry:
                entry["data_offsets"] = list(placed[name])
        meta: list[tuple[str, Any]] = list(self.metadata.items())
        if self.qmeta is not MISSING:
            meta.append(("qformat", dumps(self.qmeta, ascii_only=self.ascii_inner)))
        header_pairs = Pairs([("__metadata__", Pairs(meta)), *self.entries, *self.header_extra])
        text = dumps(header_pairs, ascii_only=self.ascii_outer)
        header = text.encode("utf-8", "surrogatepass")
        header += b" " * (-len(header) % 8)
        out = struct.pack("<Q", len(header)) + header + b"".join(data)
        for edit in self.post:
            out = edit(out)
        return out


def tensor_refs(node: Any) -> Iterator[str]:
    """Every tensor name a node tree references (any string in a tensor field, at any depth)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in TENSOR_FIELDS and isinstance(value, str):
                    yield value
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list)))


@dataclass
class Special:
    """A folder entry that is not a regular file: "dir", "fifo", or "symlink" to ``target``."""

    kind: str
    target: str = ""


@dataclass
class FolderSample:
    """A model folder: shard samples, other files as bytes (or specials), config.json and the index as JSON values.

    ``config`` / ``index`` of MISSING leave the file out; ``config_raw`` / ``index_raw`` override their bytes.
    With ``fix_checksums`` the sizes and SHA-256s in ``quantization_config.files`` follow the written shards.
    """

    files: dict[str, FileSample | bytes | Special]
    config: Any = MISSING
    index: Any = MISSING
    config_raw: bytes | Special | None = None
    index_raw: bytes | Special | None = None
    fix_checksums: bool = True

    @classmethod
    def load(cls, folder: Path) -> FolderSample:
        files: dict[str, FileSample | bytes | Special] = {}
        config = index = MISSING
        for path in sorted(folder.iterdir()):
            if path.name == "config.json":
                config = json.loads(path.read_bytes())
            elif path.name == "model.safetensors.index.json":
                index = json.loads(path.read_bytes())
            elif path.suffix == ".safetensors":
                files[path.name] = FileSample.parse(path.read_bytes())
            else:
                files[path.name] = path.read_bytes()
        return cls(files, config, index)

    def clone(self) -> FolderSample:
        files = {k: v.clone() if isinstance(v, FileSample) else v for k, v in self.files.items()}
        return FolderSample(files, copy.deepcopy(self.config), copy.deepcopy(self.index), self.config_raw,
                            self.index_raw, self.fix_checksums)

    def shards(self) -> list[str]:
        return [k for k, v in self.files.items() if isinstance(v, FileSample)]

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        written: dict[str, bytes] = {}
        for name, content in self.files.items():
            if isinstance(content, FileSample):
                content = content.to_bytes()
                written[name] = content
            _write_entry(folder, name, content)
        qconfig = self.config.get("quantization_config") if isinstance(self.config, dict) else None
        files = qconfig.get("files") if isinstance(qconfig, dict) else None
        if self.fix_checksums and isinstance(files, dict):
            for name, entry in files.items():
                if isinstance(entry, dict) and name in written:
                    entry["sha256"] = hashlib.sha256(written[name]).hexdigest()
                    entry["size"] = len(written[name])
        for name, value, raw in (("config.json", self.config, self.config_raw),
                                 ("model.safetensors.index.json", self.index, self.index_raw)):
            if raw is not None:
                _write_entry(folder, name, raw)
            elif value is not MISSING:
                _write_entry(folder, name, dumps(value, ascii_only=True).encode())


def _write_entry(folder: Path, name: str, content: bytes | Special) -> None:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content.kind == "dir":
        path.mkdir()
    elif content.kind == "fifo":
        os.mkfifo(path)
    elif content.kind == "symlink":
        os.symlink(content.target, path)
