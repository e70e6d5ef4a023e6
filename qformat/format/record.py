"""Records: the JSON description of one quantized weight, its validation, accounting and reference decoding."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import FormatError, ResourceError
from .codecs import CORE_CODECS, CodecRegistry, Context, NodeInfo, TensorInfo
from .dtypes import WEIGHT_DTYPES
from .partial import keep_terms

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
# Decode work (output elements summed over every node occurrence, spec/record.md#limits) per stored byte, for
# records whose work exceeds FREE_WORK. Real records need at most a few dozen (4-bit affine: ~4; SpQR at 1 bit with
# permute, sum and outliers: ~40); a hostile 1 MB file must not make a reader allocate tens of GiB.
MAX_EXPANSION = 256
FREE_WORK = 1 << 24
# The reference decoder works through a record this many output elements (whole rows) at a time.
CHUNK_ELEMENTS = 1 << 20
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
                    registry: CodecRegistry = CORE_CODECS) -> dict[str, TensorInfo]:
    """Check a record's structure against the tensors available; return the tensors it references.

    Checks field types, every node's codec and version, shapes through the tree, that referenced tensors exist and
    are named ``<record name>.<suffix>``, the decode-work limits, and that ``storage_bytes`` equals the bytes of
    those tensors.
    """
    return _validate(name, record, Context(registry, tensor_info))


def _validate(name: str, record: Any, ctx: Context) -> dict[str, TensorInfo]:
    shape = _check_top_level(name, record)
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
    if ctx.work > FREE_WORK and ctx.work > MAX_EXPANSION * max(actual, 1):
        elements, where = ctx.largest
        raise FormatError("limit_exceeded", f"decoding needs {ctx.work} output elements (every node, each use "
                          f"counted; the largest, {where}, has {elements}) from {actual} stored bytes: over the "
                          f"limit of {MAX_EXPANSION} per byte", tensor=name, field=where)
    if actual != record["storage_bytes"]:
        raise FormatError("bad_accounting", f"storage_bytes says {record['storage_bytes']} but the referenced "
                          f"tensors hold {actual} bytes", tensor=name, field="storage_bytes")
    return ctx.referenced


def _row_ranges(ctx: Context, node: Any, shape: tuple[int, int], split_products: bool) -> list[tuple[int, int]]:
    """Row ranges of about CHUNK_ELEMENTS each, or one range when the tree cannot be split (or need not be)."""
    rows, cols = shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    if rows <= step or not _splittable(ctx, node, split_products):
        return [(0, rows)]
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def _splittable(ctx: Context, node: Any, split_products: bool) -> bool:
    """Every node of the (validated) tree decodes by row ranges; matrix products only if ``split_products``."""
    codec = ctx.registry.lookup(node, ctx)
    if not codec.row_ranges or (codec.products and not split_products):
        return False
    children = [v for v in node.values() if isinstance(v, dict)]
    children += [t for key in ("terms", "parts") for t in node.get(key, ())]  # sum terms, concat parts
    return all(_splittable(ctx, child, split_products) for child in children)


def _decode_ranges(name: str, record: dict, tensor_info: Callable[[str], TensorInfo | None],
                   load: Callable[[str], np.ndarray], registry: CodecRegistry, options: Mapping[str, Any] | None,
                   keep: bool) -> np.ndarray | None:
    """Validate, then decode the record range by range: into one fp32 matrix (``keep``) or only to check the data."""
    ctx = Context(registry, tensor_info, load, dict(options or {}))
    _validate(name, record, ctx)
    if ctx.options.get("keep_terms") is not None:  # a partial load (spec/partial.md): the stack's first K terms
        record = keep_terms(record, ctx.options["keep_terms"])
    shape = matrix_shape(tuple(record["shape"]))
    # Decoding keeps whole-record matrix products (BLAS results may depend on the split); checking may split them.
    ranges = _row_ranges(ctx, record["weight"], shape, split_products=not keep)
    try:
        if len(ranges) == 1:
            matrix = ctx.decode(record["weight"], "weight")
            return np.asarray(matrix, dtype=np.float32).reshape(record["shape"]) if keep else None
        ctx.ranged = True
        out = np.empty(shape, dtype=np.float32) if keep else None
        for lo, hi in ranges:
            part = ctx.decode(record["weight"], "weight", (lo, hi))
            if out is not None:
                out[lo:hi] = part
            del part
        return out.reshape(record["shape"]) if out is not None else None
    except FormatError as exc:
        raise exc.at(tensor=name) from None
    except MemoryError:  # a valid record this machine cannot hold: say which and how big, not numpy's message
        rows, cols = shape
        raise ResourceError(f"not enough memory to decode {name!r} ({rows}x{cols} weights, "
                            f"{rows * cols * 4 / 2**30:.2f} GiB in fp32, plus intermediates)") from None


def decode_record(name: str, record: dict, tensor_info: Callable[[str], TensorInfo | None],
                  load: Callable[[str], np.ndarray], registry: CodecRegistry = CORE_CODECS,
                  options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Validate then decode a record to its fp32 weight, in the record's declared shape.

    Peak memory is the result plus about CHUNK_ELEMENTS working elements for trees without matrix products.
    """
    out = _decode_ranges(name, record, tensor_info, load, registry, options, keep=True)
    assert out is not None
    return out


def check_record(name: str, record: dict, tensor_info: Callable[[str], TensorInfo | None],
                 load: Callable[[str], np.ndarray], registry: CodecRegistry = CORE_CODECS,
                 options: Mapping[str, Any] | None = None) -> None:
    """Run every structural and data check of :func:`decode_record` without keeping the weight (bounded memory)."""
    _decode_ranges(name, record, tensor_info, load, registry, options, keep=False)


def bits_per_weight(record: dict) -> float:
    rows, cols = matrix_shape(tuple(record["shape"]))
    return record["storage_bytes"] * 8 / (rows * cols)


def total_bits_per_weight(records: Iterable[dict]) -> float | None:
    """Stored bits per weight over several records (each weighted by its size); None for no records."""
    bits = weights = 0
    for record in records:
        rows, cols = matrix_shape(tuple(record["shape"]))
        bits += record["storage_bytes"] * 8
        weights += rows * cols
    return bits / weights if weights else None


def iter_nodes(node: Any) -> Iterator[dict]:
    """Every codec node of a (possibly unvalidated) tree, depth first, parents before children."""
    if isinstance(node, dict):
        if "codec" in node:
            yield node
        for value in node.values():
            yield from iter_nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_nodes(item)


class RowReader:
    """Rows of one record's weight matrix decoded on demand (an embedding lookup decodes only the rows it needs).

    The record is validated once; each call decodes every maximal run of consecutive requested rows through the
    codecs' row ranges (a codec without row ranges is decoded whole once and kept, as ranged decoding does), with
    the same data checks and the same fp32 values as :func:`decode_record`.
    """

    def __init__(self, name: str, record: dict, tensor_info: Callable[[str], TensorInfo | None],
                 load: Callable[[str], np.ndarray], registry: CodecRegistry = CORE_CODECS) -> None:
        self.name = name
        self._ctx = Context(registry, tensor_info, load, {})
        _validate(name, record, self._ctx)
        self._ctx.ranged = True
        self._weight = record["weight"]
        self.shape = matrix_shape(tuple(record["shape"]))

    def rows(self, index: Any) -> np.ndarray:
        """fp32 rows ``W[index]`` as an array of shape ``index.shape + (columns,)``; indices must lie in range."""
        index = np.asarray(index)
        if index.dtype.kind not in "iu":
            raise TypeError(f"row indices must be integers, got {index.dtype}")
        flat = index.reshape(-1).astype(np.int64)
        count, cols = self.shape
        if flat.size and (flat.min() < 0 or flat.max() >= count):
            bad = int(flat[(flat < 0) | (flat >= count)][0])
            raise IndexError(f"row {bad} is outside {self.name!r}'s {count} rows")
        wanted, inverse = np.unique(flat, return_inverse=True)
        out = np.empty((wanted.size, cols), dtype=np.float32)
        starts = np.flatnonzero(np.diff(wanted, prepend=-2) != 1)
        ends = np.append(starts[1:], wanted.size)
        try:
            for begin, end in zip(starts.tolist(), ends.tolist(), strict=True):
                lo = int(wanted[begin])
                out[begin:end] = self._ctx.decode(self._weight, "weight", (lo, lo + end - begin))
        except FormatError as exc:
            raise exc.at(tensor=self.name) from None
        return out[inverse].reshape(*index.shape, cols)
