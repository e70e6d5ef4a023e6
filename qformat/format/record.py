"""Records: the JSON description of one quantized weight, its validation, accounting and reference decoding."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import FormatError
from .codecs import REGISTRY, CodecRegistry, Context, NodeInfo, TensorInfo
from .dtypes import WEIGHT_DTYPES

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
# A record may expand its stored bytes (a rank-1 sidecar, an empty sparse part) but not without bound: a hostile
# 1 MB file must not make a reader allocate tens of GiB.
MAX_EXPANSION = 65536
RECORD_FIELDS = frozenset({"shape", "dtype", "storage_bytes", "weight", "info"})


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A weight of shape [O, I1, I2, ...] is decoded as the matrix [O, I1*I2*...]."""
    cols = 1
    for dim in shape[1:]:
        cols *= int(dim)  # Python ints: a hostile shape cannot overflow
    return int(shape[0]), cols


def _check_top_level(name: str, record: Any) -> tuple[int, ...]:
    def fail(code: str, message: str, fld: str) -> FormatError:
        return FormatError(code, message, tensor=name, field=fld)

    if not isinstance(record, dict):
        raise fail("bad_record", "a record must be a JSON object", "record")
    unknown = sorted(set(record) - RECORD_FIELDS)
    if unknown:
        raise fail("bad_field", f"unknown record field {unknown[0]!r}", unknown[0])
    for key in ("shape", "dtype", "storage_bytes", "weight"):
        if key not in record:
            raise fail("bad_record", f"record requires field {key!r}", key)
    shape = record["shape"]
    if (not isinstance(shape, list) or not 2 <= len(shape) <= 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d < 1 << 40 for d in shape)):
        raise fail("bad_field", f"shape must be 2..8 positive integers below 2**40, got {shape!r}", "shape")
    if not isinstance(record["dtype"], str) or record["dtype"] not in WEIGHT_DTYPES:
        raise fail("bad_field", f"dtype must be one of {sorted(WEIGHT_DTYPES)}, got {record['dtype']!r}", "dtype")
    nbytes = record["storage_bytes"]
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise fail("bad_field", f"storage_bytes must be a non-negative integer, got {nbytes!r}", "storage_bytes")
    if "info" in record and not isinstance(record["info"], dict):
        raise fail("bad_field", "info must be a JSON object", "info")
    return tuple(shape)


def validate_record(name: str, record: Any, tensor_info: Callable[[str], TensorInfo | None],
                    registry: CodecRegistry = REGISTRY) -> dict[str, TensorInfo]:
    """Check a record's structure against the tensors available; return the tensors it references.

    Checks field types, every node's codec and version, shapes through the tree, that referenced tensors exist and
    are named ``<record name>.<suffix>``, and that ``storage_bytes`` equals the bytes of those tensors.
    """
    shape = _check_top_level(name, record)
    ctx = Context(registry, tensor_info)
    try:
        info: NodeInfo = ctx.infer(record["weight"], "weight")
    except FormatError as exc:
        raise exc.at(tensor=name) from None
    if info.kind != "float":  # spec: the root must decode to values; codes need a codec that maps them
        raise FormatError("shape_mismatch", f"the weight decodes to integer codes {list(info.shape)}, not values: "
                          "the root node must be float (wrap codes in affine, lut, scale, ...)", tensor=name,
                          field="weight")
    if info.shape != matrix_shape(shape):
        raise FormatError("shape_mismatch", f"the weight decodes to {list(info.shape)} but the record declares "
                          f"{list(shape)} (matrix {list(matrix_shape(shape))})", tensor=name, field="weight")
    for ref in ctx.referenced:
        if not ref.startswith(name + "."):
            raise FormatError("bad_tensor_name", f"tensor {ref!r} must be named {name!r} + '.<part>'", tensor=name,
                              field="weight")
    actual = sum(t.nbytes for t in ctx.referenced.values())
    rows, cols = matrix_shape(shape)
    if rows * cols > 1 << 24 and rows * cols > MAX_EXPANSION * max(actual, 1):
        raise FormatError("limit_exceeded", f"{rows * cols} weights from {actual} stored bytes exceeds the "
                          f"{MAX_EXPANSION} weights-per-byte limit", tensor=name, field="shape")
    if actual != record["storage_bytes"]:
        raise FormatError("bad_accounting", f"storage_bytes says {record['storage_bytes']} but the referenced "
                          f"tensors hold {actual} bytes", tensor=name, field="storage_bytes")
    return ctx.referenced


def decode_record(name: str, record: dict, tensor_info: Callable[[str], TensorInfo | None],
                  load: Callable[[str], np.ndarray], registry: CodecRegistry = REGISTRY,
                  options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Validate then decode a record to its fp32 weight, in the record's declared shape."""
    validate_record(name, record, tensor_info, registry)
    ctx = Context(registry, tensor_info, load, dict(options or {}))
    try:
        matrix = ctx.decode(record["weight"], "weight")
    except FormatError as exc:
        raise exc.at(tensor=name) from None
    return np.asarray(matrix, dtype=np.float32).reshape(record["shape"])


def bits_per_weight(record: dict) -> float:
    rows, cols = matrix_shape(tuple(record["shape"]))
    return record["storage_bytes"] * 8 / (rows * cols)
