"""Prepared weights for the Numba kernels: a record's terms repacked in memory, and y = x @ W.T computed from them.

Built from the record lowered by ``qformat.lowering`` (statistics decoded, data checked once there). Here the terms
are only repacked: statistics folded into fp32 arrays on a [rows, column groups] grid (a few percent of the packed
size), codes into sliced words, sparse outliers into int64/int32/fp32 CSR arrays. Nothing full-size is kept:
affine statistics tiled down the columns ([64, 1], HQQ axis 0) are folded into x per row block (``RowBlockTerm``)
rather than expanded to the column grid, and FP8 tables are recognised so the kernel decodes codes arithmetically.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qformat.format import CORE_CODECS, QuantizedTensor, signature
from qformat.format.record import matrix_shape
from qformat.kernel_api import PreparedWeight
from qformat.lowering import Codes, Columns, Param, Permute, Scale, Term, Unsupported, lower

from . import numba_gemv as K
from . import numba_repack as repack
from .numba_plan import refusal
from .numba_threads import GOVERNOR, stall_budget

_EMPTY_TABLE = np.zeros((1, 1), dtype=np.float32)
# vq: precompute codebook . x tables when M*V*K stays under this many floats per row of x (and K <= rows). AQLM 1x16
# (K = 65536, d = 8) measured single-threaded on a shared 2-core EPYC, table (einsum + vq_lookup_dot) vs direct
# (vq_row_kernel): 1536x576 22.1 vs 0.70 ms, 576x576 40.5 vs 0.39 ms, 192x576 47.1 vs 0.12 ms; at 4096^2 the table
# would be 512 x 65536 floats (128 MB) per call against 13.1 ms direct. A table costs ~5 ns per entry and a direct
# vector 1-6 ns, so it pays only past ~65536 x 5 / 1.2 rows: never for 1x16, which the limit and K <= rows keep direct.
LOOKUP_TABLE_LIMIT = 1 << 20


def _regrid(param: np.ndarray, group: tuple[int, int], rows: int, cols: int, gc: int, ngroups: int) -> np.ndarray:
    """A [ceil(R/gr), ceil(C/gc')] (or [1, 1]) parameter on the grid [R, ngroups] of column groups of width gc."""
    if param.shape == (1, 1):
        return np.full((rows, ngroups), param[0, 0], dtype=np.float32)
    gr, pgc = group
    row_idx = np.minimum(np.arange(rows) // gr, param.shape[0] - 1)
    col_idx = np.zeros(ngroups, dtype=np.int64) if pgc >= cols else np.minimum(np.arange(ngroups) * gc // pgc,
                                                                                  param.shape[1] - 1)
    return np.ascontiguousarray(param[row_idx][:, col_idx], dtype=np.float32)


@dataclass
class _Grid:
    """Column groups of width ``width`` (the last may be short); every parameter is constant within one."""

    width: int
    count: int
    cols: int

    @classmethod
    def common(cls, params: list[tuple[np.ndarray, tuple[int, int]]], cols: int, extra: tuple[int, ...] = ()
               ) -> _Grid:
        widths = [g[1] for p, g in params if p.shape != (1, 1) and g[1] < cols] + [w for w in extra if w < cols]
        width = math.gcd(*widths) if widths else cols
        return cls(width, -(-cols // width), cols)

    def product(self, params: list[tuple[np.ndarray, tuple[int, int]]], rows: int) -> np.ndarray:
        out = np.ones((rows, self.count), dtype=np.float32)
        for param, group in params:
            out *= _regrid(param, group, rows, self.cols, self.width, self.count)
        return out

    def col_group(self) -> np.ndarray:
        return np.minimum(np.arange(self.cols) // self.width, self.count - 1).astype(np.int32)


def _row_factor(factors: list[Scale], rows: int, cols: int) -> np.ndarray | None:
    if not factors:
        return None
    return _Grid(cols, 1, cols).product([f.param for f in factors], rows)[:, 0]


def _batch_split(batch: int) -> list[int]:
    """Rows of x per kernel call: widest accumulator sets first (7 -> 4, 2, 1)."""
    out = []
    for width in K.BATCH_WIDTHS:
        while batch >= width:
            out.append(width)
            batch -= width
    return out


# ---------------------------------------------------------------------------------------------------------------
# terms

class CodeTerm:
    """sum_g S[r, g] sum_c v(q_rc) x_c - sum_g ZS[r, g] xsum_g over sliced b-bit words (affine, lut, raw codes).

    ZS is the zero point times the scale, minus the affine offset (version 2) times the factors above it: a
    per-group bias, so an offset costs nothing in the hot loop."""

    def __init__(self, words: np.ndarray, bits: int, scale: np.ndarray, zero_scale: np.ndarray | None, grid: _Grid,
                 table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, fp8: int | None = None,
                 block_scale: np.ndarray | None = None) -> None:
        """``table``: (values [tables, 2**bits], first table of each row [R], offset per column group [G]);
        ``fp8``: K.LUT_E4M3 or K.LUT_E5M2 when the 8-bit table is that format for every code present;
        ``block_scale``: where ``scale`` is one grouped parameter times constants, that parameter on the grid (fp32
        [R, G]), so that FP8 block scales can be kept as bytes (:func:`compact_scales`)."""
        self.words, self.bits, self.cols = words, bits, grid.cols
        rows = words.shape[0]
        self.lut = table is not None
        if table is None:
            table = (_EMPTY_TABLE, np.zeros(rows, dtype=np.int32), np.zeros(grid.count, dtype=np.int32))
        self.table, self.row_tab, self.grp_tab = (np.ascontiguousarray(a) for a in table)
        self.lut_mode = K.LUT_NONE
        if self.lut and fp8 is not None:
            self.lut_mode = fp8
        elif self.lut:
            one_table_per_row = not self.grp_tab.any()
            self.lut_mode = K.LUT_PERMUTE if K.PERMUTE_LUT and bits <= 4 and one_table_per_row else K.LUT_GATHER
            if self.lut_mode == K.LUT_PERMUTE and self.table.shape[1] < K.LANES:
                self.table = np.pad(self.table, ((0, 0), (0, K.LANES - self.table.shape[1])))
        self.scale = np.ascontiguousarray(scale, dtype=np.float32)
        self.zs = (np.ascontiguousarray(zero_scale, dtype=np.float32) if zero_scale is not None
                   else np.zeros((rows, 0), dtype=np.float32))
        self.padded = words.shape[1] * K.LANES * K.codes_per_word(bits)
        self._kernels: dict[int, Any] = {}
        self.col_group = grid.col_group()
        self.group_starts = (np.arange(grid.count, dtype=np.int64) * grid.width if zero_scale is not None
                             else np.zeros(0, dtype=np.int64))
        self.aligned = grid.count == 1 or grid.width % K.LANES == 0
        cpw = K.codes_per_word(bits)
        tiles = words.shape[1]
        real_slices = -(-self.cols // K.LANES)
        slices = np.arange(tiles * cpw)
        slice_group = np.minimum(slices * K.LANES // grid.width, grid.count - 1).astype(np.int32)
        # unsigned: numba then skips negative-index wraparound, a handful of scalar ops per slot in the hot loop
        self.slice_group = np.ascontiguousarray(slice_group.reshape(tiles, cpw).astype(np.uint32))
        self.tile_group = np.full(tiles, -1, dtype=np.int32)
        for t in range(tiles):
            real = slice_group[t * cpw: min((t + 1) * cpw, real_slices)]
            if real.size == 0 or (real == real[0]).all():
                self.tile_group[t] = real[0] if real.size else 0
        if self.lut_mode in (K.LUT_E4M3, K.LUT_E5M2) and (self.tile_group >= 0).all():  # 32 codes per step
            self.lut_mode += K.LUT_E4M3_TILE - K.LUT_E4M3
        self.spg = K.row_dot_spg(bits, self.lut_mode, grid.width, grid.count)  # -1: tile by tile
        # 4-bit tables on whole rows: words in the nibble layout (byte-plane lookups, ``numba_gemv.ROW_NIBBLE``),
        # where every run of slots covers whole vectors of 8 columns
        self.nibble = K.NIBBLE_OFF
        if K.NIBBLE_LUT and self.lut_mode == K.LUT_PERMUTE and bits == 4 and self.spg >= 0 \
                and self.table.shape[1] == K.LANES:
            self.nibble = K.NIBBLE_PLANES
            int8_form = int8_table_form(self.table, self.scale)
            if int8_form is not None:  # small-integer tables: one int8 plane (``numba_gemv.ROW_NIBBLE8``)
                self.nibble = K.NIBBLE_INT8
                self.table, self.scale = int8_form
            self.words = K.to_nibble_layout(words, self.nibble == K.NIBBLE_INT8)
        # whole-row table kernels on groups narrower than the row: scales as one byte per group where exact
        self.scale_code, self.scale_mul = K.SCALE_F32, np.float32(1.0)
        if self.nibble and self.spg > 0 and zero_scale is None:
            compact = compact_scales(self.scale, block_scale)
            if compact is not None:
                self.scale, self.scale_code, self.scale_mul = compact
        self._bind_rows()

    def _bind_rows(self) -> None:
        """(Re)derive what depends on the row arrays: the kernel arguments and the stall bookkeeping."""
        self._best = {nb: [math.inf, 0] for nb in K.BATCH_WIDTHS}  # per width: fastest parallel call, calls
        self._budget = stall_budget(self.words.nbytes)
        self._args = (self.words, self.table, self.row_tab, self.grp_tab, self.scale, self.scale_mul, self.tile_group,
                      self.slice_group, self.zs, self.group_starts, 0)  # 0: one x for every row

    def _with_rows(self, words: np.ndarray, table: np.ndarray, row_tab: np.ndarray, scale: np.ndarray,
                   zs: np.ndarray) -> CodeTerm:
        """This term's column layout (tiles, groups, kernels) over other rows."""
        term = copy.copy(self)
        term.words, term.table, term.row_tab, term.scale, term.zs = words, table, row_tab, scale, zs
        term._bind_rows()
        return term

    def rows(self, start: int, stop: int) -> CodeTerm:
        """Output rows [start, stop) as a term of their own, sharing this term's memory (row slices of C-contiguous
        arrays stay C-contiguous, so the kernels take them as they are)."""
        return self._with_rows(self.words[start:stop], self.table, self.row_tab[start:stop], self.scale[start:stop],
                               self.zs[start:stop])

    def same_columns(self, other: Any) -> bool:
        """Whether ``other`` lays out its columns exactly as this term does, so that their rows can be stacked."""
        if type(self) is not CodeTerm or type(other) is not CodeTerm:  # a RowBlockTerm keeps its own x per block
            return False
        scalars = ("bits", "cols", "lut", "lut_mode", "padded", "aligned", "spg", "nibble", "scale_code", "scale_mul")
        if any(getattr(self, a) != getattr(other, a) for a in scalars):
            return False
        if (self.words.shape[1:], self.scale.shape[1:], self.zs.shape[1:], self.table.shape[1:]) != \
                (other.words.shape[1:], other.scale.shape[1:], other.zs.shape[1:], other.table.shape[1:]):
            return False
        columns = ("grp_tab", "col_group", "group_starts", "slice_group", "tile_group")
        return all(np.array_equal(getattr(self, a), getattr(other, a)) for a in columns)

    @staticmethod
    def stack(terms: Sequence[CodeTerm]) -> CodeTerm:
        """One term whose rows are the rows of ``terms`` in order (all :meth:`same_columns`); copies the row arrays."""
        first = terms[0]
        if first.lut and not all(np.array_equal(first.table, t.table) for t in terms[1:]):
            offsets = np.cumsum([0] + [t.table.shape[0] for t in terms[:-1]])
            table = np.ascontiguousarray(np.concatenate([t.table for t in terms]))
            row_tab = np.concatenate([t.row_tab + np.int32(o) for t, o in zip(terms, offsets, strict=True)])
        else:  # one shared table (or none: affine codes)
            table, row_tab = first.table, np.concatenate([t.row_tab for t in terms])
        return first._with_rows(np.concatenate([t.words for t in terms]), table,
                                np.ascontiguousarray(row_tab, dtype=np.int32),
                                np.concatenate([t.scale for t in terms]), np.concatenate([t.zs for t in terms]))

    def matmul_into(self, x: np.ndarray, y: np.ndarray) -> None:
        batch = x.shape[0]
        if not self.aligned:
            padded = np.zeros((batch, self.padded), dtype=np.float32)
            xsum = np.empty((batch, self.group_starts.shape[0]), dtype=np.float32)
            K.pad_and_group_sums(x, padded, self.group_starts, xsum)
            K.dot_any_group(self.words, self.bits, self.table, self.lut, self.row_tab, self.grp_tab, self.fp32_scale(),
                            self.col_group, self.zs, xsum, padded, y)
            return
        args = self._args
        if batch == 1:  # decoding: one token
            GOVERNOR.run(self._best[1], self._budget, self._kernel(1), *args, x, y)
            return
        start = 0
        for nb in _batch_split(batch):
            GOVERNOR.run(self._best[nb], self._budget * nb, self._kernel(nb), *args, x[start:start + nb],
                         y[start:start + nb])
            start += nb

    def _kernel(self, nb: int) -> Any:
        kernel = self._kernels.get(nb)
        if kernel is None:
            kernel = self._kernels[nb] = K.dot_kernel(self.bits, nb, self.lut_mode, self.spg, self.nibble,
                                                      self.scale_code)
        return kernel

    def dequant_into(self, out: np.ndarray, overwrite: bool = False) -> None:
        words = K.from_nibble_layout(self.words, self.nibble == K.NIBBLE_INT8) if self.nibble else self.words
        K.dequant_codes(words, self.bits, self.table, self.lut, self.row_tab, self.grp_tab, self.fp32_scale(),
                        self.col_group, self.zs, out, overwrite)

    def fp32_scale(self) -> np.ndarray:
        """The scales as fp32 [R, G] (decoded as the kernel decodes them when they are kept as bytes)."""
        return decode_scales(self.scale, self.scale_code, self.scale_mul)

    def arrays(self) -> list[np.ndarray]:
        return [self.words, self.table, self.row_tab, self.grp_tab, self.scale, self.zs, self.col_group,
                self.slice_group, self.tile_group]


class RowBlockTerm(CodeTerm):
    """Affine codes whose scale and zero change along the row every few columns but hold for ``block`` rows (HQQ
    axis 0: groups [64, 1]): folded into x instead of a [R, C] grid of statistics,
        y_r = f_r (sum_c q_rc (S[blk, c] x_c) - sum_c ZS[blk, c] x_c),  blk = r // block,  (ZS = Z S - offset)
    so the kernel runs on unit scales with one scaled x per row block (``block`` a multiple of its row tiles)."""

    def __init__(self, words: np.ndarray, bits: int, row_factor: np.ndarray, block: int, scale: np.ndarray,
                 zero_scale: np.ndarray | None, cols: int) -> None:
        """``scale``, ``zero_scale``: fp32 [ceil(R / block), C]; ``row_factor``: fp32 [R] (row scales above)."""
        self.block = block  # before CodeTerm's __init__ binds the kernel arguments
        super().__init__(words, bits, row_factor.reshape(-1, 1), None, _Grid(cols, 1, cols))
        self.block_scale = np.ascontiguousarray(scale, dtype=np.float32)
        self.block_zs = None if zero_scale is None else np.ascontiguousarray(zero_scale, dtype=np.float32)
        self.block_of = np.arange(words.shape[0]) // block
        self.row_factor = np.ascontiguousarray(row_factor, dtype=np.float32)

    def _bind_rows(self) -> None:
        super()._bind_rows()
        self._args = self._args[:-1] + (self.block,)

    def matmul_into(self, x: np.ndarray, y: np.ndarray) -> None:
        start = 0
        for nb in _batch_split(x.shape[0]):
            part, out = x[start:start + nb], y[start:start + nb]  # row slices of C arrays: contiguous
            scaled = (self.block_scale[:, None, :] * part[None]).reshape(-1, self.cols)  # a fresh C array
            GOVERNOR.run(self._best[nb], self._budget * nb, self._kernel(nb), *self._args, scaled, out)
            if self.block_zs is not None:  # the zero points' share, per row block, times the row factor
                out -= (part @ self.block_zs.T)[:, self.block_of] * self.row_factor
            start += nb

    def dequant_into(self, out: np.ndarray, overwrite: bool = False) -> None:
        codes = np.empty_like(out)
        ones = np.ones((out.shape[0], 1), dtype=np.float32)
        K.dequant_codes(self.words, self.bits, self.table, False, self.row_tab, self.grp_tab, ones, self.col_group,
                        np.zeros((out.shape[0], 0), dtype=np.float32), codes, True)
        codes *= self.block_scale[self.block_of]
        if self.block_zs is not None:
            codes -= self.block_zs[self.block_of]
        codes *= self.scale
        if overwrite:
            out[...] = codes
        else:
            out += codes

    def arrays(self) -> list[np.ndarray]:
        extra = [self.block_scale] + ([self.block_zs] if self.block_zs is not None else [])
        return super().arrays() + extra


class VqTerm:
    """sum_v S[r, g(v)] sum_m books[m, code] . x_v; per-call books . x tables when they are cheaper than rows.

    Codes of at most 8 bits under row scales read the table a code byte at a time from uint64 words
    (``vq_byte_lookup_dot``: AQLM 2x8 and 1x8; 2.5x to 26x faster than the row-by-row lookup on one thread, 10x at
    4096^2, bench/GEMV_NOTES.md); other tables go through ``vq_lookup_dot``. Where a table would cost more than
    it saves (fewer rows than entries, or over LOOKUP_TABLE_LIMIT floats: AQLM 1x16) the codebooks are read
    directly, under row scales with one accumulator per vector lane (``vq_row_kernel``), else ``vq_dot``."""

    def __init__(self, codes: np.ndarray, books: np.ndarray, scale: np.ndarray, grid: _Grid) -> None:
        self.codes, self.books, self.scale = codes, books, scale
        books_n, entries, dim = books.shape
        rows, vectors = codes.shape[:2]
        self.col_group = grid.col_group()
        first = self.col_group[::dim][:vectors]
        last = self.col_group[dim - 1::dim][:vectors]
        self.vec_group = np.where(first == last, first, -1).astype(np.int32)
        self.lookup = (bool((self.vec_group >= 0).all()) and entries <= rows
                       and books_n * vectors * entries <= LOOKUP_TABLE_LIMIT)
        self.words = None
        self.row_scale = np.ascontiguousarray(scale[:, 0])
        if self.lookup and entries <= 256 and grid.count == 1 and sys.byteorder == "little":
            self.words = _code_words(codes)
            self.codes = _codes_of_words(self.words, codes.shape)  # a view: the codes are kept once
            self.books_t = np.zeros((books_n, dim, 256), dtype=np.float32)  # [M, d, 256]: entries past K zero
            self.books_t[:, :, :entries] = books.transpose(0, 2, 1)
        self.direct_rows = not self.lookup and grid.count == 1 and dim <= K.VQ_ROW_MAX_WIDTH
        self._best = [math.inf, 0]  # the thread governor's record (numba_threads)
        self._budget = stall_budget(codes.nbytes)

    def matmul_into(self, x: np.ndarray, y: np.ndarray) -> None:
        batch = x.shape[0]
        books_n, entries, dim = self.books.shape
        if self.words is not None:
            GOVERNOR.run(self._best, self._budget * batch, _byte_lookup, self.words, self.books_t, self.row_scale,
                         x, y)
            return
        if self.direct_rows:
            GOVERNOR.run(self._best, self._budget * batch, K.vq_row_kernel(dim), self.codes, self.books,
                         self.row_scale, x, y)
            return
        xv = x.reshape(batch, -1, dim)
        if self.lookup:
            # partial[b, m, v, k] = books[m, k] . x[b, v]
            partial = np.ascontiguousarray(np.einsum("bvd,mkd->bmvk", xv, self.books, optimize=True),
                                           dtype=np.float32)
            K.vq_lookup_dot(self.codes, partial, self.scale, self.vec_group, y)
        else:
            K.vq_dot(self.codes, self.books, self.scale, self.vec_group, self.col_group, np.ascontiguousarray(xv), y)

    def dequant_into(self, out: np.ndarray) -> None:
        K.dequant_vq(self.codes, self.books, self.scale, self.col_group, out)

    def arrays(self) -> list[np.ndarray]:
        codes = [self.codes] if self.words is None else [self.words, self.books_t]  # codes: a view of the words
        return codes + [self.books, self.scale, self.row_scale, self.col_group, self.vec_group]


def _byte_lookup(words: np.ndarray, books_t: np.ndarray, row_scale: np.ndarray, x: np.ndarray, y: np.ndarray
                 ) -> None:
    """One call of :class:`VqTerm`'s byte path: this x's table, then the lookups."""
    table = np.empty((x.shape[0], words.shape[1] * 8, 256), dtype=np.float32)
    K.vq_byte_tables(x, books_t, table)
    K.vq_byte_lookup_dot(words, table, row_scale, y)


def _codes_of_words(words: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 codes [R, V, M] inside ``words`` (:func:`_code_words`), as a view."""
    return words.view(np.uint8)[:, :math.prod(shape[1:])].reshape(shape)


def _code_words(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [R, V, M] as uint64 words [R, ceil(V M / 8)] of 8 code bytes each (zero padded; little-endian:
    byte i of a row is bits 8 (i % 8) of word i // 8)."""
    rows = codes.shape[0]
    flat = codes.reshape(rows, -1)
    padded = np.zeros((rows, -(-flat.shape[1] // 8) * 8), dtype=np.uint8)
    padded[:, :flat.shape[1]] = flat
    return padded.view(np.uint64)


class VqTileTerm:
    """vq version 2, vectors [p, d] spanning p output rows: codes repacked to [M, R / p, C / d]. VPTQ's [p, 1] under
    row factors only (the common case: its norm is a column scale, applied to x) runs ``vq_column_kernel``, in its
    histogram form when a code row has VQ_HISTOGRAM_RATIO times more codes than a codebook has entries; any other
    tile or scale grid the general loops (correct, slower)."""

    def __init__(self, codes: np.ndarray, books: np.ndarray, vector_rows: int, scale: np.ndarray, grid: _Grid) -> None:
        """``codes`` [M, R / p, C / d]; ``books`` fp32 [M, K, p * d]; ``scale`` fp32 [R, G] on ``grid``."""
        self.codes, self.books, self.vector_rows, self.scale = codes, books, vector_rows, scale
        self.col_group = grid.col_group()
        self.column = (books.shape[2] == vector_rows and grid.count == 1
                       and vector_rows <= K.VQ_COLUMN_MAX_ROWS)
        self.row_scale = np.ascontiguousarray(scale[:, 0])
        self.histogram = codes.shape[2] >= K.VQ_HISTOGRAM_RATIO * books.shape[1]
        self._best = [math.inf, 0]  # the thread governor's record (numba_threads)
        self._budget = stall_budget(codes.nbytes)

    def matmul_into(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.column:
            GOVERNOR.run(self._best, self._budget * x.shape[0], K.vq_column_kernel(self.vector_rows, self.histogram),
                         self.codes, self.books, self.row_scale, x, y)
        else:
            K.vq_tile_dot(self.codes, self.books, self.scale, self.col_group, self.vector_rows, x, y)

    def dequant_into(self, out: np.ndarray) -> None:
        K.dequant_vq_tile(self.codes, self.books, self.scale, self.col_group, self.vector_rows, out)

    def arrays(self) -> list[np.ndarray]:
        return [self.codes, self.books, self.scale, self.col_group]


class SparseTerm:
    def __init__(self, row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray) -> None:
        self.row_ptr, self.col_idx, self.values = row_ptr, col_idx, values

    def matmul_into(self, x: np.ndarray, y: np.ndarray) -> None:
        K.csr_dot(self.row_ptr, self.col_idx, self.values, x, y)

    def dequant_into(self, out: np.ndarray) -> None:
        K.dequant_csr(self.row_ptr, self.col_idx, self.values, out)

    def arrays(self) -> list[np.ndarray]:
        return [self.row_ptr, self.col_idx, self.values]


class LowRankTerm:
    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a, self.b = a, b

    def matmul_into(self, x: np.ndarray, y: np.ndarray) -> None:
        y += (x @ self.b.T) @ self.a.T

    def dequant_into(self, out: np.ndarray) -> None:
        out += self.a @ self.b

    def arrays(self) -> list[np.ndarray]:
        return [self.a, self.b]


class SignTerm:
    """sign_lowrank: y_r = sum_k u[r, k] sum_c s_rc v[k, c] x_c with s = 2q - 1, so each rank is a 1-bit code dot
    against v[k] * x: the rank rows ride through the fused kernel as extra rows of x."""

    def __init__(self, words: np.ndarray, u: np.ndarray, v: np.ndarray, cols: int) -> None:
        self.words, self.u, self.v = words, u, v
        rows = words.shape[0]
        self.codes = CodeTerm(words, 1, np.ones((rows, 1), dtype=np.float32), None, _Grid(cols, 1, cols))

    def matmul_into(self, x: np.ndarray, y: np.ndarray) -> None:
        batch, rank = x.shape[0], self.v.shape[0]
        vx = np.ascontiguousarray((x[:, None, :] * self.v[None, :, :]).reshape(batch * rank, -1))
        dots = np.zeros((batch * rank, self.words.shape[0]), dtype=np.float32)
        self.codes.matmul_into(vx, dots)
        signed = 2.0 * dots.reshape(batch, rank, -1) - vx.sum(axis=1).reshape(batch, rank, 1)
        y += np.einsum("bkr,rk->br", signed, self.u).astype(np.float32)

    def dequant_into(self, out: np.ndarray) -> None:
        K.dequant_signs(self.words, self.u, self.v, out)

    def arrays(self) -> list[np.ndarray]:
        return [self.words, self.u, self.v]


# ---------------------------------------------------------------------------------------------------------------
# repacking lowered terms (their data is checked: qformat.lowering)

def _words(codes: Codes, rows: int, cols: int, bits: int | None = None) -> tuple[np.ndarray, int, float]:
    """Sliced words for a code leaf: (words, layout bits, offset subtracted from every code)."""
    src = np.ascontiguousarray(codes.data, dtype=np.uint8) if codes.codec != "tensor" else None
    if codes.codec == "packed":
        src_bits = codes.node["bits"]
        words = repack.empty_words(rows, cols, src_bits)
        repack.words_from_packed(src, src_bits, cols, src_bits, words)
        return words, src_bits, 0.0
    if codes.codec == "bitplanes":
        n_planes = src.shape[0]
        words = repack.empty_words(rows, cols, n_planes)
        repack.words_from_bitplanes(src, cols, n_planes, words)
        return words, n_planes, 0.0
    if codes.codec == "ternary":
        words = repack.empty_words(rows, cols, 2)
        repack.words_from_ternary(src, cols, words)
        return words, 2, 1.0
    # an integer tensor of codes, within its consumer's range; the layout width: the node's, else the codes'
    bits = bits or max(1, codes.top.bit_length())
    if bits > 16:
        raise Unsupported(f"{codes.path}: {bits}-bit codes")
    words = repack.empty_words(rows, cols, bits)
    repack.words_from_ints(np.ascontiguousarray(codes.data), bits, words)
    return words, bits, 0.0


def _code_term(term: Term, rows: int, cols: int) -> CodeTerm:
    node, codec = term.node, term.codec
    assert term.codes is not None
    params: list[Param] = []
    zero: Param | None = None
    added: Param | None = None  # affine version 2's offset, added after the scale
    table = fp8 = None
    if codec == "affine":
        words, bits, _ = _words(term.codes, rows, cols, node["bits"])
        params.append(term.scale)
        zero, added = term.zero, term.offset
    elif codec == "lut":
        table = term.table
        fp8 = fp8_mode(table, term.codes)
        words, bits, _ = _words(term.codes, rows, cols, 8 if fp8 is not None else None)
    else:
        words, bits, offset = _words(term.codes, rows, cols)
        if offset:
            zero = Param(np.full((1, 1), offset, dtype=np.float32), (1, 1))
    blocked = _row_block_term(term, words, bits, rows, cols) if codec == "affine" else None
    if blocked is not None:
        return blocked
    factors = [f.param for f in term.factors]
    params += factors
    table_group = tuple(node.get("group_shape", (rows, cols))) if codec == "lut" else (rows, cols)
    per_tile = table is not None and table.ndim == 3 and table.shape[:2] != (1, 1)
    grid = _Grid.common(params + [p for p in (zero, added) if p is not None], cols,
                        (table_group[1],) if per_tile else ())
    scale = grid.product(params, rows)
    zero_scale = grid.product([zero], rows) * scale if zero else None
    if added is not None:  # w = F (q S + M - Z S): the kernels subtract zs * sum(x) per group, so zs = (Z S - M) F
        bias = grid.product([added] + factors, rows)
        zero_scale = -bias if zero_scale is None else zero_scale - bias
    grouped = [p for p in params if p[0].shape != (1, 1)]
    block = None
    if table is not None and len(grouped) == 1 and zero_scale is None:  # one grouped scale times constants
        block = _regrid(grouped[0][0], grouped[0][1], rows, cols, grid.width, grid.count)
    return CodeTerm(words, bits, scale, zero_scale, grid,
                    _table_layout(table, table_group, bits, rows, grid) if table is not None else None, fp8, block)


def int8_table_form(table: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(table', scale') with every entry of table' an integer k, |k| <= 127, times 2**24 and scale' = scale * 2**(e -
    24), when every entry of ``table`` is such a k times one power of two 2**e (E2M1, IQ4_NL's values, ...) and the
    rescaled scales stay exact; None otherwise. table'[q] * scale' is then table[q] * scale, the same product."""
    values = table.astype(np.float64)
    nonzero = values[values != 0]
    if not np.isfinite(values).all() or nonzero.size == 0:
        return None
    mantissa, exponent = np.frexp(nonzero)  # value = m * 2**x, |m| in [0.5, 1), 24 significant bits
    integer = np.abs(mantissa * 2.0 ** 24).astype(np.int64)
    trailing = np.array([(int(i) & -int(i)).bit_length() - 1 for i in integer])
    unit = int((exponent - 24 + trailing).min())  # the coarsest power of two every entry is a multiple of
    ints = np.ldexp(values, -unit)
    if np.abs(ints).max() > 127:
        return None
    rescaled = np.ldexp(scale.astype(np.float32), unit - 24)
    kept = np.abs(rescaled[scale != 0])
    if not np.array_equal(np.ldexp(rescaled, 24 - unit), scale) or (kept < np.finfo(np.float32).tiny).any():
        return None  # the scales would leave fp32's normal range
    return np.ascontiguousarray(np.ldexp(ints, 24).astype(np.float32)), np.ascontiguousarray(rescaled)


# NVFP4's E4M3 block scales as bytes: a quarter of the scale bytes (6.02 -> 4.52 bits per weight read) for the
# decoding of 8 bytes per 128 columns. Off: on one thread it measured 4-7% slower warm and no faster cold
# (bench/GEMV_NOTES.md); whether the bytes win on two threads of a quiet machine is not measured yet. The path is
# exact and tested (tests/test_kernels_methods.py turns it on).
COMPACT_E4M3 = False


def decode_scales(scale: np.ndarray, code: int, mul: np.float32) -> np.ndarray:
    """fp32 scales from their kept form (``numba_gemv.SCALE_*``), exactly as the kernel decodes them."""
    if code == K.SCALE_F32:
        return scale
    if code == K.SCALE_E8M0:
        return (scale.astype(np.uint32) << np.uint32(23)).view(np.float32)
    code = scale.astype(np.uint32)
    bits = ((code << np.uint32(24)) & np.uint32(0x80000000)) | ((code << np.uint32(20)) & np.uint32(0x07F00000))
    return bits.view(np.float32) * np.float32(mul)


def compact_scales(scale: np.ndarray, block: np.ndarray | None) -> tuple[np.ndarray, int, np.float32] | None:
    """(uint8 codes [R, G], K.SCALE_E8M0 or K.SCALE_E4M3, factor) that decode (:func:`decode_scales`) to exactly
    ``scale`` (fp32 [R, G], bit for bit, signs of zeros included), or None. E8M0: every scale a power of two in fp32's
    normal range, or +0 (MXFP4's shared exponents, after any exact rescaling). E4M3: ``block`` (the one grouped
    parameter the scales are made of) FP8 E4M3 values throughout and ``scale`` = block * one fp32 factor (NVFP4's
    per-16 scales times its global scale)."""
    bits = scale.view(np.uint32)
    if scale.size and not (bits & np.uint32(0x807FFFFF)).any():
        return np.ascontiguousarray(bits >> np.uint32(23), dtype=np.uint8), K.SCALE_E8M0, np.float32(1.0)
    if not COMPACT_E4M3 or block is None or block.shape != scale.shape or not np.isfinite(block).all():
        return None
    table = _FP8[K.LUT_E4M3]
    order = np.argsort(table, kind="stable")
    pos = np.clip(np.searchsorted(table[order], block), 0, 255)
    codes = order[pos].astype(np.uint8)
    codes[(block == 0) & ~np.signbit(block)] = 0  # +0: the code 0x00, not 0x80 (-0)
    if not np.array_equal(table[codes].view(np.uint32), block.view(np.uint32)):
        return None  # not all E4M3 values
    nonzero = np.flatnonzero(block)
    if nonzero.size == 0:
        return None
    i = nonzero[0]
    mul = np.float32(np.ldexp(np.float32(scale.flat[i] / block.flat[i]), 120))  # the decoded byte is 2**-120 x
    if not np.isfinite(mul) or not np.array_equal(decode_scales(codes, K.SCALE_E4M3, mul).view(np.uint32), bits):
        return None
    return np.ascontiguousarray(codes), K.SCALE_E4M3, mul


def _fp8_tables() -> dict[int, np.ndarray]:
    """Every byte's value as FP8 E4M3 and E5M2, computed the way the kernel decodes it (fp16 bits)."""
    code = np.arange(256, dtype=np.uint16)
    e4m3 = (((code & 0x7F) << 7) | ((code & 0x80) << 8)).astype(np.uint16).view(np.float16).astype(np.float32) * 256
    e5m2 = (code << 8).astype(np.uint16).view(np.float16).astype(np.float32)
    return {K.LUT_E4M3: e4m3, K.LUT_E5M2: e5m2}


_FP8 = _fp8_tables()


def fp8_mode(table: np.ndarray, codes: Codes) -> int | None:
    """K.LUT_E4M3 / K.LUT_E5M2 when a global 256-entry ``table`` equals that FP8 decoding at every code the data
    uses (a file may put anything at the NaN codes a method never writes), else None."""
    if table.size != 256 or (table.ndim == 3 and table.shape[:2] != (1, 1)):
        return None
    if codes.codec != "tensor" and (codes.codec != "packed" or codes.bits != 8):  # 8-bit packed rows are bytes
        return None
    values = table.reshape(-1)
    for mode, decoded in _FP8.items():
        same = (values == decoded) & (np.signbit(values) == np.signbit(decoded))
        if same.all():
            return mode
        if same.sum() >= 240:  # only a few codes differ (NaN/inf slots): fine if the data never uses them
            data = np.asarray(codes.data) if codes.codec == "tensor" else codes.values()
            used = np.bincount(data.reshape(-1), minlength=256)
            if not used[~same].any():
                return mode
    return None


def _row_block_term(term: Term, words: np.ndarray, bits: int, rows: int, cols: int) -> RowBlockTerm | None:
    """A :class:`RowBlockTerm` for affine statistics on tiles [gr, gc] that the column grid cannot hold compactly
    (gc not a multiple of 16 and narrower than the row: the grid would be [R, C/gcd]) but that span whole row
    tiles (gr a multiple of ROW_BLOCK, or all rows), under row factors only; None otherwise."""
    assert term.scale is not None
    gr, gc = term.scale.group
    if gc >= cols or gc % K.LANES == 0 or (gr % K.ROW_BLOCK and gr < rows):
        return None
    if any(f.kind != "row" for f in term.factors):
        return None
    if any(p is not None and p.values.shape != (1, 1) and p.group != (gr, gc) for p in (term.zero, term.offset)):
        return None
    blocks = -(-rows // gr)

    def expand(param: Param) -> np.ndarray:
        if param.values.shape == (1, 1):
            return np.full((blocks, cols), param.values[0, 0], dtype=np.float32)
        col_of = np.minimum(np.arange(cols) // gc, param.values.shape[1] - 1)
        return np.ascontiguousarray(param.values[:blocks][:, col_of], dtype=np.float32)

    scale = expand(term.scale)
    zero_scale = expand(term.zero) * scale if term.zero is not None else None
    if term.offset is not None:  # the offset enters as a negative zero point: ZS - M
        zero_scale = -expand(term.offset) if zero_scale is None else zero_scale - expand(term.offset)
    row_factor = _row_factor(term.factors, rows, cols)
    if row_factor is None:
        row_factor = np.ones(rows, dtype=np.float32)
    return RowBlockTerm(words, bits, row_factor, gr, scale, zero_scale, cols)


def _table_layout(table: np.ndarray, group: tuple[int, int], bits: int, rows: int, grid: _Grid
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1-D or per-tile [Gr, Gc, T] lut table as rows of a 2-D table, with per-row and per-column-group offsets."""
    if table.ndim == 1 or table.shape[:2] == (1, 1):
        flat = table.reshape(1, -1)
        row_tab, grp_tab = np.zeros(rows, dtype=np.int32), np.zeros(grid.count, dtype=np.int32)
    else:
        tile_rows, tile_cols, _ = table.shape
        gr, gc = group
        flat = table.reshape(tile_rows * tile_cols, -1)
        row_tab = (np.minimum(np.arange(rows) // gr, tile_rows - 1) * tile_cols).astype(np.int32)
        grp_tab = np.minimum(np.arange(grid.count) * grid.width // gc, tile_cols - 1).astype(np.int32)
    if flat.shape[1] < 1 << bits:  # codes are in range; pad so any b-bit pattern indexes inside the table
        flat = np.concatenate([flat, np.zeros((flat.shape[0], (1 << bits) - flat.shape[1]), dtype=np.float32)], 1)
    return np.ascontiguousarray(flat, dtype=np.float32), row_tab, grp_tab


def _vq_term(term: Term, rows: int, cols: int) -> VqTerm | VqTileTerm:
    assert term.codes is not None and term.books is not None
    books = np.ascontiguousarray(term.books, dtype=np.float32)
    books_n, entries, width = books.shape
    p = term.vector_rows
    dtype = np.uint8 if entries <= 256 else np.uint16 if entries <= 65536 else np.int32
    codes = term.codes.values().astype(dtype).reshape(rows // p, cols // (width // p), books_n)
    params = [f.param for f in term.factors]
    grid = _Grid.common(params, cols)
    if p > 1:
        return VqTileTerm(np.ascontiguousarray(codes.transpose(2, 0, 1)), books, p, grid.product(params, rows), grid)
    return VqTerm(np.ascontiguousarray(codes), books, grid.product(params, rows), grid)


def _sparse_term(term: Term, rows: int, cols: int) -> SparseTerm:
    assert term.values is not None and term.row_of is not None and term.col_idx is not None
    row_of, idx = term.row_of, term.col_idx
    values = term.values.copy()
    for f in term.factors:
        param, (gr, gc) = f.param
        values *= param[0, 0] if param.shape == (1, 1) else param[row_of // gr, idx // gc if gc < cols else 0]
    return SparseTerm(term.row_ptr, idx.astype(np.int32), values.astype(np.float32))


def _lowrank_term(term: Term, rows: int, cols: int) -> LowRankTerm:
    a, b = term.a, np.ascontiguousarray(term.b)
    factor = _row_factor(term.factors, rows, cols)
    if factor is not None:
        a = a * factor[:, None]
    return LowRankTerm(np.ascontiguousarray(a, dtype=np.float32), b)


def _sign_term(term: Term, rows: int, cols: int) -> SignTerm:
    assert term.codes is not None
    words, _, _ = _words(term.codes, rows, cols)  # 1-bit by validation
    u = term.u
    factor = _row_factor(term.factors, rows, cols)
    if factor is not None:
        u = u * factor[:, None]
    v = np.ascontiguousarray(term.v, dtype=np.float32)
    return SignTerm(words, np.ascontiguousarray(u, dtype=np.float32), v, cols)


_BUILDERS = {"codes": _code_term, "vq": _vq_term, "sparse": _sparse_term, "lowrank": _lowrank_term,
             "signs": _sign_term}


def _chain(chain: tuple[Permute | Scale | Columns, ...], cols: int) -> tuple[tuple[str, np.ndarray], ...]:
    """The input transforms as numpy operations on x: ("perm", indices), ("take", a concat part's column indices:
    x narrows to the part) and ("mul", per-column factors)."""
    ops = []
    for transform in chain:
        if isinstance(transform, Permute):
            ops.append(("perm", transform.perm.astype(np.intp)))
        elif isinstance(transform, Columns):
            ops.append(("take", transform.index.astype(np.intp)))
            cols = transform.stop - transform.start
        else:
            ops.append(("mul", np.ascontiguousarray(np.broadcast_to(transform.factor.reshape(-1), (cols,)),
                                                    dtype=np.float32)))
    return tuple(ops)


# ---------------------------------------------------------------------------------------------------------------
# the prepared weight

class NumbaPreparedWeight(PreparedWeight):
    """Terms grouped by input transform chain; ``matmul`` runs each group's kernels into one output."""

    max_batch = 16  # the kernel sets its own on prepare
    _nbytes: int | None = None  # set on row views of a stacked weight (fuse_rows)

    def __init__(self, name: str, record: dict, groups: list[tuple[tuple, list]]) -> None:
        self.name = name
        self.signature = signature(record["weight"])
        self.out_features, self.in_features = matrix_shape(tuple(record["shape"]))
        self.groups = groups
        self._single = groups[0][1][0] if len(groups) == 1 and not groups[0][0] and len(groups[0][1]) == 1 else None
        self.kernel: Any = None  # set by the kernel that prepared it

    @classmethod
    def _of_term(cls, name: str, signature_text: str, shape: tuple[int, int], term: CodeTerm,
                 like: NumbaPreparedWeight) -> NumbaPreparedWeight:
        """A prepared weight made of one code term (no input transform), kernel settings copied from ``like``."""
        self = cls.__new__(cls)
        self.name, self.signature = name, signature_text
        self.out_features, self.in_features = shape
        self.groups = [((), [term])]
        self._single = term
        self.kernel = like.kernel
        self.max_batch = like.max_batch
        return self

    def fuse_rows(self, parts: Sequence[PreparedWeight]) -> tuple[NumbaPreparedWeight,
                                                                   list[NumbaPreparedWeight]] | None:
        """``parts`` (``self`` first) stacked along output rows: (the stacked weight, a row view of it per part).

        Only for parts that are each one code term over the same column layout (same codec signature, bits, group
        grid and input width; affine/lut/raw codes without permutation, outliers or low-rank terms); None
        otherwise. The views share the stacked arrays, so the parts' own arrays can be dropped: memory stays the
        same, and each view computes exactly what its part did.
        """
        if len(parts) < 2 or parts[0] is not self:
            return None
        if not all(isinstance(p, NumbaPreparedWeight) for p in parts):
            return None
        terms = [p._single for p in parts]
        if not all(isinstance(t, CodeTerm) for t in terms) or not all(terms[0].same_columns(t) for t in terms[1:]):
            return None
        if len({(p.in_features, p.signature, p.kernel, p.max_batch) for p in parts}) != 1:
            return None
        stacked = CodeTerm.stack(terms)
        rows = stacked.words.shape[0]
        fused = NumbaPreparedWeight._of_term("+".join(p.name for p in parts), self.signature,
                                             (rows, self.in_features), stacked, self)
        views, start, total = [], 0, fused.nbytes()
        for part in parts:
            stop = start + part.out_features
            view = NumbaPreparedWeight._of_term(part.name, part.signature, (part.out_features, part.in_features),
                                                stacked.rows(start, stop), part)
            # its share of the stacked bytes (column tables are shared): the views add up to the stacked weight
            view._nbytes = total * stop // rows - total * start // rows
            views.append(view)
            start = stop
        return fused, views

    def decode_fn(self) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
        """A lean y = x @ W.T for one fp32 CPU row of x (decoding), or None where this weight has no such path.

        The returned function returns None for any other x (the caller then takes :meth:`matmul`). Everything
        that does not depend on x is looked up once here: the kernel, its arguments, the output shapes.
        """
        term = self._single
        if type(term) is not CodeTerm or not term.aligned:  # one aligned code term only
            return None
        kernel, args = term._kernel(1), term._args
        best, budget, run = term._best[1], term._budget, GOVERNOR.run
        rows, cols = self.out_features, self.in_features
        shapes = {1: (rows,), 2: (1, rows), 3: (1, 1, rows)}  # y's shape by x.dim()
        f32, t32, zeros, from_numpy = np.float32, torch.float32, np.zeros, torch.from_numpy

        def decode(x: torch.Tensor) -> torch.Tensor | None:
            if x.dtype is not t32 or x.numel() != cols or x.shape[-1] != cols or not x.is_cpu or x.requires_grad:
                return None
            shape = shapes.get(x.dim())
            if shape is None:
                return None
            xn = x.numpy().reshape(1, cols)
            if not xn.flags.c_contiguous:
                xn = np.ascontiguousarray(xn)
            y = zeros(shape, f32)
            run(best, budget, kernel, *args, xn, y.reshape(1, rows))
            return from_numpy(y)

        return decode

    def matmul_numpy(self, x: np.ndarray) -> np.ndarray:
        """x: fp32 [B, in] (C-contiguous) -> fp32 [B, out]."""
        y = np.zeros((x.shape[0], self.out_features), dtype=np.float32)
        if self._single is not None:  # the common record: one code term, no permutation
            self._single.matmul_into(x, y)
            return y
        for chain, terms in self.groups:
            xt = x
            if chain:
                for op, arg in chain:
                    xt = xt * arg if op == "mul" else xt[:, arg]
                xt = np.ascontiguousarray(xt, dtype=np.float32)
            for term in terms:
                term.matmul_into(xt, y)
        return y

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: x has {x.shape[-1]} features, the weight takes {self.in_features}")
        plain = x.dtype == torch.float32 and x.device.type == "cpu"
        # decoding calls this per token and layer: keep the torch <-> numpy glue to a few cheap calls
        xn = (x.detach() if x.requires_grad else x).numpy() if plain else x.detach().to("cpu", torch.float32).numpy()
        if xn.ndim != 2:
            xn = xn.reshape(-1, self.in_features)
        if not xn.flags.c_contiguous:
            xn = np.ascontiguousarray(xn)
        y = torch.from_numpy(self.matmul_numpy(xn))
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if plain else y.to(device=x.device, dtype=x.dtype)

    def dequantize_numpy(self) -> np.ndarray:
        shape = (self.out_features, self.in_features)
        first = self.groups[0][1][0]
        fresh = len(self.groups) == 1 and isinstance(first, CodeTerm)  # it can write the output without reading it
        out = np.empty(shape, dtype=np.float32) if fresh else np.zeros(shape, dtype=np.float32)
        for chain, terms in self.groups:
            widths = [shape[1]]  # x's width before each op, and the terms' width last (a concat part's)
            for op, arg in chain:
                widths.append(arg.shape[0] if op == "take" else widths[-1])
            inner = ((np.empty if fresh else np.zeros)((shape[0], widths[-1]), dtype=np.float32)) if chain else out
            for i, term in enumerate(terms):
                if fresh and i == 0:
                    term.dequant_into(inner, overwrite=True)
                else:
                    term.dequant_into(inner)
            if chain:
                for (op, arg), width in zip(reversed(chain), reversed(widths[:-1]), strict=True):
                    if op == "mul":
                        inner *= arg[None, :]
                    else:  # x_inner[j] = x[arg[j]]  =>  W[:, arg[j]] = W_inner[:, j] (other columns: 0)
                        outer = (np.empty if op == "perm" else np.zeros)((shape[0], width), dtype=np.float32)
                        outer[:, arg] = inner
                        inner = outer
                if fresh:
                    out = inner
                else:
                    out += inner
        return out

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(self.dequantize_numpy())

    def nbytes(self) -> int:
        if self._nbytes is not None:
            return self._nbytes
        total = sum(arg.nbytes for chain, _ in self.groups for _, arg in chain)
        return total + sum(a.nbytes for _, terms in self.groups for t in terms for a in t.arrays())


def prepare(qt: QuantizedTensor) -> NumbaPreparedWeight:
    """Repack ``qt`` for the Numba kernels. Raises Unsupported for trees they do not run, FormatError for bad data."""
    lowered = lower(qt, CORE_CODECS, check=refusal)
    rows, cols = lowered.rows, lowered.cols
    groups: dict[tuple, tuple[tuple, list]] = {}  # terms under the same input transforms share one transformed x
    for term in lowered.terms:
        key = tuple(id(t) for t in term.chain)
        if key not in groups:
            groups[key] = (_chain(term.chain, cols), [])
        groups[key][1].append(_BUILDERS[term.kind](term, rows, term.width or cols))
    return NumbaPreparedWeight(qt.name, qt.record, list(groups.values()))
