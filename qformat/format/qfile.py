"""A qformat file: a safetensors file whose ``__metadata__["qformat"]`` holds the records of its quantized weights."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from . import partial
from .codecs import CORE_CODECS, CodecRegistry, Context, TensorInfo
from .dtypes import dtype_name
from .record import (
    FORMAT_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    RowReader,
    bits_per_weight,
    check_record,
    decode_record,
    validate_record,
)
from .safetensors_io import QFORMAT_METADATA_KEY, SafetensorsFile, parse_json, safe_text, write_safetensors

MAX_METADATA_BYTES = 64 * 1024 * 1024


@dataclass
class QuantizedTensor:
    """One quantized weight as a method produces it: its record and the tensors the record references."""

    name: str
    record: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.record)

    def tensor_info(self, key: str) -> TensorInfo | None:
        """What validation needs to know of one of the in-memory tensors (None when there is no such tensor)."""
        array = self.tensors.get(key)
        return None if array is None else TensorInfo(dtype_name(array), tuple(array.shape), array.nbytes)

    def context(self, registry: CodecRegistry | None = None) -> Context:
        """A decoding context over the in-memory tensors (``registry``: the codecs to read with; None: the core)."""
        return Context(CORE_CODECS if registry is None else registry, self.tensor_info, self.tensors.__getitem__)

    def decode(self, registry: CodecRegistry = CORE_CODECS, **options: Any) -> np.ndarray:
        """Reference fp32 decode, straight from memory."""
        return decode_record(self.name, self.record, self.tensor_info, self.tensors.__getitem__, registry, options)

    def keep_terms(self, count: int, registry: CodecRegistry = CORE_CODECS) -> QuantizedTensor:
        """This weight with its stack cut to the first ``count`` terms (spec/partial.md), holding only the tensors the
        cut tree reads and their ``storage_bytes``: the others are never touched (``registry``: the codecs the
        record uses)."""
        record = partial.keep_terms(self.record, count)
        tensors = {name: self.tensors[name] for name in partial.referenced(record["weight"], self.tensor_info,
                                                                          registry)}
        record["storage_bytes"] = sum(int(a.nbytes) for a in tensors.values())
        return QuantizedTensor(self.name, record, tensors)

    def use_planes(self, planes: int) -> QuantizedTensor:
        """This weight read from the first ``planes`` bit-planes of its ``bitplanes`` codes, as a plain record of
        ``planes``-bit codes (spec/partial.md; decodes exactly like ``decode(use_planes=planes)``)."""
        record, tensors = partial.use_planes(self.record, self.tensors, planes)
        return QuantizedTensor(self.name, record, tensors)

    def row_reader(self, registry: CodecRegistry = CORE_CODECS) -> RowReader:
        """Decode chosen rows only (embedding lookups); validated once here."""
        return RowReader(self.name, self.record, self.tensor_info, self.tensors.__getitem__, registry)


class QFile:
    """A validated qformat (or plain) safetensors file. Structural checks run on open; data checks on decode."""

    def __init__(self, path: str | os.PathLike, registry: CodecRegistry = CORE_CODECS) -> None:
        self.st = SafetensorsFile(path)
        self.path = self.st.path
        self.registry = registry
        self.records: dict[str, dict] = {}
        self._owner: dict[str, str] = {}
        raw = self.st.metadata.get(QFORMAT_METADATA_KEY)
        if raw is None:
            return
        where = str(self.path)
        if len(raw.encode()) > MAX_METADATA_BYTES:
            raise FormatError("limit_exceeded", f"qformat metadata over {MAX_METADATA_BYTES} bytes", file=where)
        meta = parse_json(raw, "__metadata__['qformat']", where, tensor_level=1)
        if not isinstance(meta, dict) or set(meta) - {"format_version", "records"}:
            raise FormatError("bad_header", "qformat metadata must be an object with format_version and records",
                              file=where, field="qformat")
        version = meta.get("format_version")
        if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
            raise FormatError("unsupported_format_version", f"format_version {version!r} is not supported (this "
                              f"reader knows {sorted(SUPPORTED_FORMAT_VERSIONS)})", file=where,
                              field="format_version")
        records = meta.get("records")
        if not isinstance(records, dict):
            raise FormatError("bad_header", "records must be an object", file=where, field="records")
        for name, record in records.items():
            if name in self.st.entries:
                raise FormatError("duplicate_name", f"{name!r} is both a record and a stored tensor", file=where,
                                  tensor=name)
            try:
                referenced = validate_record(name, record, self.st.info, registry)
            except FormatError as exc:
                raise exc.at(file=where) from None
            for ref in referenced:
                if ref in self._owner:
                    raise FormatError("shared_tensor", f"tensor {ref!r} is referenced by {self._owner[ref]!r} and "
                                      f"{name!r}", file=where, tensor=name)
                self._owner[ref] = name
            self.records[name] = record

    @property
    def plain_names(self) -> list[str]:
        """Stored tensors that belong to no record (embeddings, norms, biases, ...)."""
        return [n for n in self.st.entries if n not in self._owner]

    def owned_tensors(self, name: str) -> list[str]:
        return [t for t, owner in self._owner.items() if owner == name]

    def tensor(self, name: str) -> np.ndarray:
        return self.st.get(name)

    def decode(self, name: str, **options: Any) -> np.ndarray:
        """The fp32 weight of a record, or a plain tensor as stored."""
        if name not in self.records:
            return self.st.get(name)
        try:
            return decode_record(name, self.records[name], self.st.info, self.st.get, self.registry, options)
        except FormatError as exc:
            raise exc.at(file=str(self.path)) from None

    def check(self, name: str, **options: Any) -> None:
        """Every check :meth:`decode` makes on a record, without keeping the weight (memory: one row range)."""
        try:
            check_record(name, self.records[name], self.st.info, self.st.get, self.registry, options)
        except FormatError as exc:
            raise exc.at(file=str(self.path)) from None

    def quantized(self, name: str) -> QuantizedTensor:
        return QuantizedTensor(name, self.records[name], {t: self.st.get(t) for t in self.owned_tensors(name)})

    def close(self) -> None:
        self.st.close()


def open_file(path: str | os.PathLike, registry: CodecRegistry = CORE_CODECS) -> QFile:
    return QFile(path, registry)


def _check_name(name: str, path: str | os.PathLike) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError("bad_tensor_name", "a name must be Unicode text; this one holds a lone surrogate",
                          file=str(path), tensor=safe_text(name)) from None


def write_file(path: str | os.PathLike, plain: Mapping[str, np.ndarray] | None = None,
               quantized: Iterable[QuantizedTensor] = (), metadata: Mapping[str, str] | None = None) -> Path:
    """Write plain tensors and quantized records into one qformat file, deterministically and atomically."""
    tensors: dict[str, np.ndarray] = {}
    records: dict[str, dict] = {}

    def add(name: str, array: np.ndarray, owner: str | None) -> None:
        _check_name(name, path)
        if name in tensors or name in records:
            raise FormatError("duplicate_name", f"{name!r} is written twice", file=str(path), tensor=owner or name)
        tensors[name] = array

    for name, array in (plain or {}).items():
        add(name, np.asarray(array), None)
    for qt in quantized:
        _check_name(qt.name, path)
        if qt.name in tensors or qt.name in records:
            raise FormatError("duplicate_name", f"{qt.name!r} is written twice", file=str(path), tensor=qt.name)
        records[qt.name] = qt.record
        for name, array in qt.tensors.items():
            add(name, np.asarray(array), qt.name)
    meta = {"format": "pt", **(metadata or {})}
    if records:
        meta[QFORMAT_METADATA_KEY] = json.dumps({"format_version": FORMAT_VERSION, "records": records},
                                                sort_keys=True, separators=(",", ":"))
    write_safetensors(path, tensors, meta)
    return Path(path)
