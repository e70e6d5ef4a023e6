"""Reference codecs: structural validation and numpy decoding of every component kind in spec/components.md.

A record's weight is a tree of nodes. Each node names its codec and codec version; leaves reference tensors stored
in the same safetensors file. ``infer`` checks a node without reading tensor data and returns its output shape and
kind; ``decode`` reads data, checks what only data can tell (code ranges, indices, padding) and returns the array.
Plugins add codecs by registering a :class:`Codec` subclass (see spec/extending.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import FormatError, UnknownCodecError
from . import bitpack
from .dtypes import FLOAT_NAMES, INT_NAMES, NUMPY_BY_NAME

MAX_DEPTH = 16
MAX_NODES = 256
MAX_ELEMENTS = 1 << 34
_PLUGIN_CODEC_NAME = re.compile(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class NodeInfo:
    """What validation knows about a node's output before any data is read."""

    shape: tuple[int, ...]
    kind: str  # "int" (codes) or "float" (values)
    max_code: int | None = None  # exclusive upper bound on int outputs, when the layout guarantees one


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class Context:
    """Walks a record's node tree; collects the tensors it references.

    ``tensor_info`` answers structural questions (dtype, shape) and ``load`` returns data; both raise ``missing_tensor``
    for names the file does not hold.
    """

    def __init__(self, registry: CodecRegistry, tensor_info: Callable[[str], TensorInfo | None],
                 load: Callable[[str], np.ndarray] | None = None, options: dict[str, Any] | None = None) -> None:
        self.registry = registry
        self._tensor_info = tensor_info
        self._load = load
        self.options = options or {}
        self.referenced: dict[str, TensorInfo] = {}
        self.nodes = 0
        self._depth = 0
        self.path: list[str] = []

    # -- errors -------------------------------------------------------------------------------------------------
    def error(self, code: str, message: str, fld: str | None = None) -> FormatError:
        where = "/".join(self.path + ([fld] if fld else []))
        return FormatError(code, message, field=where or None)

    # -- tree walking -------------------------------------------------------------------------------------------
    def _enter(self, node: Any, fld: str) -> Codec:
        self.path.append(fld)
        self._depth += 1
        self.nodes += 1
        if self._depth > MAX_DEPTH:
            raise self.error("limit_exceeded", f"node tree deeper than {MAX_DEPTH}")
        if self.nodes > MAX_NODES:
            raise self.error("limit_exceeded", f"more than {MAX_NODES} nodes in one record")
        if not isinstance(node, dict):
            raise self.error("bad_record", f"a node must be a JSON object, got {type(node).__name__}")
        return self.registry.lookup(node, self)

    def _leave(self) -> None:
        self.path.pop()
        self._depth -= 1

    def infer(self, node: Any, fld: str) -> NodeInfo:
        codec = self._enter(node, fld)
        try:
            codec.check_fields(node, self)
            info = codec.infer(node, self)
            if len(info.shape) and int(np.prod(info.shape, dtype=object)) > MAX_ELEMENTS:
                raise self.error("limit_exceeded", f"node output {info.shape} exceeds {MAX_ELEMENTS} elements")
            return info
        finally:
            self._leave()

    def decode(self, node: dict, fld: str) -> np.ndarray:
        codec = self._enter(node, fld)
        try:
            return codec.decode(node, self)
        finally:
            self._leave()

    # -- field helpers ------------------------------------------------------------------------------------------
    def tensor(self, node: dict, key: str) -> TensorInfo:
        name = node.get(key)
        if not isinstance(name, str) or not name:
            raise self.error("bad_record", f"field {key!r} must name a tensor", key)
        info = self._tensor_info(name)
        if info is None:
            raise self.error("missing_tensor", f"tensor {name!r} is not in the file", key)
        self.referenced[name] = info
        return info

    def load(self, node: dict, key: str) -> np.ndarray:
        if self._load is None:
            raise RuntimeError("context was built for validation only")
        return self._load(node[key])

    def int_field(self, node: dict, key: str, lo: int, hi: int) -> int:
        value = node.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.error("bad_field", f"field {key!r} must be an integer in [{lo}, {hi}], got {value!r}", key)
        return value

    def shape_field(self, node: dict, key: str, rank: int) -> tuple[int, ...]:
        value = node.get(key)
        if (not isinstance(value, list) or len(value) != rank
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise self.error("bad_field", f"field {key!r} must be a list of {rank} positive integers, got {value!r}",
                             key)
        return tuple(value)


class Codec:
    """One component kind. Subclasses set ``name``, ``versions``, ``fields`` and implement infer/decode."""

    name: ClassVar[str]
    versions: ClassVar[frozenset[int]] = frozenset({1})
    required: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = frozenset()

    def check_fields(self, node: dict, ctx: Context) -> None:
        allowed = self.required | self.optional | {"codec", "version"}
        unknown = sorted(set(node) - allowed)
        if unknown:
            raise ctx.error("bad_field", f"codec {self.name!r} has no field {unknown[0]!r}", unknown[0])
        missing = sorted(self.required - set(node))
        if missing:
            raise ctx.error("bad_record", f"codec {self.name!r} requires field {missing[0]!r}", missing[0])

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        raise NotImplementedError

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        raise NotImplementedError


class CodecRegistry:
    def __init__(self) -> None:
        self._codecs: dict[str, Codec] = {}
        self._owners: dict[str, str] = {}

    def register(self, codec: Codec, owner: str = "qformat") -> None:
        from ..errors import PluginError

        if owner != "qformat" and not _PLUGIN_CODEC_NAME.fullmatch(codec.name):
            raise PluginError(f"{owner} registers codec {codec.name!r}: plugin codecs must be named "
                              "'<namespace>.<name>' (dot-less names are reserved for the core)")
        if codec.name in self._codecs and self._owners[codec.name] != owner:
            raise PluginError(f"codec {codec.name!r} is registered by both {self._owners[codec.name]!r} and {owner!r}")
        self._codecs[codec.name] = codec
        self._owners[codec.name] = owner

    def names(self) -> dict[str, tuple[frozenset[int], str]]:
        return {n: (c.versions, self._owners[n]) for n, c in sorted(self._codecs.items())}

    def lookup(self, node: dict, ctx: Context) -> Codec:
        name = node.get("codec")
        if not isinstance(name, str):
            raise ctx.error("bad_record", "node has no string field 'codec'", "codec")
        codec = self._codecs.get(name)
        if codec is None:
            hint = f"; install the plugin that provides it (codec {name!r})" if name else ""
            raise UnknownCodecError("unknown_codec", f"codec {name!r} is not known{hint}",
                                    field="/".join(ctx.path + ["codec"]))
        version = node.get("version")
        if type(version) is not int or version not in codec.versions:
            raise UnknownCodecError("unsupported_codec_version",
                                    f"codec {name!r} version {version!r} is not supported "
                                    f"(this reader knows {sorted(codec.versions)})",
                                    field="/".join(ctx.path + ["version"]))
        return codec


REGISTRY = CodecRegistry()


def register(cls: type[Codec]) -> type[Codec]:
    REGISTRY.register(cls())
    return cls


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by codecs

def _check_kind(ctx: Context, info: NodeInfo, kind: str, fld: str) -> None:
    if kind == "int" and info.kind != "int":
        raise ctx.error("bad_kind", f"field {fld!r} must produce integer codes, got {info.kind}", fld)


def _value_or_number(ctx: Context, node: dict, key: str) -> NodeInfo | None:
    """Scale/zero-like fields: a node, a JSON number (a constant, finite in fp32), or absent (never null)."""
    if key not in node:
        return None
    value = node[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with np.errstate(over="ignore"):
            finite = abs(value) < 1e39 and np.isfinite(np.float32(value))
        if not finite:
            raise ctx.error("bad_field", f"field {key!r} must be a number finite in fp32, got {value!r}", key)
        return NodeInfo((1, 1), "float")
    if not isinstance(value, dict):
        raise ctx.error("bad_field", f"field {key!r} must be a node or a number, got {value!r}", key)
    return ctx.infer(value, key)


def _decode_value(ctx: Context, node: dict, key: str) -> np.ndarray | None:
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return np.full((1, 1), value, dtype=np.float32)
    return _as_float(ctx.decode(value, key))


def _as_float(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _group_grid(ctx: Context, node: dict, out_shape: tuple[int, int], param_shape: tuple[int, ...], fld: str,
                key: str = "group_shape") -> tuple[int, int]:
    """Check that a parameter array has one entry per (gr x gc) tile of the output, and return the tile shape."""
    gr, gc = ctx.shape_field(node, key, 2)
    expected = (-(-out_shape[0] // gr), -(-out_shape[1] // gc))
    # A [1, 1] parameter applies to the whole tensor whatever the grid (per-tensor scale, constant zero).
    if tuple(param_shape) != (1, 1):
        if tuple(param_shape) != expected:
            raise ctx.error("shape_mismatch", f"field {fld!r} has shape {list(param_shape)}; groups of {gr}x{gc} "
                            f"over {list(out_shape)} need {list(expected)}", fld)
    return gr, gc


def expand_groups(params: np.ndarray, group_shape: tuple[int, int], out_shape: tuple[int, int]) -> np.ndarray:
    """Broadcast per-tile parameters to the full output: out[r, c] = params[r // gr, c // gc]."""
    gr, gc = group_shape
    if params.shape == (1, 1):
        return params
    expanded = np.repeat(np.repeat(params, gr, axis=0), gc, axis=1)
    return expanded[: out_shape[0], : out_shape[1]]


def _codes_within(ctx: Context, codes: np.ndarray, bound: int, fld: str, what: str) -> None:
    if codes.size and (codes.min() < 0 or codes.max() >= bound):
        raise ctx.error("code_out_of_range", f"{what}: codes must lie in [0, {bound}), found "
                        f"[{int(codes.min())}, {int(codes.max())}]", fld)


# ---------------------------------------------------------------------------------------------------------------
# leaves

@register
class TensorCodec(Codec):
    """A stored tensor used as is (floats widen to fp32; integers stay integers)."""

    name = "tensor"
    required = frozenset({"tensor"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        info = ctx.tensor(node, "tensor")
        if info.dtype in FLOAT_NAMES:
            return NodeInfo(info.shape, "float")
        if info.dtype in INT_NAMES:
            return NodeInfo(info.shape, "int")
        raise ctx.error("bad_dtype", f"tensor dtype {info.dtype} cannot be a value or code", "tensor")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        data = ctx.load(node, "tensor")
        if data.dtype.kind == "f" or data.dtype == NUMPY_BY_NAME["BF16"]:
            return _as_float(data)
        if data.dtype == np.uint64:  # int64 would wrap values >= 2^63; they convert from their exact value
            return np.asarray(data)
        return np.asarray(data, dtype=np.int64)


def _check_u8(ctx: Context, node: dict, expected: tuple[int, ...], what: str) -> None:
    """Bit-level layouts are stored as U8 tensors of exactly the size their codes need."""
    info = ctx.tensor(node, "tensor")
    if info.dtype != "U8":
        raise ctx.error("bad_dtype", f"{what} must be stored as U8, got {info.dtype}", "tensor")
    if info.shape != expected:
        raise ctx.error("shape_mismatch", f"{what} need U8 {list(expected)}, tensor is {list(info.shape)}", "tensor")


@register
class PackedCodec(Codec):
    """Unsigned codes of 1..16 bits, each row an LSB-first bit stream padded to a whole byte."""

    name = "packed"
    required = frozenset({"tensor", "bits", "shape"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        bits = ctx.int_field(node, "bits", 1, 16)
        rows, cols = ctx.shape_field(node, "shape", 2)
        _check_u8(ctx, node, (rows, bitpack.packed_row_bytes(cols, bits)), f"{rows}x{cols} codes of {bits} bits")
        return NodeInfo((rows, cols), "int", 1 << bits)

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        packed = ctx.load(node, "tensor")
        bits, cols = node["bits"], node["shape"][1]
        if not bitpack.padding_bits_are_zero(packed, bits, cols):
            raise ctx.error("nonzero_padding", "padding bits after the last code of a row must be zero", "tensor")
        return bitpack.unpack_codes(packed, bits, cols)


@register
class BitplanesCodec(Codec):
    """A b-bit code stored as b one-bit planes, most significant first, so readers may drop low planes."""

    name = "bitplanes"
    required = frozenset({"tensor", "bits", "shape"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        bits = ctx.int_field(node, "bits", 1, 16)
        rows, cols = ctx.shape_field(node, "shape", 2)
        _check_u8(ctx, node, (bits, rows, bitpack.packed_row_bytes(cols, 1)), f"{bits} planes of {rows}x{cols}")
        return NodeInfo((rows, cols), "int", 1 << bits)

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        planes = ctx.load(node, "tensor")
        cols = node["shape"][1]
        for p in range(planes.shape[0]):
            if not bitpack.padding_bits_are_zero(planes[p], 1, cols):
                raise ctx.error("nonzero_padding", f"padding bits of plane {p} must be zero", "tensor")
        use = ctx.options.get("use_planes")
        return bitpack.unpack_bitplanes(planes, cols, min(use, planes.shape[0]) if use else None)


@register
class TernaryCodec(Codec):
    """Values in {-1, 0, +1}, five base-3 digits per byte."""

    name = "ternary"
    required = frozenset({"tensor", "shape"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        rows, cols = ctx.shape_field(node, "shape", 2)
        _check_u8(ctx, node, (rows, -(-cols // bitpack.TRITS_PER_BYTE)), f"{rows}x{cols} trits")
        return NodeInfo((rows, cols), "int")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        values, valid = bitpack.unpack_ternary(ctx.load(node, "tensor"), node["shape"][1])
        if not valid:
            raise ctx.error("code_out_of_range", "ternary bytes must be < 243 with zero pad digits", "tensor")
        return values.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# value maps

@register
class AffineCodec(Codec):
    """w = (q - zero) * scale, with scale and zero given per tile of group_shape (and possibly quantized themselves)."""

    name = "affine"
    required = frozenset({"codes", "bits", "scale", "group_shape"})
    optional = frozenset({"zero"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        bits = ctx.int_field(node, "bits", 1, 16)
        codes = ctx.infer(node["codes"], "codes")
        _check_kind(ctx, codes, "int", "codes")
        if len(codes.shape) != 2:
            raise ctx.error("shape_mismatch", f"codes must be 2-D, got {list(codes.shape)}", "codes")
        if codes.max_code is not None and codes.max_code > (1 << bits):
            raise ctx.error("code_out_of_range", f"codes are {codes.max_code.bit_length() - 1} bits wide but the "
                            f"node declares bits={bits}", "codes")
        for key in ("scale", "zero"):
            info = _value_or_number(ctx, node, key)
            if info is not None:
                if len(info.shape) != 2:
                    raise ctx.error("shape_mismatch", f"{key} must be 2-D, got {list(info.shape)}", key)
                _group_grid(ctx, node, codes.shape, info.shape, key)
        return NodeInfo(codes.shape, "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        q = ctx.decode(node["codes"], "codes")
        _codes_within(ctx, q, 1 << node["bits"], "codes", f"affine codes of {node['bits']} bits")
        group = tuple(node["group_shape"])
        scale = expand_groups(_decode_value(ctx, node, "scale"), group, q.shape)
        zero = _decode_value(ctx, node, "zero")
        values = q.astype(np.float32)
        if zero is not None:
            values = values - expand_groups(zero, group, q.shape)
        return values * scale


@register
class LutCodec(Codec):
    """w = table[q]: a scalar codebook (NF4, FP4, FP8 as a table, learned k-means), global or per tile."""

    name = "lut"
    required = frozenset({"codes", "table"})
    optional = frozenset({"group_shape"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        codes = ctx.infer(node["codes"], "codes")
        _check_kind(ctx, codes, "int", "codes")
        if len(codes.shape) != 2:
            raise ctx.error("shape_mismatch", f"codes must be 2-D, got {list(codes.shape)}", "codes")
        table = ctx.infer(node["table"], "table")
        if len(table.shape) == 1:
            if "group_shape" in node:
                raise ctx.error("bad_field", "a 1-D table is global; group_shape is only for [Gr, Gc, T] tables",
                                "group_shape")
        elif len(table.shape) == 3:
            if "group_shape" not in node:
                raise ctx.error("bad_record", "a per-tile table [Gr, Gc, T] needs group_shape", "group_shape")
            _group_grid(ctx, node, codes.shape, table.shape[:2], "table")
        else:
            raise ctx.error("shape_mismatch", f"table must be [T] or [Gr, Gc, T], got {list(table.shape)}", "table")
        if codes.max_code is not None and codes.max_code > table.shape[-1]:
            raise ctx.error("code_out_of_range", f"codes can reach {codes.max_code - 1} but the table has "
                            f"{table.shape[-1]} entries", "codes")
        return NodeInfo(codes.shape, "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        q = ctx.decode(node["codes"], "codes")
        table = _as_float(ctx.decode(node["table"], "table"))
        _codes_within(ctx, q, table.shape[-1], "codes", f"lut with {table.shape[-1]} entries")
        if table.ndim == 1:
            return table[q]
        if table.shape[:2] == (1, 1):  # one table for the whole tensor, like a [1, 1] scale
            return table[0, 0][q]
        gr, gc = node["group_shape"]
        rows = np.arange(q.shape[0])[:, None] // gr
        cols = np.arange(q.shape[1])[None, :] // gc
        return table[rows, cols, q]


@register
class ScaleCodec(Codec):
    """w = input * factor, factor per tile: per-row scales, per-input-channel scales, absmax blocks."""

    name = "scale"
    required = frozenset({"input", "factor", "group_shape"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        inner = ctx.infer(node["input"], "input")
        if len(inner.shape) != 2:
            raise ctx.error("shape_mismatch", f"input must be 2-D, got {list(inner.shape)}", "input")
        factor = ctx.infer(node["factor"], "factor")
        if len(factor.shape) != 2:
            raise ctx.error("shape_mismatch", f"factor must be 2-D, got {list(factor.shape)}", "factor")
        _group_grid(ctx, node, inner.shape, factor.shape, "factor")
        return NodeInfo(inner.shape, "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        inner = _as_float(ctx.decode(node["input"], "input"))
        factor = _as_float(ctx.decode(node["factor"], "factor"))
        return inner * expand_groups(factor, tuple(node["group_shape"]), inner.shape)


@register
class VqCodec(Codec):
    """Additive vector codebooks: each d-wide slice of a row is the sum of M codebook entries (AQLM, VPTQ)."""

    name = "vq"
    required = frozenset({"codes", "codebooks", "shape"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        rows, cols = ctx.shape_field(node, "shape", 2)
        books = ctx.infer(node["codebooks"], "codebooks")
        if len(books.shape) != 3 or books.kind != "float":
            raise ctx.error("shape_mismatch", f"codebooks must be float [M, K, d], got {list(books.shape)}",
                            "codebooks")
        m, k, d = books.shape
        if min(m, k, d) < 1:
            raise ctx.error("shape_mismatch", f"codebooks {list(books.shape)} must have M, K, d >= 1", "codebooks")
        if cols % d:
            raise ctx.error("shape_mismatch", f"{cols} columns are not a multiple of the vector length {d}",
                            "codebooks")
        codes = ctx.infer(node["codes"], "codes")
        _check_kind(ctx, codes, "int", "codes")
        expected = (rows, cols // d * m)
        if codes.shape != expected:
            raise ctx.error("shape_mismatch", f"codes must be {list(expected)} (rows, vectors x codebooks), got "
                            f"{list(codes.shape)}", "codes")
        if codes.max_code is not None and codes.max_code > k:
            raise ctx.error("code_out_of_range", f"codes can reach {codes.max_code - 1} but codebooks have {k} "
                            "entries", "codes")
        return NodeInfo((rows, cols), "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        books = _as_float(ctx.decode(node["codebooks"], "codebooks"))
        m, k, d = books.shape
        q = ctx.decode(node["codes"], "codes")
        _codes_within(ctx, q, k, "codes", f"vq with {k} entries per codebook")
        rows = q.shape[0]
        q = q.reshape(rows, -1, m)
        out = books[0][q[:, :, 0]]
        for i in range(1, m):  # fixed order m = 0, 1, ... keeps fp32 sums reproducible
            out = out + books[i][q[:, :, i]]
        return out.reshape(rows, -1)


# ---------------------------------------------------------------------------------------------------------------
# additive parts and transforms

@register
class SparseCsrCodec(Codec):
    """Sparse values (outliers) in CSR: row_ptr [R+1], col_idx [nnz] strictly increasing per row, values [nnz]."""

    name = "sparse_csr"
    required = frozenset({"row_ptr", "col_idx", "values", "shape"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        rows, cols = ctx.shape_field(node, "shape", 2)
        ptr = ctx.tensor(node, "row_ptr")
        idx = ctx.tensor(node, "col_idx")
        if ptr.dtype not in ("I32", "I64") or ptr.shape != (rows + 1,):
            raise ctx.error("shape_mismatch", f"row_ptr must be I32/I64 [{rows + 1}], got {ptr.dtype} "
                            f"{list(ptr.shape)}", "row_ptr")
        if idx.dtype not in ("I32", "I16", "U16") or len(idx.shape) != 1:
            raise ctx.error("bad_dtype", f"col_idx must be 1-D I32/I16/U16, got {idx.dtype} {list(idx.shape)}",
                            "col_idx")
        values = ctx.infer(node["values"], "values")
        if values.shape != idx.shape:
            raise ctx.error("shape_mismatch", f"values {list(values.shape)} must match col_idx {list(idx.shape)}",
                            "values")
        return NodeInfo((rows, cols), "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        rows, cols = node["shape"]
        ptr = np.asarray(ctx.load(node, "row_ptr"), dtype=np.int64)
        idx = np.asarray(ctx.load(node, "col_idx"), dtype=np.int64)
        values = _as_float(ctx.decode(node["values"], "values"))
        nnz = idx.shape[0]
        if ptr[0] != 0 or ptr[-1] != nnz or np.any(np.diff(ptr) < 0):
            raise ctx.error("bad_index", f"row_ptr must start at 0, never decrease, and end at nnz={nnz}", "row_ptr")
        if nnz and (idx.min() < 0 or idx.max() >= cols):
            raise ctx.error("index_out_of_range", f"col_idx must lie in [0, {cols}), found "
                            f"[{int(idx.min())}, {int(idx.max())}]", "col_idx")
        row_of = np.repeat(np.arange(rows), np.diff(ptr))
        if nnz > 1:
            same_row = row_of[1:] == row_of[:-1]
            if np.any(same_row & (idx[1:] <= idx[:-1])):
                raise ctx.error("bad_index", "col_idx must strictly increase within a row", "col_idx")
        out = np.zeros((rows, cols), dtype=np.float32)
        out[row_of, idx] = values
        return out


@register
class LowRankCodec(Codec):
    """w = a @ b with a [R, k] and b [k, C]: a low-rank sidecar (LQ-LoRA, SVDQuant, LoRC)."""

    name = "lowrank"
    required = frozenset({"a", "b"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        a = ctx.infer(node["a"], "a")
        b = ctx.infer(node["b"], "b")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
            raise ctx.error("shape_mismatch", f"a {list(a.shape)} and b {list(b.shape)} do not multiply", "b")
        return NodeInfo((a.shape[0], b.shape[1]), "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        a = _as_float(ctx.decode(node["a"], "a"))
        b = _as_float(ctx.decode(node["b"], "b"))
        return a @ b


@register
class SignLowRankCodec(Codec):
    """w = s * (u @ v) with s = +1 where the sign bit is 1 and -1 where it is 0 (BitStack)."""

    name = "sign_lowrank"
    required = frozenset({"sign", "u", "v"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        sign = ctx.infer(node["sign"], "sign")
        _check_kind(ctx, sign, "int", "sign")
        if sign.max_code is None or sign.max_code > 2:
            raise ctx.error("bad_kind", "sign must be a 1-bit packed or bit-plane node", "sign")
        u = ctx.infer(node["u"], "u")
        v = ctx.infer(node["v"], "v")
        if len(u.shape) != 2 or len(v.shape) != 2 or u.shape[1] != v.shape[0]:
            raise ctx.error("shape_mismatch", f"u {list(u.shape)} and v {list(v.shape)} do not multiply", "v")
        if (u.shape[0], v.shape[1]) != sign.shape:
            raise ctx.error("shape_mismatch", f"u @ v is {[u.shape[0], v.shape[1]]} but sign is "
                            f"{list(sign.shape)}", "sign")
        return NodeInfo(sign.shape, "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        sign = ctx.decode(node["sign"], "sign")
        magnitude = _as_float(ctx.decode(node["u"], "u")) @ _as_float(ctx.decode(node["v"], "v"))
        return np.where(sign == 1, magnitude, -magnitude).astype(np.float32)


@register
class SumCodec(Codec):
    """w = t0 + t1 + ... summed left to right in fp32 (base + outliers + low-rank + residual blocks)."""

    name = "sum"
    required = frozenset({"terms"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        terms = node["terms"]
        if not isinstance(terms, list) or not 1 <= len(terms) <= 64:
            raise ctx.error("bad_field", "terms must be a list of 1..64 nodes", "terms")
        infos = [ctx.infer(t, f"terms[{i}]") for i, t in enumerate(terms)]
        for i, info in enumerate(infos):
            if info.shape != infos[0].shape or len(info.shape) != 2:
                raise ctx.error("shape_mismatch", f"term {i} has shape {list(info.shape)}, term 0 has "
                                f"{list(infos[0].shape)}", f"terms[{i}]")
        return NodeInfo(infos[0].shape, "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        out = _as_float(ctx.decode(node["terms"][0], "terms[0]"))
        for i, term in enumerate(node["terms"][1:], start=1):
            out = out + _as_float(ctx.decode(term, f"terms[{i}]"))
        return out


@register
class PermuteCodec(Codec):
    """Input-channel permutation: the input is stored in permuted column order, w[:, perm[j]] = input[:, j]."""

    name = "permute"
    required = frozenset({"input", "perm"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        inner = ctx.infer(node["input"], "input")
        if len(inner.shape) != 2:
            raise ctx.error("shape_mismatch", f"input must be 2-D, got {list(inner.shape)}", "input")
        perm = ctx.tensor(node, "perm")
        if perm.dtype not in ("I32", "I64", "U16", "I16") or perm.shape != (inner.shape[1],):
            raise ctx.error("shape_mismatch", f"perm must be an integer vector of {inner.shape[1]}, got "
                            f"{perm.dtype} {list(perm.shape)}", "perm")
        return NodeInfo(inner.shape, "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        inner = _as_float(ctx.decode(node["input"], "input"))
        perm = np.asarray(ctx.load(node, "perm"), dtype=np.int64)
        check_permutation(ctx, perm)
        out = np.empty_like(inner)
        out[:, perm] = inner
        return out


def check_permutation(ctx: Context, perm: np.ndarray) -> None:
    n = perm.shape[0]
    if n and (perm.min() < 0 or perm.max() >= n or np.unique(perm).shape[0] != n):
        raise ctx.error("bad_permutation", f"perm must hold each of 0..{n - 1} exactly once", "perm")


def signature(node: dict) -> str:
    """E.g. ``permute(sum(affine[4](packed[4],affine[3](packed[3],tensor,tensor),...),sparse_csr(tensor)))``."""
    codec = node.get("codec", "?")
    bits = f"[{node['bits']}]" if "bits" in node else ""
    children = [v for k, v in sorted(node.items()) if isinstance(v, dict)]
    children += [t for t in node.get("terms", []) if isinstance(t, dict)]
    inner = ",".join(signature(c) for c in children)
    return f"{codec}{bits}" + (f"({inner})" if inner else "")
