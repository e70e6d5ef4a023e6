"""Walk a GGUF file's header (ggml/docs/gguf.md) to check it before gguf-py maps it.

gguf-py's ``GGUFReader`` fails on a damaged file with messages that name neither the tensor nor the field ("cannot
reshape array of size 3 into shape (8,)" for a truncated file, "99 is not a valid GGMLQuantizationType" for an
unknown type). This walk reads the same header with bounds checks and raises :class:`SourceError` naming the file,
the tensor and the field: a truncated header or data section, an unknown type id, a row length that is not a whole
number of blocks. It keeps the metadata's scalars and strings (arrays only as their length); it reads no tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qformat.plugin import SourceError

MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass
class TensorEntry:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length (numpy shape is reversed)
    type_id: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


@dataclass
class Header:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorEntry]
    data_start: int
    file_size: int
    type_names: dict[int, str] = field(default_factory=dict)


class _Cursor:
    def __init__(self, data: bytes | memoryview, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path
        self.where: tuple[str | None, str] = (None, "header")  # (tensor, field) being read, for errors

    def need(self, size: int) -> None:
        if self.pos + size > len(self.data):
            tensor, fld = self.where
            raise SourceError(f"the GGUF file is truncated: it ends at byte {len(self.data)}, inside the header's "
                              f"{fld!r}", file=str(self.path), tensor=tensor, field=fld)

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.take("<Q")
        self.need(length)
        raw = bytes(self.data[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int, depth: int = 0) -> Any:
        if value_type in _SCALAR:
            return self.take(_SCALAR[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY and depth < 4:
            element_type, count = self.take("<IQ")
            if element_type in _SCALAR:
                size = struct.calcsize(_SCALAR[element_type]) * count
                self.need(size)
                self.pos += size
            else:
                for _ in range(count):
                    self.value(element_type, depth + 1)
            return count
        raise SourceError(f"unknown GGUF metadata value type {value_type}", file=str(self.path),
                          field=self.where[1])


def _type_tables() -> tuple[dict[int, str], dict[int, tuple[int, int]]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    names = {int(t): t.name for t in GGMLQuantizationType}
    sizes = {int(t): GGML_QUANT_SIZES[t] for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
    return names, sizes


def scan(path: Path, supported: tuple[str, ...]) -> Header:
    """Read and check the header of the GGUF file ``path``; ``supported`` names the types the importer maps (for
    the message of an unknown type)."""
    import mmap

    names, sizes = _type_tables()
    with open(path, "rb") as handle:
        file_size = handle.seek(0, 2)
        if file_size == 0:
            raise SourceError("the GGUF file is empty", file=str(path), field="magic")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            cur = _Cursor(memoryview(view), path)
            try:
                header = _walk(cur, path, file_size, names, sizes, supported)
            finally:
                cur.data.release()
    return header


def _walk(cur: _Cursor, path: Path, file_size: int, names: dict[int, str], sizes: dict[int, tuple[int, int]],
          supported: tuple[str, ...]) -> Header:
    cur.where = (None, "magic")
    if bytes(cur.data[:4]) != MAGIC:
        raise SourceError(f"not a little-endian GGUF file (magic {bytes(cur.data[:4])!r})", file=str(path),
                          field="magic")
    cur.pos = 4
    cur.where = (None, "version")
    version = cur.take("<I")
    if version not in (2, 3):
        raise SourceError(f"GGUF version {version} is not supported (2 and 3 are)", file=str(path), field="version")
    tensor_count, kv_count = cur.take("<QQ")
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        cur.where = (None, f"metadata entry {index}")
        key = cur.string()
        cur.where = (None, key)
        metadata[key] = cur.value(cur.take("<I"))
    tensors = []
    for index in range(tensor_count):
        cur.where = (None, f"tensor info {index}")
        name = cur.string()
        cur.where = (name, "tensor info")
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise SourceError(f"tensor has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)", file=str(path),
                              tensor=name, field="n_dims")
        ne = tuple(cur.take(f"<{n_dims}Q")) if n_dims > 1 else (cur.take("<Q"),)
        type_id, offset = cur.take("<IQ")
        tensors.append(_entry(path, name, ne, type_id, offset, names, sizes, supported))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise SourceError(f"general.alignment {alignment!r} is not a power of two", file=str(path),
                          field="general.alignment")
    data_start = -(-cur.pos // alignment) * alignment
    for entry in tensors:
        end = data_start + entry.offset + entry.nbytes
        if end > file_size:
            raise SourceError(f"the GGUF file is truncated: tensor data ({names[entry.type_id]}, {entry.nbytes} "
                              f"bytes) ends at byte {end} but the file has {file_size} bytes", file=str(path),
                              tensor=entry.name, field="data")
    return Header(path, version, metadata, tensors, data_start, file_size, names)


def _entry(path: Path, name: str, ne: tuple[int, ...], type_id: int, offset: int, names: dict[int, str],
           sizes: dict[int, tuple[int, int]], supported: tuple[str, ...]) -> TensorEntry:
    if type_id not in names or type_id not in sizes:
        raise SourceError(f"unknown GGUF tensor type id {type_id} (this gguf-py knows ids 0-{max(names)}; the "
                          f"importer maps {', '.join(supported)})", file=str(path), tensor=name, field="type")
    block, type_size = sizes[type_id]
    if ne[0] % block:
        raise SourceError(f"{names[type_id]} rows of {ne[0]} elements are not whole blocks of {block}",
                          file=str(path), tensor=name, field="shape")
    elements = 1
    for dim in ne:
        elements *= int(dim)
    return TensorEntry(name, ne, type_id, offset, elements // block * type_size)
