"""Which lowered trees the Triton kernels run, and the in-memory layout a record is repacked to at load time.

numpy only (no torch, no triton), so ``supports`` stays cheap during plugin discovery and dispatch. The file layout
is untouched; only the copy in memory changes.

The record is lowered by ``qformat.lowering`` (grammar, data checks, statistics decoded once by the reference
decoder, second-level quantization included). Of the lowered trees, these kernels run::

    weight := permute(weight) | sum(weight, ...) | sparse_csr | lowrank | fused
    fused  := scale(fused, factor) | base
    base   := a "codes" or "vq" term: affine(codes) | lut(codes) | vq(codes) | packed | bitplanes | ternary

(scales directly over a code or codebook term, their factors multiplied onto one grid when the grids nest
(``lowering.fold_factors``) and folded into the fused kernel; no sign_lowrank).

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

from qformat import lowering
from qformat.format import CORE_CODECS, QuantizedTensor, bitpack
from qformat.lowering import Unsupported

MAX_BATCH = 64  # rows of x the fused kernels take; above it a prepared weight dequantizes once for a dense matmul
ROW_BLOCK_BYTES = 1 << 26  # bound on the bit-matrix temporaries of a non-power-of-two repack
FUSED_KINDS = ("codes", "vq")  # terms the fused kernels decode (with at most one scale directly above)


# ---------------------------------------------------------------------------------------------------------------
# which lowered trees run, decided from the record alone

def refusal(plan: lowering.Plan) -> str | None:
    """Why these kernels cannot run the lowered tree, or None."""
    for term in plan.terms:  # the fused kernels decode row vectors only
        if term.kind == "vq" and term.vector_rows > 1:
            return f"{term.path}: vq vectors across {term.vector_rows} rows (version 2)"
    return _refusal(plan.root, plan.rows, plan.cols)


def _scales(node: lowering.Scale) -> tuple[list[lowering.Scale], lowering.Node | None]:
    """The scales directly nested from ``node`` down (outermost first), and what they scale."""
    scales: list[lowering.Scale] = []
    child: lowering.Node | None = node
    while isinstance(child, lowering.Scale):
        scales.append(child)
        child = child.child
    return scales, child


def _refusal(node: lowering.Node | None, rows: int, cols: int) -> str | None:
    if isinstance(node, lowering.Sum):
        return next((r for r in (_refusal(t, rows, cols) for t in node.terms) if r), None)
    if isinstance(node, lowering.Permute):
        return _refusal(node.child, rows, cols)
    if isinstance(node, (lowering.Concat, lowering.Columns)):
        return f"{node.path}: concat (column blocks of other widths; the torch reference path runs it)"
    if isinstance(node, lowering.Scale):
        scales, child = _scales(node)
        if not isinstance(child, lowering.Term) or child.kind not in FUSED_KINDS:
            what = child.codec if isinstance(child, lowering.Term) else child.node["codec"]
            return f"{node.path}: a scale over {what} (only directly over one code or codebook term)"
        if lowering.finest_group([s.group for s in scales], rows, cols) is None:
            return f"{node.path}: nested scales on grids that do not nest"
        return None
    assert isinstance(node, lowering.Term)
    if node.kind == "signs":
        return f"{node.path}: sign_lowrank"
    return None


def why_unsupported(record: dict) -> str | None:
    """None when the Triton kernels handle ``record``, else the reason."""
    try:
        return refusal(lowering.plan(record))
    except Unsupported as exc:
        return str(exc)


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
    offset: Grid | None = None  # affine version 2: added after the scale
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
    """Lower the record (validation and data checks included) and repack it."""
    if sys.byteorder != "little":
        raise RuntimeError("the sliced-words layout is built by viewing bytes as little-endian int32")
    lowered = lowering.lower(qt, CORE_CODECS, check=refusal)
    return _repack(lowered.root, (lowered.rows, lowered.cols))


def _repack(node: lowering.Node | None, shape: tuple[int, int]) -> Any:
    if isinstance(node, lowering.Permute):
        return Permute(np.array(node.perm), _repack(node.child, shape))  # a writable copy: torch takes it as is
    if isinstance(node, lowering.Sum):
        return Sum([_repack(t, shape) for t in node.terms])
    if isinstance(node, lowering.Scale):  # nested scales (NVFP4's per-tensor one) fold into one factor grid
        scales, child = _scales(node)
        assert isinstance(child, lowering.Term)
        term = _fused(child, shape)
        factor = lowering.fold_factors(scales, shape[0], shape[1])
        term.factor = _grid(factor.values, factor.group, shape)
        return term
    assert isinstance(node, lowering.Term)
    if node.kind == "sparse":
        return Sparse((node.node["shape"][0], node.node["shape"][1]), node.row_ptr, node.col_idx, node.values)
    if node.kind == "lowrank":  # writable C-contiguous copies: torch takes them as they are
        return LowRank(np.array(node.a, dtype=np.float32), np.array(node.b, dtype=np.float32))
    return _fused(node, shape)


def _fused(term: lowering.Term, shape: tuple[int, int]) -> Fused:
    assert term.codes is not None
    if term.codec == "affine":
        codes = _codes(term.codes, 1 << term.node["bits"])
        params = [None if p is None else p.values for p in (term.scale, term.zero, term.offset)]
        shapes = {a.shape for a in params if a is not None}
        if len(shapes) > 1:  # some are [1, 1] constants: give them all the one grid the kernel indexes
            grid_shape = max(shapes)
            params = [None if a is None else np.broadcast_to(a, grid_shape).copy() for a in params]
        scale, zero, offset = (None if a is None else _grid(a, term.scale.group, shape) for a in params)
        return Fused(shape, codes, "affine", scale=scale, zero=zero, offset=offset)
    if term.codec == "lut":
        table = term.table
        codes = _codes(term.codes, table.shape[-1])
        group = None
        if table.ndim == 3:
            group = (shape[0], shape[1]) if table.shape[:2] == (1, 1) else tuple(term.node["group_shape"])
        return Fused(shape, codes, "lut", table=np.ascontiguousarray(table), table_group=group)
    if term.codec == "vq":
        books = np.ascontiguousarray(term.books)
        return Fused(shape, _codes(term.codes, books.shape[1]), "vq", table=books)
    return Fused(shape, _codes(term.codes, None), "codes")  # packed / bitplanes / ternary used as values


def _codes(codes: lowering.Codes, bound: int | None) -> Codes:
    """Repack a (checked) integer-code leaf; ``bound`` is the exclusive code limit its consumer needs."""
    data, cols = codes.data, codes.shape[1]
    if codes.codec == "packed":
        return sliced_from_packed(data, codes.node["bits"], cols)
    if codes.codec == "bitplanes":
        return sliced_from_planes(data, cols)
    if codes.codec == "ternary":
        values, _ = bitpack.unpack_ternary(data, cols)
        sliced = sliced_from_packed(bitpack.pack_codes(values.astype(np.int64) + 1, 2), 2, values.shape[1])
        sliced.offset = -1
        return sliced
    # an integer tensor holding one code per element, within [0, bound)
    bits = max(1, (bound - 1).bit_length())
    if bits > 16:
        raise Unsupported(f"{codes.path}: {bits}-bit codes")
    return sliced_from_packed(bitpack.pack_codes(data.astype(np.int64), bits), bits, cols)


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
