"""Reference codecs: structural validation and numpy decoding of every component kind in spec/components.md.

A record's weight is a tree of nodes. Each node names its codec and codec version; leaves reference tensors stored
in the same safetensors file. ``infer`` checks a node without reading tensor data and returns its output shape and
kind; ``decode`` reads data, checks what only data can tell (code ranges, indices, padding) and returns the array.
Core codecs also decode a range of rows, so a record is decoded a few MiB at a time (record.py), and apply per-tile
parameters by broadcasting over tile views: memory never grows with ``group_shape``.
Plugins add codecs by registering a :class:`Codec` instance (see spec/extending.md); they extend a copy of
:data:`CORE_CODECS`, which is frozen once the core codecs below are defined.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import FormatError, UnknownCodecError
from . import bitpack, sparse, ternary_dict
from .dtypes import FLOAT_NAMES, INT_NAMES, NUMPY_BY_NAME

MAX_DEPTH = 16
MAX_NODES = 256
MAX_ELEMENTS = 1 << 34
# Decode work of a record: output elements summed over every node occurrence (spec/record.md#limits).
MAX_WORK = 1 << 36
MAX_DIM = 1 << 40  # dims fields (shape, group_shape) lie in [1, 2^40), like tensor dimensions
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
    for names the file does not hold. ``infer`` also adds up the decode work (every node occurrence's output
    elements) and remembers each node's shape, so a record can then be decoded by row ranges (``decode(..., rows)``).

    Ownership rule for decoded arrays: a writable fp32 array returned by ``decode`` belongs to the caller, who may
    overwrite it; stored tensors, cached and plugin results are handed out read-only.
    """

    def __init__(self, registry: CodecRegistry, tensor_info: Callable[[str], TensorInfo | None],
                 load: Callable[[str], np.ndarray] | None = None, options: dict[str, Any] | None = None) -> None:
        self.registry = registry
        self._tensor_info = tensor_info
        self._load = load
        self.options = options or {}
        self.referenced: dict[str, TensorInfo] = {}
        self.nodes = 0
        self.work = 0
        self.largest: tuple[int, str] = (0, "weight")  # the node with the most output elements, and its path
        self._depth = 0
        self.path: list[str] = []
        self._infos: dict[int, NodeInfo] = {}  # id(node) -> its inferred output
        # While a record is decoded by row ranges: whole-node results reused by every range (read-only), and the
        # data checks already run on whole tensors (a row_ptr, a perm).
        self.ranged = False
        self._whole: dict[int, np.ndarray] = {}
        self._checked: set[tuple[int, str]] = set()

    # -- errors -------------------------------------------------------------------------------------------------
    def error(self, code: str, message: str, fld: str | None = None) -> FormatError:
        where = "/".join(self.path + ([fld] if fld else []))
        return FormatError(code, message, field=where or None)

    # -- tree walking -------------------------------------------------------------------------------------------
    def _enter(self, node: Any, fld: str, count: bool = True) -> Codec:
        self.path.append(fld)
        self._depth += 1
        self.nodes += count
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
            elements = int(np.prod(info.shape, dtype=object)) if len(info.shape) else 1
            if elements > MAX_ELEMENTS:
                raise self.error("limit_exceeded", f"node output {info.shape} exceeds {MAX_ELEMENTS} elements")
            self.work += elements
            if elements > self.largest[0]:
                self.largest = (elements, "/".join(self.path))
            if self.work > MAX_WORK:
                raise self.error("limit_exceeded", f"decoding the record needs over {MAX_WORK} output elements "
                                 "(summed over every node, each use counted)")
            self._infos[id(node)] = info
            return info
        finally:
            self._leave()

    def decode(self, node: dict, fld: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The node's output, or only its rows ``[lo, hi)`` (for a 1-D output: elements ``[lo, hi)``)."""
        codec = self._enter(node, fld, count=False)
        try:
            if codec.row_ranges:
                return codec.decode(node, self, rows) if rows is not None else codec.decode(node, self)
            if rows is None:
                return _read_only(codec.decode(node, self))
            return self._whole_of(node, codec)[rows[0]:rows[1]]  # a codec without row ranges: decode it once
        finally:
            self._leave()

    def whole(self, node: dict, fld: str) -> np.ndarray:
        """The node's whole output, decoded once per record while row ranges are decoded (codebooks, tables, b)."""
        if not self.ranged:
            return self.decode(node, fld)
        codec = self._enter(node, fld, count=False)
        try:
            return self._whole_of(node, codec)
        finally:
            self._leave()

    def _whole_of(self, node: dict, codec: Codec) -> np.ndarray:
        key = id(node)
        if key not in self._whole:
            self._whole[key] = _read_only(codec.decode(node, self))
        return self._whole[key]

    def first_time(self, node: dict, check: str) -> bool:
        """Whether a whole-tensor data check of ``node`` still has to run (once per record, not per row range)."""
        key = (id(node), check)
        if key in self._checked:
            return False
        if self.ranged:
            self._checked.add(key)
        return True

    def info_of(self, node: dict, fld: str) -> NodeInfo:
        """The inferred output of a node (inferred now, without counting, if this context has not seen it)."""
        info = self._infos.get(id(node))
        if info is None:
            scratch = Context(self.registry, self._tensor_info)
            scratch.path = list(self.path)
            info = scratch.infer(node, fld)
        return info

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
                or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v < MAX_DIM for v in value)):
            raise self.error("bad_field", f"field {key!r} must be a list of {rank} integers in [1, 2**40), got "
                             f"{value!r}", key)
        return tuple(value)


class Codec:
    """One component kind. Subclasses set ``name``, ``versions``, ``fields`` and implement infer/decode."""

    name: ClassVar[str]
    versions: ClassVar[frozenset[int]] = frozenset({1})
    required: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = frozenset()
    # Core codecs decode any row range: ``decode(node, ctx, rows)``. A codec without (plugin codecs) is decoded
    # whole, once per record, and sliced.
    row_ranges: ClassVar[bool] = False
    # Matrix products: their fp32 result may depend on the row range (BLAS blocking), so the record decoder does
    # not split records that contain one (verification, which discards values, does).
    products: ClassVar[bool] = False

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
    """Codec name -> the :class:`Codec` instance that reads it, and who provides it ("qformat" for the core).

    Readers take a registry (``open_file(path, registry=...)``); the format layer defaults to :data:`CORE_CODECS`,
    which is frozen. The plugin set (``qformat.plugins.get_plugins().codecs``) is a copy of it extended with the
    installed plugins' codecs; to add codecs of your own, extend a copy: ``CORE_CODECS.copy()``.
    """

    def __init__(self) -> None:
        self._codecs: dict[str, Codec] = {}
        self._owners: dict[str, str] = {}
        self._frozen = False

    def register(self, codec: Codec, owner: str = "qformat") -> None:
        from ..errors import PluginError

        if self._frozen:
            raise PluginError(f"this codec registry is read-only; register {getattr(codec, 'name', codec)!r} into an "
                              "extendable copy (registry.copy()) and pass that copy to the readers (registry=...)")
        if not isinstance(codec, Codec):
            what = codec.__name__ if isinstance(codec, type) else type(codec).__name__
            raise PluginError(f"{owner} registers {codec!r}, which is not a Codec instance: register an instance: "
                              f"register({what}())")
        if owner != "qformat" and not (isinstance(codec.name, str) and _PLUGIN_CODEC_NAME.fullmatch(codec.name)):
            raise PluginError(f"{owner} registers codec {codec.name!r}: plugin codecs must be named "
                              "'<namespace>.<name>' (dot-less names are reserved for the core)")
        if codec.name in self._codecs and self._owners[codec.name] != owner:
            raise PluginError(f"codec {codec.name!r} is registered by both {self._owners[codec.name]!r} and {owner!r}")
        self._codecs[codec.name] = codec
        self._owners[codec.name] = owner

    def freeze(self) -> CodecRegistry:
        """Make this registry read-only (``register`` then raises); returns it."""
        self._frozen = True
        return self

    @property
    def frozen(self) -> bool:
        return self._frozen

    def copy(self) -> CodecRegistry:
        """An extendable copy: the same codecs and owners, not frozen, independent of this registry."""
        clone = CodecRegistry()
        clone._codecs = dict(self._codecs)
        clone._owners = dict(self._owners)
        return clone

    def extended(self, codecs: Iterable[Codec], owner: str) -> CodecRegistry:
        """A new read-only registry: this one's codecs plus ``codecs``, registered by ``owner`` (e.g. your package).

        What a plugin hands its ``RecordBuilder`` and readers: ``CORE_CODECS.extended([MyCodec()], "my-package")``.
        """
        clone = self.copy()
        for codec in codecs:
            clone.register(codec, owner=owner)
        return clone.freeze()

    def get(self, name: str) -> Codec | None:
        """The codec registered under ``name``, or None."""
        return self._codecs.get(name)

    def owner(self, name: str) -> str | None:
        """Who registered ``name`` ("qformat" for the core), or None when it is not registered."""
        return self._owners.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._codecs

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


# The core codecs, defined below and frozen at the end of this module: the registry every format-layer reader uses
# unless given another. Nothing outside this module can add to it (plugins extend a copy: qformat.plugins).
CORE_CODECS = CodecRegistry()


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator for the core codecs of this module."""
    CORE_CODECS.register(cls())
    return cls


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by codecs

def _check_kind(ctx: Context, info: NodeInfo, kind: str, fld: str) -> None:
    if kind == "int" and info.kind != "int":
        raise ctx.error("bad_kind", f"field {fld!r} must produce integer codes, got {info.kind}", fld)


def _value_or_number(ctx: Context, node: dict, key: str) -> NodeInfo | None:
    """Scale/zero/offset-like fields: a node, a JSON number (a constant, finite in fp32), or absent (never null)."""
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


def _as_float(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _read_only(array: np.ndarray) -> np.ndarray:
    """A view the caller cannot overwrite (stored tensors, cached and plugin results)."""
    array = np.asarray(array)
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


def _own_float(array: np.ndarray) -> np.ndarray:
    """An fp32 C-contiguous array to overwrite in place: the array itself when the caller owns it, else a copy."""
    if array.dtype == np.float32 and array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.array(array, dtype=np.float32, order="C")


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


def _grid_rows(rows: tuple[int, int], gr: int) -> tuple[int, int]:
    """The parameter-grid rows that output rows [lo, hi) use."""
    return rows[0] // gr, (rows[1] - 1) // gr + 1


def _param(ctx: Context, node: dict, key: str, rows: tuple[int, int] | None) -> np.ndarray | None:
    """A per-tile parameter (a node or a JSON number) as fp32: all of it, or the grid rows that ``rows`` use."""
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return np.full((1, 1), value, dtype=np.float32)
    if rows is None:
        return _as_float(ctx.decode(value, key))
    if ctx.info_of(value, key).shape == (1, 1):
        return _as_float(ctx.whole(value, key))
    return _as_float(ctx.decode(value, key, _grid_rows(rows, node["group_shape"][0])))


def apply_tiles(values: np.ndarray, params: np.ndarray, group_shape: tuple[int, int], first_row: int,
                op: np.ufunc) -> None:
    """In place: values[i, j] = op(values[i, j], params[(first_row + i) // gr - first_row // gr, j // gc]).

    ``values`` holds output rows from ``first_row`` on; ``params`` the grid rows they use (or one [1, 1] value).
    Parameters are broadcast over tile views instead of being repeated to the output's size, so the memory needed
    never depends on ``group_shape`` (a group larger than the output is one tile along that axis).
    """
    if params.shape == (1, 1):
        op(values, params, out=values)
        return
    height, cols = values.shape
    gr, gc = group_shape
    per_row = params if gr == 1 else params[np.arange(first_row, first_row + height) // gr - first_row // gr]
    gc = min(gc, cols)
    if gc == 1:
        op(values, per_row, out=values)
        return
    full = cols // gc
    if full:
        step = values.strides[1]
        tiles = np.lib.stride_tricks.as_strided(values, (height, full, gc), (values.strides[0], gc * step, step))
        op(tiles, per_row[:, :full, None], out=tiles)
    if full * gc < cols:
        tail = values[:, full * gc:]
        op(tail, per_row[:, full:full + 1], out=tail)


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
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        info = ctx.tensor(node, "tensor")
        if info.dtype in FLOAT_NAMES:
            return NodeInfo(info.shape, "float")
        if info.dtype in INT_NAMES:
            return NodeInfo(info.shape, "int")
        raise ctx.error("bad_dtype", f"tensor dtype {info.dtype} cannot be a value or code", "tensor")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        data = ctx.load(node, "tensor")
        if rows is not None:
            data = data[rows[0]:rows[1]]
        if data.dtype.kind == "f" or data.dtype == NUMPY_BY_NAME["BF16"]:
            return _read_only(_as_float(data)) if data.dtype == np.float32 else _as_float(data)
        return _read_only(data)  # integers as stored: every consumer range-checks, then converts or indexes


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
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        bits = ctx.int_field(node, "bits", 1, 16)
        rows, cols = ctx.shape_field(node, "shape", 2)
        _check_u8(ctx, node, (rows, bitpack.packed_row_bytes(cols, bits)), f"{rows}x{cols} codes of {bits} bits")
        return NodeInfo((rows, cols), "int", 1 << bits)

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        packed = ctx.load(node, "tensor")
        if rows is not None:
            packed = packed[rows[0]:rows[1]]
        bits, cols = node["bits"], node["shape"][1]
        if not bitpack.padding_bits_are_zero(packed, bits, cols):
            raise ctx.error("nonzero_padding", "padding bits after the last code of a row must be zero", "tensor")
        return bitpack.unpack_codes(packed, bits, cols, bitpack.code_dtype(bits))


@register
class BitplanesCodec(Codec):
    """A b-bit code stored as b one-bit planes, most significant first, so readers may drop low planes."""

    name = "bitplanes"
    required = frozenset({"tensor", "bits", "shape"})
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        bits = ctx.int_field(node, "bits", 1, 16)
        rows, cols = ctx.shape_field(node, "shape", 2)
        _check_u8(ctx, node, (bits, rows, bitpack.packed_row_bytes(cols, 1)), f"{bits} planes of {rows}x{cols}")
        return NodeInfo((rows, cols), "int", 1 << bits)

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        planes = ctx.load(node, "tensor")
        if rows is not None:
            planes = planes[:, rows[0]:rows[1]]
        cols = node["shape"][1]
        for p in range(planes.shape[0]):
            if not bitpack.padding_bits_are_zero(planes[p], 1, cols):
                raise ctx.error("nonzero_padding", f"padding bits of plane {p} must be zero", "tensor")
        use = ctx.options.get("use_planes")
        bits = planes.shape[0]
        return bitpack.unpack_bitplanes(planes, cols, min(use, bits) if use else None, bitpack.code_dtype(bits))


def _check_row_ptr_info(ctx: Context, node: dict, rows: int) -> None:
    """A ``row_ptr`` field (sparse_csr, ternary_dict) names an I32/I64 tensor of ``rows + 1`` offsets."""
    ptr = ctx.tensor(node, "row_ptr")
    if ptr.dtype not in ("I32", "I64") or ptr.shape != (rows + 1,):
        raise ctx.error("shape_mismatch", f"row_ptr must be I32/I64 [{rows + 1}], got {ptr.dtype} "
                        f"{list(ptr.shape)}", "row_ptr")


@register
class TernaryDictCodec(Codec):
    """QMoE's sub-1-bit ternary stream: per row, 16-bit codewords into a fixed dictionary of pair sequences."""

    name = "ternary_dict"
    required = frozenset({"tensor", "row_ptr", "shape", "dictionary"})
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        rows, cols = ctx.shape_field(node, "shape", 2)
        if node.get("dictionary") != ternary_dict.NAME:
            raise ctx.error("bad_field", f"dictionary must be {ternary_dict.NAME!r} (version 1), got "
                            f"{node.get('dictionary')!r}", "dictionary")
        info = ctx.tensor(node, "tensor")
        if info.dtype != "U16" or len(info.shape) != 1:
            raise ctx.error("bad_dtype", f"codewords must be 1-D U16, got {info.dtype} {list(info.shape)}", "tensor")
        _check_row_ptr_info(ctx, node, rows)
        return NodeInfo((rows, cols), "int", 3)

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        n_rows, cols = node["shape"]
        first, end = rows if rows is not None else (0, n_rows)
        words = ctx.load(node, "tensor")
        ptr = ctx.load(node, "row_ptr")
        if ctx.first_time(node, "row_ptr"):
            sparse.check_row_ptr(ptr, words.shape[0], ctx.error)
        lo, hi = int(ptr[first]), int(ptr[end])
        local = np.asarray(ptr[first:end + 1], dtype=np.int64) - lo
        codes, pairs, pad = ternary_dict.expand_rows(np.asarray(words[lo:hi]), local, cols)
        width = -(-cols // 2)
        wrong = np.flatnonzero(pairs != width)
        if wrong.size:
            r = int(wrong[0])
            raise ctx.error("code_out_of_range", f"row {first + r}'s codewords expand to {int(pairs[r])} pairs of "
                            f"weights, not {width} (ceil({cols} / 2))", "tensor")
        if cols % 2 and pad.any():
            r = int(np.flatnonzero(pad)[0])
            raise ctx.error("nonzero_padding", f"row {first + r}: the pad weight after the last column must be "
                            "symbol 0", "tensor")
        return codes


@register
class TernaryCodec(Codec):
    """Values in {-1, 0, +1}, five base-3 digits per byte."""

    name = "ternary"
    required = frozenset({"tensor", "shape"})
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        rows, cols = ctx.shape_field(node, "shape", 2)
        _check_u8(ctx, node, (rows, -(-cols // bitpack.TRITS_PER_BYTE)), f"{rows}x{cols} trits")
        return NodeInfo((rows, cols), "int")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        packed = ctx.load(node, "tensor")
        if rows is not None:
            packed = packed[rows[0]:rows[1]]
        values, valid = bitpack.unpack_ternary(packed, node["shape"][1])
        if not valid:
            raise ctx.error("code_out_of_range", "ternary bytes must be < 243 with zero pad digits", "tensor")
        return values


# ---------------------------------------------------------------------------------------------------------------
# value maps

@register
class AffineCodec(Codec):
    """w = (q - zero) * scale + offset, with scale, zero and offset given per tile of group_shape (and possibly
    quantized themselves). Version 2 is version 1 plus the optional ``offset`` (GGUF's ``d * q + m``)."""

    name = "affine"
    versions = frozenset({1, 2})
    required = frozenset({"codes", "bits", "scale", "group_shape"})
    optional = frozenset({"zero", "offset"})
    row_ranges = True

    def check_fields(self, node: dict, ctx: Context) -> None:
        super().check_fields(node, ctx)
        if node["version"] == 1 and "offset" in node:  # a field version 1 does not have: unknown, as for any field
            raise ctx.error("bad_field", "codec 'affine' version 1 has no field 'offset' (it needs version 2)",
                            "offset")

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        bits = ctx.int_field(node, "bits", 1, 16)
        codes = ctx.infer(node["codes"], "codes")
        _check_kind(ctx, codes, "int", "codes")
        if len(codes.shape) != 2:
            raise ctx.error("shape_mismatch", f"codes must be 2-D, got {list(codes.shape)}", "codes")
        if codes.max_code is not None and codes.max_code > (1 << bits):
            raise ctx.error("code_out_of_range", f"codes are {codes.max_code.bit_length() - 1} bits wide but the "
                            f"node declares bits={bits}", "codes")
        for key in ("scale", "zero", "offset"):
            info = _value_or_number(ctx, node, key)
            if info is not None:
                if len(info.shape) != 2:
                    raise ctx.error("shape_mismatch", f"{key} must be 2-D, got {list(info.shape)}", key)
                _group_grid(ctx, node, codes.shape, info.shape, key)
        return NodeInfo(codes.shape, "float")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        q = ctx.decode(node["codes"], "codes", rows)
        _codes_within(ctx, q, 1 << node["bits"], "codes", f"affine codes of {node['bits']} bits")
        group = tuple(node["group_shape"])
        first = rows[0] if rows else 0
        scale = _param(ctx, node, "scale", rows)
        zero = _param(ctx, node, "zero", rows)
        offset = _param(ctx, node, "offset", rows)
        values = q.astype(np.float32, order="C")
        del q
        if zero is not None:  # ((q - zero) * scale) + offset, one fp32 rounding each, in the order the spec fixes
            apply_tiles(values, zero, group, first, np.subtract)
        apply_tiles(values, scale, group, first, np.multiply)
        if offset is not None:
            apply_tiles(values, offset, group, first, np.add)
        return values


@register
class LutCodec(Codec):
    """w = table[q]: a scalar codebook (NF4, FP4, FP8 as a table, learned k-means), global or per tile."""

    name = "lut"
    required = frozenset({"codes", "table"})
    optional = frozenset({"group_shape"})
    row_ranges = True

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

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        q = ctx.decode(node["codes"], "codes", rows)
        table_shape = ctx.info_of(node["table"], "table").shape if rows is not None else ()
        per_tile = len(table_shape) == 3 and table_shape[:2] != (1, 1)
        if per_tile:
            table = _as_float(ctx.decode(node["table"], "table", _grid_rows(rows, node["group_shape"][0])))
        else:
            table = _as_float(ctx.whole(node["table"], "table"))
        _codes_within(ctx, q, table.shape[-1], "codes", f"lut with {table.shape[-1]} entries")
        if table.ndim == 1:
            return table[q]
        if table.shape[:2] == (1, 1) and not per_tile:  # one table for the whole tensor, like a [1, 1] scale
            return table[0, 0][q]
        gr, gc = node["group_shape"]
        first = rows[0] if rows else 0
        tile_rows = (np.arange(first, first + q.shape[0]) // gr - first // gr)[:, None]
        tile_cols = np.arange(q.shape[1])[None, :] // gc
        return table[tile_rows, tile_cols, q]


@register
class ScaleCodec(Codec):
    """w = input * factor, factor per tile: per-row scales, per-input-channel scales, absmax blocks."""

    name = "scale"
    required = frozenset({"input", "factor", "group_shape"})
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        inner = ctx.infer(node["input"], "input")
        if len(inner.shape) != 2:
            raise ctx.error("shape_mismatch", f"input must be 2-D, got {list(inner.shape)}", "input")
        factor = ctx.infer(node["factor"], "factor")
        if len(factor.shape) != 2:
            raise ctx.error("shape_mismatch", f"factor must be 2-D, got {list(factor.shape)}", "factor")
        _group_grid(ctx, node, inner.shape, factor.shape, "factor")
        return NodeInfo(inner.shape, "float")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        values = _own_float(ctx.decode(node["input"], "input", rows))
        factor = _param(ctx, node, "factor", rows)
        apply_tiles(values, factor, tuple(node["group_shape"]), rows[0] if rows else 0, np.multiply)
        return values


@register
class VqCodec(Codec):
    """Additive vector codebooks: each vector of the output is the sum of M codebook entries (AQLM, VPTQ).

    Version 1: vectors are d consecutive columns of one row (codebooks [M, K, d]). Version 2 adds ``vector_shape``
    [p, d]: a vector is a p x d tile (p rows, d columns), its p*d entries row-major over the tile (codebooks
    [M, K, p*d], codes [R / p, (C / d) * M]); VPTQ's vectors along output features are [v, 1].
    """

    name = "vq"
    versions = frozenset({1, 2})
    required = frozenset({"codes", "codebooks", "shape"})
    optional = frozenset({"vector_shape"})
    row_ranges = True

    def check_fields(self, node: dict, ctx: Context) -> None:
        super().check_fields(node, ctx)
        if node["version"] == 1 and "vector_shape" in node:  # a field version 1 does not have: unknown
            raise ctx.error("bad_field", "codec 'vq' version 1 has no field 'vector_shape' (it needs version 2)",
                            "vector_shape")
        if node["version"] == 2 and "vector_shape" not in node:
            raise ctx.error("bad_record", "codec 'vq' version 2 requires field 'vector_shape'", "vector_shape")

    @staticmethod
    def _tile(node: dict, ctx: Context | None = None) -> tuple[int, int] | None:
        """[p, d] of a version 2 node (checked when ``ctx`` is given), None for version 1."""
        if node["version"] == 1:
            return None
        if ctx is None:
            return tuple(node["vector_shape"])
        return ctx.shape_field(node, "vector_shape", 2)

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        rows, cols = ctx.shape_field(node, "shape", 2)
        tile = self._tile(node, ctx)
        books = ctx.infer(node["codebooks"], "codebooks")
        if len(books.shape) != 3 or books.kind != "float":
            want = "[M, K, d]" if tile is None else "[M, K, p*d]"
            raise ctx.error("shape_mismatch", f"codebooks must be float {want}, got {list(books.shape)}",
                            "codebooks")
        m, k, width = books.shape
        if min(m, k, width) < 1:
            raise ctx.error("shape_mismatch", f"codebooks {list(books.shape)} must have M, K, d >= 1", "codebooks")
        if tile is None:
            p, d = 1, width
            if cols % d:
                raise ctx.error("shape_mismatch", f"{cols} columns are not a multiple of the vector length {d}",
                                "codebooks")
        else:
            p, d = tile
            if width != p * d:
                raise ctx.error("shape_mismatch", f"codebooks {list(books.shape)} must hold vectors of p*d = "
                                f"{p * d} entries for vector_shape {[p, d]}", "codebooks")
            if rows % p or cols % d:
                raise ctx.error("shape_mismatch", f"shape {[rows, cols]} is not a multiple of vector_shape "
                                f"{[p, d]} (rows mod p and columns mod d must be 0)", "vector_shape")
        codes = ctx.infer(node["codes"], "codes")
        _check_kind(ctx, codes, "int", "codes")
        expected = (rows // p, cols // d * m)
        if codes.shape != expected:
            what = "rows" if p == 1 else "rows / p"
            raise ctx.error("shape_mismatch", f"codes must be {list(expected)} ({what}, vectors x codebooks), got "
                            f"{list(codes.shape)}", "codes")
        if codes.max_code is not None and codes.max_code > k:
            raise ctx.error("code_out_of_range", f"codes can reach {codes.max_code - 1} but codebooks have {k} "
                            "entries", "codes")
        return NodeInfo((rows, cols), "float")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        books = _as_float(ctx.whole(node["codebooks"], "codebooks"))
        m, k, width = books.shape
        p, d = self._tile(node) or (1, width)
        code_rows = None if rows is None or p == 1 else (rows[0] // p, -(-rows[1] // p))
        q = ctx.decode(node["codes"], "codes", rows if p == 1 else code_rows)
        _codes_within(ctx, q, k, "codes", f"vq with {k} entries per codebook")
        height = q.shape[0]
        q = q.reshape(height, -1, m)
        out = books[0][q[:, :, 0]]  # [height, vectors, p*d]
        for i in range(1, m):  # fixed order m = 0, 1, ... keeps fp32 sums reproducible
            out += books[i][q[:, :, i]]
        if p == 1:
            return out.reshape(height, -1)
        # entry a*d + b of vector (i, j) is element (i*p + a, j*d + b)
        out = out.reshape(height, -1, p, d).transpose(0, 2, 1, 3).reshape(height * p, -1)
        if code_rows is not None:
            first = rows[0] - code_rows[0] * p
            out = out[first:first + rows[1] - rows[0]]
        return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------------------------------
# additive parts and transforms

@register
class SparseCsrCodec(Codec):
    """Sparse values (outliers) in CSR: row_ptr [R+1], col_idx [nnz] strictly increasing per row, values [nnz]."""

    name = "sparse_csr"
    required = frozenset({"row_ptr", "col_idx", "values", "shape"})
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        rows, cols = ctx.shape_field(node, "shape", 2)
        _check_row_ptr_info(ctx, node, rows)
        idx = ctx.tensor(node, "col_idx")
        if idx.dtype not in ("I32", "I16", "U16") or len(idx.shape) != 1:
            raise ctx.error("bad_dtype", f"col_idx must be 1-D I32/I16/U16, got {idx.dtype} {list(idx.shape)}",
                            "col_idx")
        values = ctx.infer(node["values"], "values")
        if values.shape != idx.shape:
            raise ctx.error("shape_mismatch", f"values {list(values.shape)} must match col_idx {list(idx.shape)}",
                            "values")
        return NodeInfo((rows, cols), "float")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        n_rows, cols = node["shape"]
        first, end = rows if rows is not None else (0, n_rows)
        ptr = ctx.load(node, "row_ptr")
        idx = ctx.load(node, "col_idx")
        if ctx.first_time(node, "row_ptr"):  # before any arithmetic on row_ptr (see qformat.format.sparse)
            sparse.check_row_ptr(ptr, idx.shape[0], ctx.error)
        lo, hi = int(ptr[first]), int(ptr[end])
        row_of = sparse.rows_of(ptr[first:end + 1], first)
        idx = idx[lo:hi]
        sparse.check_col_idx(idx, row_of, cols, ctx.error)
        values = _as_float(ctx.decode(node["values"], "values", (lo, hi) if rows is not None else None))
        out = np.zeros((end - first, cols), dtype=np.float32)
        out[row_of - first, idx] = values
        return out


@register
class LowRankCodec(Codec):
    """w = a @ b with a [R, k] and b [k, C]: a low-rank sidecar (LQ-LoRA, SVDQuant, LoRC)."""

    name = "lowrank"
    required = frozenset({"a", "b"})
    row_ranges = True
    products = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        a = ctx.infer(node["a"], "a")
        b = ctx.infer(node["b"], "b")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
            raise ctx.error("shape_mismatch", f"a {list(a.shape)} and b {list(b.shape)} do not multiply", "b")
        return NodeInfo((a.shape[0], b.shape[1]), "float")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        a = _as_float(ctx.decode(node["a"], "a", rows))
        b = _as_float(ctx.whole(node["b"], "b"))
        return a @ b


@register
class SignLowRankCodec(Codec):
    """w = s * (u @ v) with s = +1 where the sign bit is 1 and -1 where it is 0 (BitStack)."""

    name = "sign_lowrank"
    required = frozenset({"sign", "u", "v"})
    row_ranges = True
    products = True

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

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        sign = ctx.decode(node["sign"], "sign", rows)
        values = _own_float(_as_float(ctx.decode(node["u"], "u", rows)) @ _as_float(ctx.whole(node["v"], "v")))
        np.negative(values, out=values, where=sign != 1)
        return values


@register
class SumCodec(Codec):
    """w = t0 + t1 + ... summed left to right in fp32 (base + outliers + low-rank + residual blocks)."""

    name = "sum"
    required = frozenset({"terms"})
    row_ranges = True

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

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        out = _own_float(ctx.decode(node["terms"][0], "terms[0]", rows))
        for i, term in enumerate(node["terms"][1:], start=1):
            out += _as_float(ctx.decode(term, f"terms[{i}]", rows))  # left to right, one fp32 rounding each
        return out


@register
class PermuteCodec(Codec):
    """Input-channel permutation: the input is stored in permuted column order, w[:, perm[j]] = input[:, j]."""

    name = "permute"
    required = frozenset({"input", "perm"})
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        inner = ctx.infer(node["input"], "input")
        if len(inner.shape) != 2:
            raise ctx.error("shape_mismatch", f"input must be 2-D, got {list(inner.shape)}", "input")
        perm = ctx.tensor(node, "perm")
        if perm.dtype not in ("I32", "I64", "U16", "I16") or perm.shape != (inner.shape[1],):
            raise ctx.error("shape_mismatch", f"perm must be an integer vector of {inner.shape[1]}, got "
                            f"{perm.dtype} {list(perm.shape)}", "perm")
        return NodeInfo(inner.shape, "float")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        inner = _as_float(ctx.decode(node["input"], "input", rows))
        perm = ctx.load(node, "perm")
        if ctx.first_time(node, "perm"):
            check_permutation(ctx, perm)
        out = np.empty(inner.shape, dtype=np.float32)
        out[:, perm] = inner
        return out


@register
class ReshapeCodec(Codec):
    """The input's elements in row-major order laid out as ``shape`` [R, C]: groups that run along the flattened
    weight (HQQ axis 0, bitsandbytes blocks crossing rows) are tiles of the input's own shape, reshaped."""

    name = "reshape"
    required = frozenset({"input", "shape"})
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        rows, cols = ctx.shape_field(node, "shape", 2)
        inner = ctx.infer(node["input"], "input")  # its grids are checked against its own shape, by its codec
        if len(inner.shape) != 2:
            raise ctx.error("shape_mismatch", f"input must be 2-D, got {list(inner.shape)}", "input")
        if inner.shape[0] * inner.shape[1] != rows * cols:
            raise ctx.error("shape_mismatch", f"input {list(inner.shape)} has {inner.shape[0] * inner.shape[1]} "
                            f"elements; shape {[rows, cols]} needs {rows * cols}", "input")
        return NodeInfo((rows, cols), "float")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        n_rows, cols = node["shape"]
        if rows is None:
            return _as_float(ctx.decode(node["input"], "input")).reshape(n_rows, cols)
        in_cols = ctx.info_of(node["input"], "input").shape[1]
        lo, hi = rows[0] * cols, rows[1] * cols  # the output rows' elements in the flattened order
        if in_cols > hi - lo:
            # An input row longer than the range ([1, R*C] say): decode the input once per record and slice it,
            # rather than decoding whole input rows again for every range.
            flat = _as_float(ctx.whole(node["input"], "input")).reshape(-1)
            return flat[lo:hi].reshape(rows[1] - rows[0], cols)
        first, end = lo // in_cols, -(-hi // in_cols)  # at most one partial input row at each end
        flat = _as_float(ctx.decode(node["input"], "input", (first, end))).reshape(-1)
        start = lo - first * in_cols
        return flat[start:start + hi - lo].reshape(rows[1] - rows[0], cols)


@register
class ConcatCodec(Codec):
    """Float parts [R, C_k] side by side along the columns (axis 1): [R, sum C_k], left to right. Exact.

    With ``permute`` it puts column groups of different code widths anywhere in a weight (SliM-LLM's mixed bits per
    group: one affine per width over the columns of its groups, concatenated, then permuted back)."""

    name = "concat"
    required = frozenset({"parts", "axis"})
    row_ranges = True

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        parts = node["parts"]
        if not isinstance(parts, list) or not 1 <= len(parts) <= 64:
            raise ctx.error("bad_field", "parts must be a list of 1..64 nodes", "parts")
        axis = node["axis"]
        if type(axis) is not int or axis != 1:
            raise ctx.error("bad_field", f"axis must be 1 (parts side by side along the columns), got {axis!r}; "
                            "version 1 concatenates columns only", "axis")
        infos = [ctx.infer(p, f"parts[{i}]") for i, p in enumerate(parts)]
        for i, info in enumerate(infos):
            if info.kind != "float":
                raise ctx.error("bad_kind", f"part {i} produces integer codes; concat parts must be float (map "
                                "codes to values with affine or lut first)", f"parts[{i}]")
            if len(info.shape) != 2:
                raise ctx.error("shape_mismatch", f"part {i} must be 2-D, got {list(info.shape)}", f"parts[{i}]")
            if info.shape[0] != infos[0].shape[0]:
                raise ctx.error("shape_mismatch", f"part {i} has {info.shape[0]} rows, part 0 has "
                                f"{infos[0].shape[0]}", f"parts[{i}]")
        return NodeInfo((infos[0].shape[0], sum(info.shape[1] for info in infos)), "float")

    def decode(self, node: dict, ctx: Context, rows: tuple[int, int] | None = None) -> np.ndarray:
        blocks = [_as_float(ctx.decode(p, f"parts[{i}]", rows)) for i, p in enumerate(node["parts"])]
        return np.concatenate(blocks, axis=1) if len(blocks) > 1 else _own_float(blocks[0])


def check_permutation(ctx: Context, perm: np.ndarray) -> None:
    n = perm.shape[0]
    if n and (int(perm.min()) < 0 or int(perm.max()) >= n or np.unique(perm).shape[0] != n):
        raise ctx.error("bad_permutation", f"perm must hold each of 0..{n - 1} exactly once", "perm")


def signature(node: dict) -> str:
    """E.g. ``permute(sum(affine[4](packed[4],affine[3](packed[3],tensor,tensor),...),sparse_csr(tensor)))``."""
    codec = node.get("codec", "?")
    bits = f"[{node['bits']}]" if "bits" in node else ""
    children = [v for k, v in sorted(node.items()) if isinstance(v, dict)]
    children += [t for key in ("terms", "parts") for t in node.get(key, []) if isinstance(t, dict)]
    inner = ",".join(signature(c) for c in children)
    return f"{codec}{bits}" + (f"({inner})" if inner else "")


CORE_CODECS.freeze()  # last: every core codec above is registered
