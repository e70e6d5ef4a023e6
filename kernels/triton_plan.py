"""Which codec trees the Triton kernels handle, and the in-memory layout a record is repacked to at load time.

numpy only (no torch, no triton), so ``supports`` stays cheap during plugin discovery and dispatch. The file layout
is untouched; only the copy in memory changes.

Tree grammar (every node version 1)::

    weight := permute(weight) | sum(weight, ...) | sparse_csr | lowrank | fused
    fused  := scale(base, factor) | base
    base   := affine(codes) | lut(codes) | vq(codes) | packed | bitplanes | ternary
    codes  := packed | bitplanes | tensor (integer)

Statistics (affine scale/zero, lut tables, vq codebooks, scale factors, low-rank factors, outlier values) are small;
they are decoded once by the reference decoder, whatever their own tree (second-level quantization included).

Code layout ("sliced words"): each code matrix [R, C] becomes int32 words, columns padded to KP = ceil(C/32)*32.
(KP is a multiple of 128 instead when that pads by at most 1/32, so rows start on 16 bytes.)
A b-bit code is split into power-of-two slices (b = 7 -> 4 + 2 + 1 bits, low bits in the widest slice); slice w is
a row-major array [R, KP*w/32] of words holding 32/w codes each, LSB first, so a kernel loads whole words with
plain contiguous loads and never straddles a word (3-, 5-, 6- and 7-bit codes cost exactly b bits). Slices follow
one another; the slice holding bits from ``shift`` up starts at word R*KP/32*shift. Bit-planes keep their own order
(b one-bit slices, plane p = bit b-1-p: "planar"). Ternary digits become 2-bit codes v+1 with an offset of -1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qformat.errors import FormatError
from qformat.format import REGISTRY, QuantizedTensor, TensorInfo, bitpack, validate_record
from qformat.format.codecs import Context, check_permutation
from qformat.format.dtypes import dtype_name
from qformat.format.record import matrix_shape
from qformat.format.sparse import validate_csr

CODE_LEAVES = ("packed", "bitplanes", "tensor")
MAX_BATCH = 64  # rows of x the fused kernels take; above it a prepared weight dequantizes once for a dense matmul
ROW_BLOCK_BYTES = 1 << 26  # bound on the bit-matrix temporaries of a non-power-of-two repack


class Unsupported(Exception):
    """The tree uses something these kernels do not implement."""


# ---------------------------------------------------------------------------------------------------------------
# the grammar, checked from the record alone

def check_tree(node: Any) -> None:
    """Raise :class:`Unsupported` unless every node of a weight tree fits the grammar above."""
    codec = _codec(node)
    if codec == "permute":
        check_tree(node.get("input"))
    elif codec == "sum":
        terms = node.get("terms")
        if not isinstance(terms, list) or not terms:
            raise Unsupported("sum without terms")
        for term in terms:
            check_tree(term)
    elif codec in ("sparse_csr", "lowrank"):
        return
    elif codec == "scale":
        _check_base(node.get("input"))
    else:
        _check_base(node)


def _codec(node: Any) -> str:
    if not isinstance(node, dict) or node.get("version") != 1:
        raise Unsupported(f"not a version-1 node: {node!r:.80}")
    return node.get("codec", "")


def _check_base(node: Any) -> None:
    codec = _codec(node)
    if codec in ("affine", "lut", "vq"):
        if _codec(node.get("codes")) not in CODE_LEAVES:
            raise Unsupported(f"{codec} codes must come from one of {CODE_LEAVES}")
    elif codec not in ("packed", "bitplanes", "ternary"):
        raise Unsupported(f"codec {codec!r} is not a fused term")


def supports(record: dict) -> bool:
    try:
        check_tree(record.get("weight"))
    except Unsupported:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# the plan: what a prepared weight holds, as numpy arrays

@dataclass
class Codes:
    words: np.ndarray  # int32, flat, sliced-words layout (module docstring)
    bits: int
    planar: bool
    rows: int
    cols: int
    padded_cols: int  # KP, a multiple of 32
    offset: int = 0  # added to every code (ternary: -1)


@dataclass
class Grid:
    """Per-tile parameters: value of tile (r // group[0], c // group[1])."""

    values: np.ndarray  # float32 [tiles down, tiles across]
    group: tuple[int, int]


@dataclass
class Fused:
    """One kernel launch: w = map(codes) [* factor]."""

    shape: tuple[int, int]
    codes: Codes
    kind: str  # "affine" | "lut" | "vq" | "codes"
    scale: Grid | None = None
    zero: Grid | None = None
    table: np.ndarray | None = None  # lut [T] or [tiles down, tiles across, T]; vq [M, K, d]
    table_group: tuple[int, int] | None = None
    factor: Grid | None = None


@dataclass
class Sparse:
    shape: tuple[int, int]
    row_ptr: np.ndarray  # int64 [R + 1]
    col_idx: np.ndarray  # int64 [nnz]
    values: np.ndarray  # float32 [nnz]


@dataclass
class LowRank:
    a: np.ndarray  # float32 [R, k]
    b: np.ndarray  # float32 [k, C]


@dataclass
class Permute:
    perm: np.ndarray  # int64 [C]: the kernel reads x[..., perm]
    inner: Any


@dataclass
class Sum:
    terms: list[Any] = field(default_factory=list)


def plan(qt: QuantizedTensor) -> Any:
    """Validate the record, check the data the reference decoder would check, and repack it."""
    if sys.byteorder != "little":
        raise RuntimeError("the sliced-words layout is built by viewing bytes as little-endian int32")
    check_tree(qt.record.get("weight"))
    return _Planner(qt).weight(qt.record["weight"], matrix_shape(tuple(qt.record["shape"])), "weight")


class _Planner:
    def __init__(self, qt: QuantizedTensor) -> None:
        self.qt = qt

        def info(key: str) -> TensorInfo | None:
            array = qt.tensors.get(key)
            return None if array is None else TensorInfo(dtype_name(array), tuple(array.shape), array.nbytes)

        try:
            validate_record(qt.name, qt.record, info, REGISTRY)
        except FormatError as exc:
            raise exc.at(tensor=qt.name) from None
        self.ctx = Context(REGISTRY, info, qt.tensors.__getitem__)

    def error(self, code: str, message: str, fld: str) -> FormatError:
        return FormatError(code, message, tensor=self.qt.name, field=fld)

    def array(self, node: dict, key: str) -> np.ndarray:
        return np.asarray(self.qt.tensors[node[key]])

    def value(self, node: Any, fld: str) -> np.ndarray:
        """A statistics subtree (or JSON number), decoded by the reference decoder."""
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return np.full((1, 1), node, dtype=np.float32)
        try:
            return np.array(self.ctx.decode(node, fld), dtype=np.float32)  # a writable copy
        except FormatError as exc:
            raise exc.at(tensor=self.qt.name) from None

    # -- tree ---------------------------------------------------------------------------------------------------
    def weight(self, node: dict, shape: tuple[int, int], fld: str) -> Any:
        codec = node["codec"]
        if codec == "permute":
            perm = self.array(node, "perm").astype(np.int64)
            try:
                check_permutation(self.ctx, perm)
            except FormatError as exc:
                raise self.error(exc.code, exc.message, f"{fld}/perm") from None
            return Permute(perm, self.weight(node["input"], shape, f"{fld}/input"))
        if codec == "sum":
            return Sum([self.weight(t, shape, f"{fld}/terms[{i}]") for i, t in enumerate(node["terms"])])
        if codec == "sparse_csr":
            return self.sparse(node, shape, fld)
        if codec == "lowrank":
            return LowRank(self.value(node["a"], f"{fld}/a"), self.value(node["b"], f"{fld}/b"))
        if codec == "scale":
            term = self.base(node["input"], shape, f"{fld}/input")
            term.factor = _grid(self.value(node["factor"], f"{fld}/factor"), node["group_shape"], shape)
            return term
        return self.base(node, shape, fld)

    def base(self, node: dict, shape: tuple[int, int], fld: str) -> Fused:
        codec = node["codec"]
        if codec == "affine":
            codes = self.codes(node["codes"], 1 << node["bits"], f"{fld}/codes")
            scale = self.value(node["scale"], f"{fld}/scale")
            zero = None if node.get("zero") is None else self.value(node["zero"], f"{fld}/zero")
            if zero is not None and zero.shape != scale.shape:  # one is a [1, 1] constant: give both one grid
                grid_shape = max(zero.shape, scale.shape)
                zero, scale = (np.broadcast_to(a, grid_shape).copy() for a in (zero, scale))
            return Fused(shape, codes, "affine", scale=_grid(scale, node["group_shape"], shape),
                         zero=None if zero is None else _grid(zero, node["group_shape"], shape))
        if codec == "lut":
            table = self.value(node["table"], f"{fld}/table")
            codes = self.codes(node["codes"], table.shape[-1], f"{fld}/codes")
            group = None
            if table.ndim == 3:
                group = (shape[0], shape[1]) if table.shape[:2] == (1, 1) else tuple(node["group_shape"])
            return Fused(shape, codes, "lut", table=np.ascontiguousarray(table), table_group=group)
        if codec == "vq":
            books = np.ascontiguousarray(self.value(node["codebooks"], f"{fld}/codebooks"))
            codes = self.codes(node["codes"], books.shape[1], f"{fld}/codes")
            return Fused(shape, codes, "vq", table=books)
        return Fused(shape, self.codes(node, None, fld), "codes")  # packed / bitplanes / ternary used as values

    def codes(self, node: dict, bound: int | None, fld: str) -> Codes:
        """Repack an integer-code leaf; ``bound`` is the exclusive code limit its consumer needs."""
        codec = node["codec"]
        if codec == "packed":
            packed, bits, cols = self.array(node, "tensor"), node["bits"], node["shape"][1]
            if not bitpack.padding_bits_are_zero(packed, bits, cols):
                raise self.error("nonzero_padding", "padding bits after the last code of a row must be zero",
                                 f"{fld}/tensor")
            return sliced_from_packed(packed, bits, cols)
        if codec == "bitplanes":
            planes, cols = self.array(node, "tensor"), node["shape"][1]
            for p in range(planes.shape[0]):
                if not bitpack.padding_bits_are_zero(planes[p], 1, cols):
                    raise self.error("nonzero_padding", f"padding bits of plane {p} must be zero", f"{fld}/tensor")
            return sliced_from_planes(planes, cols)
        if codec == "ternary":
            values, valid = bitpack.unpack_ternary(self.array(node, "tensor"), node["shape"][1])
            if not valid:
                raise self.error("code_out_of_range", "ternary bytes must be < 243 with zero pad digits",
                                 f"{fld}/tensor")
            codes = sliced_from_packed(bitpack.pack_codes(values.astype(np.int64) + 1, 2), 2, values.shape[1])
            codes.offset = -1
            return codes
        # an integer tensor holding one code per element
        values = self.array(node, "tensor")
        if values.ndim != 2 or values.dtype.kind not in "iu":
            raise self.error("bad_kind", "codes must be a 2-D integer tensor", f"{fld}/tensor")
        values = values.astype(np.int64)
        if values.size and (values.min() < 0 or values.max() >= bound):
            raise self.error("code_out_of_range", f"codes must lie in [0, {bound}), found "
                             f"[{int(values.min())}, {int(values.max())}]", f"{fld}/tensor")
        bits = max(1, (bound - 1).bit_length())
        if bits > 16:
            raise Unsupported(f"{bits}-bit codes")
        return sliced_from_packed(bitpack.pack_codes(values, bits), bits, values.shape[1])

    def sparse(self, node: dict, shape: tuple[int, int], fld: str) -> Sparse:
        rows, cols = node["shape"]
        ptr = self.array(node, "row_ptr").astype(np.int64)
        idx = self.array(node, "col_idx").astype(np.int64)
        values = self.value(node["values"], f"{fld}/values").reshape(-1)
        validate_csr(ptr, idx, cols, lambda code, message, where: self.error(code, message, f"{fld}/{where}"))
        return Sparse((rows, cols), ptr, idx, values)


def _grid(values: np.ndarray, group: list[int], shape: tuple[int, int]) -> Grid:
    if values.shape == (1, 1):  # one value for the whole matrix, whatever the declared tiles
        return Grid(values, (shape[0], shape[1]))
    # A tile wider than the matrix is one tile along that axis (spec); clamped so kernel index math stays in int32.
    return Grid(np.ascontiguousarray(values), (min(int(group[0]), shape[0]), min(int(group[1]), shape[1])))


# ---------------------------------------------------------------------------------------------------------------
# repacking

def slice_widths(bits: int) -> list[tuple[int, int]]:
    """(width, shift) of each power-of-two slice of a ``bits``-wide code, widest (lowest bits) first."""
    return [(w, bits & ~(2 * w - 1)) for w in (16, 8, 4, 2, 1) if bits & w]


def _padded_cols(cols: int) -> int:
    """Whole words per one-bit row; a multiple of 128 columns (16-byte rows, vector loads) when that costs <= 1/32."""
    wide = -(-cols // 128) * 128
    return wide if (wide - cols) * 32 <= cols else -(-cols // 32) * 32


def _words(rows_of_bytes: np.ndarray, words_per_row: int) -> np.ndarray:
    """uint8 [R, n] -> int32 [R, words_per_row], zero-padded, little-endian words."""
    rows, n = rows_of_bytes.shape
    out = np.zeros((rows, words_per_row * 4), dtype=np.uint8)
    out[:, :n] = rows_of_bytes
    return out.view("<i4")


def sliced_from_packed(packed: np.ndarray, bits: int, cols: int) -> Codes:
    """The canonical packed layout (rows of LSB-first bit streams) -> sliced words."""
    packed = np.asarray(packed, dtype=np.uint8)
    rows, kp = packed.shape[0], _padded_cols(cols)
    widths = slice_widths(bits)
    if len(widths) == 1:  # 1, 2, 4, 8, 16 bits: the canonical row already is the slice, padded to whole words
        return Codes(_words(packed, kp * bits // 32).reshape(-1), bits, False, rows, cols, kp)
    slices = [np.empty((rows, kp * w // 32), dtype=np.int32) for w, _ in widths]
    step = max(1, ROW_BLOCK_BYTES // max(1, kp * bits))
    for r0 in range(0, rows, step):
        block = packed[r0:r0 + step]
        n = block.shape[0]
        bit_matrix = np.unpackbits(block, axis=1, count=cols * bits, bitorder="little").reshape(n, cols, bits)
        for out, (w, shift) in zip(slices, widths, strict=True):
            part = np.zeros((n, kp, w), dtype=np.uint8)
            part[:, :cols] = bit_matrix[:, :, shift:shift + w]
            out[r0:r0 + n] = np.packbits(part.reshape(n, kp * w), axis=1, bitorder="little").view("<i4")
    return Codes(np.concatenate([s.reshape(-1) for s in slices]), bits, False, rows, cols, kp)


def sliced_from_planes(planes: np.ndarray, cols: int) -> Codes:
    """Bit-planes [b, R, ceil(C/8)] -> b one-bit slices in plane order (planar)."""
    planes = np.asarray(planes, dtype=np.uint8)
    bits, rows = planes.shape[0], planes.shape[1]
    kp = _padded_cols(cols)
    words = np.concatenate([_words(planes[p], kp // 32).reshape(-1) for p in range(bits)])
    return Codes(words, bits, True, rows, cols, kp)


def unslice(codes: Codes) -> np.ndarray:
    """Codes back from the sliced layout (int64 [R, C]); used by tests to check the repack."""
    kp, rows = codes.padded_cols, codes.rows
    plane = rows * kp // 32
    out = np.zeros((rows, codes.cols), dtype=np.int64)
    parts = ([(1, codes.bits - 1 - p, p) for p in range(codes.bits)] if codes.planar
             else [(w, shift, shift) for w, shift in slice_widths(codes.bits)])
    for w, shift, start in parts:
        words = codes.words[plane * start: plane * start + rows * kp * w // 32].reshape(rows, -1)
        values = bitpack.unpack_codes(words.view(np.uint8), w, codes.cols)
        out |= values << shift
    return out + codes.offset
