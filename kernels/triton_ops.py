"""Triton kernels: fused dequantize-and-multiply (GEMV for one row of x, tl.dot for small batches) and dequantize.

Each weight tile [BN, BK] is decoded in registers from the sliced-words layout (see triton_plan): whole int32 words
are loaded contiguously along a row and split with shifts, so packed codes cost one coalesced load per 32/w codes.
Maps: affine (q - zero) * scale (+ offset, version 2), lut table[q] (global or per tile), vq (sum of M codebook
vectors), raw codes (+ OFFSET, for ternary); an optional per-tile factor multiplies the result (NF4 absmax, AQLM/AWQ
channel scales).
Arithmetic follows the reference decoder's order in fp32, so dequantize() matches it exactly.

Import this module only after deciding on ``TRITON_INTERPRET``: triton reads it when the kernels are defined.
Under the interpreter the launchers use one fixed large-block configuration; on a GPU they autotune over the
configurations listed below (keyed on the shape, the code width and the maps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The interpreter also needs triton's own @jit helpers (tl.sum, tl.cdiv, ...) built in interpreter mode, which
# happens only when TRITON_INTERPRET is set before triton.language is first imported.
INTERPRETER_USABLE = INTERPRET and type(tl.sum).__name__ == "InterpretedFunction"

# QFORMAT_TRITON_AUTOTUNE=0: launch the first configuration that suits the shape instead of timing them all (each
# distinct codec signature and shape compiles and times ~10 variants on its first call).
AUTOTUNE = os.environ.get("QFORMAT_TRITON_AUTOTUNE", "1") != "0"

MAP_AFFINE, MAP_LUT, MAP_VQ, MAP_CODES = 0, 1, 2, 3
MAPS = {"affine": MAP_AFFINE, "lut": MAP_LUT, "vq": MAP_VQ, "codes": MAP_CODES}


# ---------------------------------------------------------------------------------------------------------------
# decoding helpers (inlined into the kernels)

@triton.jit
def _slice_tile(base, rows, k0, KW, W: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Codes of one W-bit slice for columns k0..k0+BK of ``rows``: contiguous (vector) word loads, then each word
    is halved repeatedly with tl.join, which keeps a word's codes in the thread that loaded it (no shuffles)."""
    PER: tl.constexpr = 32 // W
    NW: tl.constexpr = BK // PER
    words_per_row = KW * W
    wc = tl.multiple_of(k0 // PER, NW) + tl.arange(0, NW)  # k0 is a multiple of BK
    parts = tl.load(base + rows[:, None] * words_per_row + wc[None, :], mask=(wc < words_per_row)[None, :], other=0)
    for level in tl.static_range(PER.bit_length() - 1):  # 32-bit words -> 16 -> ... -> W-bit codes, in order
        parts = tl.join(parts & ((1 << (16 >> level)) - 1), (parts >> (16 >> level)) & ((1 << (16 >> level)) - 1))
    return tl.reshape(parts, [BN, BK])


@triton.jit
def _codes_tile(codes, rows, k0, R, KW, BITS: tl.constexpr, PLANAR: tl.constexpr, KW4: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    """int32 codes [BN, BK] of columns k0.. (columns past the matrix read as 0). KW: words in a one-bit row."""
    if KW4:  # rows of every slice start on 16-byte boundaries: lets the word loads vectorize
        KW = tl.multiple_of(KW, 4)
    plane = R * KW  # words of a one-bit slice of the whole matrix
    q = tl.zeros([BN, BK], dtype=tl.int32)
    if PLANAR:
        for p in tl.static_range(BITS):
            q |= _slice_tile(codes + plane * p, rows, k0, KW, 1, BN, BK) << (BITS - 1 - p)
    else:
        if BITS & 16:
            q |= _slice_tile(codes, rows, k0, KW, 16, BN, BK)
        if BITS & 8:
            q |= _slice_tile(codes + plane * (BITS & ~15), rows, k0, KW, 8, BN, BK) << (BITS & ~15)
        if BITS & 4:
            q |= _slice_tile(codes + plane * (BITS & ~7), rows, k0, KW, 4, BN, BK) << (BITS & ~7)
        if BITS & 2:
            q |= _slice_tile(codes + plane * (BITS & ~3), rows, k0, KW, 2, BN, BK) << (BITS & ~3)
        if BITS & 1:
            q |= _slice_tile(codes + plane * (BITS & ~1), rows, k0, KW, 1, BN, BK) << (BITS & ~1)
    return q


@triton.jit
def _slice_at(base, r, c, KW, W: tl.constexpr):
    pos = c * W
    word = tl.load(base + r * (KW * W) + (pos >> 5))
    return (word >> (pos & 31)) & ((1 << W) - 1)


@triton.jit
def _codes_at(codes, r, c, R, KW, BITS: tl.constexpr, PLANAR: tl.constexpr):
    """Codes at arbitrary (broadcast) positions (r, c) inside the code matrix: one word load per slice."""
    plane = R * KW
    q = (r + c) * 0
    if PLANAR:
        for p in tl.static_range(BITS):
            q |= _slice_at(codes + plane * p, r, c, KW, 1) << (BITS - 1 - p)
    else:
        if BITS & 16:
            q |= _slice_at(codes, r, c, KW, 16)
        if BITS & 8:
            q |= _slice_at(codes + plane * (BITS & ~15), r, c, KW, 8) << (BITS & ~15)
        if BITS & 4:
            q |= _slice_at(codes + plane * (BITS & ~7), r, c, KW, 4) << (BITS & ~7)
        if BITS & 2:
            q |= _slice_at(codes + plane * (BITS & ~3), r, c, KW, 2) << (BITS & ~3)
        if BITS & 1:
            q |= _slice_at(codes + plane * (BITS & ~1), r, c, KW, 1) << (BITS & ~1)
    return q


@triton.jit
def _tile_down(rows, r0, GR: tl.constexpr, BN: tl.constexpr):
    """Tile row of each weight row: a scalar when the row block lies inside one tile."""
    if GR % BN == 0:
        down = r0 // GR
    else:
        down = (rows // GR)[:, None]
    return down


@triton.jit
def _like_codes(p, PER: tl.constexpr, BK: tl.constexpr):
    """Repeat per-word values PER times the way _slice_tile unpacks words, so they share the codes' layout."""
    for _level in tl.static_range(PER.bit_length() - 1):
        p = tl.join(p, p)
    return tl.reshape(p, [p.shape[0], BK])


@triton.jit
def _tile_param(ptr, rows, cols, r0, k0, K, tiles_across, GR: tl.constexpr, GC: tl.constexpr, PER: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    """Per-tile parameters as fp32, broadcastable to [BN, BK]; loaded once per row block (a tile spans the block),
    once per code word (a tile spans whole words), else once per element."""
    down = _tile_down(rows, r0, GR, BN) * tiles_across
    if GC % BK == 0:
        p = tl.load(ptr + down + k0 // GC).to(tl.float32)
    elif GC % PER == 0:
        first = tl.minimum(k0 + tl.arange(0, BK // PER) * PER, K - 1)  # first column of each word
        p = _like_codes(tl.load(ptr + down + (first // GC)[None, :]).to(tl.float32), PER, BK)
    else:
        p = tl.load(ptr + down + (cols // GC)[None, :]).to(tl.float32)
    return p


@triton.jit
def _tile_index(rows, cols, r0, k0, K, tiles_across, GR: tl.constexpr, GC: tl.constexpr, PER: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    """Tile index of each element, broadcastable to [BN, BK] (same cases as _tile_param)."""
    down = _tile_down(rows, r0, GR, BN) * tiles_across
    if GC % BK == 0:
        index = down + k0 // GC
    elif GC % PER == 0:
        first = tl.minimum(k0 + tl.arange(0, BK // PER) * PER, K - 1)
        index = _like_codes(down + (first // GC)[None, :], PER, BK)
    else:
        index = down + (cols // GC)[None, :]
    return index


@triton.jit
def _weight_tile(r0, k0, N, K,
                 codes, KW, s_ptr, z_ptr, m_ptr, s_across, t_ptr, t_across, T, f_ptr, f_across,
                 BITS: tl.constexpr, PLANAR: tl.constexpr, KW4: tl.constexpr, PER: tl.constexpr,
                 OFFSET: tl.constexpr, MAP: tl.constexpr,
                 HAS_ZERO: tl.constexpr, HAS_OFFSET: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr,
                 TILED: tl.constexpr, TGR: tl.constexpr, TGC: tl.constexpr,
                 HAS_FACTOR: tl.constexpr, FGR: tl.constexpr, FGC: tl.constexpr,
                 VQ_M: tl.constexpr, VQ_D: tl.constexpr, VQ_VEC: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    """fp32 weights [BN, BK] of rows r0.. and columns k0.. (rows past N repeat row N-1; columns past K are junk
    that callers multiply by zero or mask)."""
    rows = tl.minimum(r0 + tl.arange(0, BN), N - 1)
    cols = tl.minimum(k0 + tl.arange(0, BK), K - 1)
    if MAP == 2:  # vq: w[r, v*d + j] = sum_m books[m, codes[r, v*M + m], j]
        if VQ_VEC:  # d is a power of two dividing BK: gather whole d-vectors
            BV: tl.constexpr = BK // VQ_D
            vec = tl.minimum(k0 // VQ_D + tl.arange(0, BV), K // VQ_D - 1)
            lane = tl.arange(0, VQ_D)
            acc = tl.zeros([BN, BV, VQ_D], dtype=tl.float32)
            for m in tl.static_range(VQ_M):
                q = _codes_at(codes, rows[:, None], vec[None, :] * VQ_M + m, N, KW, BITS, PLANAR)
                acc += tl.load(t_ptr + ((m * T + q) * VQ_D)[:, :, None] + lane[None, None, :]).to(tl.float32)
            w = tl.reshape(acc, [BN, BK])
        else:
            vec = cols // VQ_D
            lane = cols % VQ_D
            w = tl.zeros([BN, BK], dtype=tl.float32)
            for m in tl.static_range(VQ_M):
                q = _codes_at(codes, rows[:, None], (vec * VQ_M + m)[None, :], N, KW, BITS, PLANAR)
                w += tl.load(t_ptr + (m * T + q) * VQ_D + lane[None, :]).to(tl.float32)
    else:
        q = _codes_tile(codes, rows, k0, N, KW, BITS, PLANAR, KW4, BN, BK)
        if MAP == 0:  # affine
            w = q.to(tl.float32)
            if HAS_ZERO:
                w = w - _tile_param(z_ptr, rows, cols, r0, k0, K, s_across, GR, GC, PER, BN, BK)
            w = w * _tile_param(s_ptr, rows, cols, r0, k0, K, s_across, GR, GC, PER, BN, BK)
            if HAS_OFFSET:  # affine version 2: + offset, rounded on its own (dequantize launches without FMA)
                w = w + _tile_param(m_ptr, rows, cols, r0, k0, K, s_across, GR, GC, PER, BN, BK)
        elif MAP == 1:  # lut
            if TILED:
                q = _tile_index(rows, cols, r0, k0, K, t_across, TGR, TGC, PER, BN, BK) * T + q
            w = tl.load(t_ptr + q).to(tl.float32)
        else:  # raw codes
            w = (q + OFFSET).to(tl.float32)
    if HAS_FACTOR:
        if MAP == 2:
            w = w * _tile_param(f_ptr, rows, cols, r0, k0, K, f_across, FGR, FGC, 1, BN, BK)
        else:
            w = w * _tile_param(f_ptr, rows, cols, r0, k0, K, f_across, FGR, FGC, PER, BN, BK)
    return w


# ---------------------------------------------------------------------------------------------------------------
# kernels

@triton.jit
def gemv_kernel(x_ptr, y_ptr, N, K,
                codes, KW, s_ptr, z_ptr, m_ptr, s_across, t_ptr, t_across, T, f_ptr, f_across,
                BITS: tl.constexpr, PLANAR: tl.constexpr, KW4: tl.constexpr, PER: tl.constexpr,
                OFFSET: tl.constexpr, MAP: tl.constexpr,
                HAS_ZERO: tl.constexpr, HAS_OFFSET: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr,
                TILED: tl.constexpr, TGR: tl.constexpr, TGC: tl.constexpr,
                HAS_FACTOR: tl.constexpr, FGR: tl.constexpr, FGC: tl.constexpr,
                VQ_M: tl.constexpr, VQ_D: tl.constexpr, VQ_VEC: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, ACC: tl.constexpr):
    """y[n] += sum_k W[n, k] x[k] for one row of x; programs over (row blocks, K splits); fp32 accumulation.
    ACC=False (one K split only) stores y[n] = sum instead, in y's dtype: no zero fill and no cast launch."""
    r0 = tl.program_id(0) * BN
    k_split = tl.cdiv(tl.cdiv(K, BK), SPLIT_K) * BK  # each split covers whole BK blocks
    k_lo = tl.program_id(1) * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        w = _weight_tile(r0, k0, N, K, codes, KW, s_ptr, z_ptr, m_ptr, s_across, t_ptr, t_across, T, f_ptr, f_across,
                         BITS, PLANAR, KW4, PER, OFFSET, MAP, HAS_ZERO, HAS_OFFSET, GR, GC, TILED, TGR, TGC,
                         HAS_FACTOR, FGR, FGC, VQ_M, VQ_D, VQ_VEC, BN, BK)
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    out = tl.sum(acc, axis=1)
    rows = r0 + tl.arange(0, BN)
    if SPLIT_K == 1:
        if ACC:
            tl.store(y_ptr + rows, tl.load(y_ptr + rows, mask=rows < N) + out, mask=rows < N)
        else:
            tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=rows < N)
    else:
        tl.atomic_add(y_ptr + rows, out, mask=rows < N)


@triton.jit
def matmul_kernel(x_ptr, y_ptr, M, N, K, stride_xm,
                  codes, KW, s_ptr, z_ptr, m_ptr, s_across, t_ptr, t_across, T, f_ptr, f_across,
                  BITS: tl.constexpr, PLANAR: tl.constexpr, KW4: tl.constexpr, PER: tl.constexpr,
                  OFFSET: tl.constexpr, MAP: tl.constexpr,
                  HAS_ZERO: tl.constexpr, HAS_OFFSET: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr,
                  TILED: tl.constexpr, TGR: tl.constexpr, TGC: tl.constexpr,
                  HAS_FACTOR: tl.constexpr, FGR: tl.constexpr, FGC: tl.constexpr,
                  VQ_M: tl.constexpr, VQ_D: tl.constexpr, VQ_VEC: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
    """Y[m, n] += sum_k X[m, k] W[n, k] for a few rows of x: the decoded tile feeds tl.dot on tensor cores (in x's
    dtype for fp16/bf16; 3xTF32 for fp32 x, about fp32 accuracy); programs over (row blocks, x blocks, K splits)."""
    r0 = tl.program_id(0) * BN
    xm = tl.program_id(1) * BM + tl.arange(0, BM)
    k_split = tl.cdiv(tl.cdiv(K, BK), SPLIT_K) * BK
    k_lo = tl.program_id(2) * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        w = _weight_tile(r0, k0, N, K, codes, KW, s_ptr, z_ptr, m_ptr, s_across, t_ptr, t_across, T, f_ptr, f_across,
                         BITS, PLANAR, KW4, PER, OFFSET, MAP, HAS_ZERO, HAS_OFFSET, GR, GC, TILED, TGR, TGC,
                         HAS_FACTOR, FGR, FGC, VQ_M, VQ_D, VQ_VEC, BN, BK)
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + xm[:, None] * stride_xm + cols[None, :], mask=(xm < M)[:, None] & (cols < K)[None, :],
                    other=0.0)
        if x_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
    rows = r0 + tl.arange(0, BN)
    out = y_ptr + xm[:, None] * N + rows[None, :]
    mask = (xm < M)[:, None] & (rows < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out, tl.load(out, mask=mask) + acc, mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def dequant_kernel(out_ptr, N, K,
                   codes, KW, s_ptr, z_ptr, m_ptr, s_across, t_ptr, t_across, T, f_ptr, f_across,
                   BITS: tl.constexpr, PLANAR: tl.constexpr, KW4: tl.constexpr, PER: tl.constexpr,
                   OFFSET: tl.constexpr, MAP: tl.constexpr,
                   HAS_ZERO: tl.constexpr, HAS_OFFSET: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr,
                   TILED: tl.constexpr, TGR: tl.constexpr, TGC: tl.constexpr,
                   HAS_FACTOR: tl.constexpr, FGR: tl.constexpr, FGC: tl.constexpr,
                   VQ_M: tl.constexpr, VQ_D: tl.constexpr, VQ_VEC: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
    """The fp32 weight [N, K], one [BN, BK] tile per program."""
    r0 = tl.program_id(0) * BN
    k0 = tl.program_id(1) * BK
    w = _weight_tile(r0, k0, N, K, codes, KW, s_ptr, z_ptr, m_ptr, s_across, t_ptr, t_across, T, f_ptr, f_across,
                     BITS, PLANAR, KW4, PER, OFFSET, MAP, HAS_ZERO, HAS_OFFSET, GR, GC, TILED, TGR, TGC,
                     HAS_FACTOR, FGR, FGC, VQ_M, VQ_D, VQ_VEC, BN, BK)
    rows = r0 + tl.arange(0, BN)
    cols = k0 + tl.arange(0, BK)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], w,
             mask=(rows < N)[:, None] & (cols < K)[None, :])


# ---------------------------------------------------------------------------------------------------------------
# launch configurations

def _gemv_configs() -> list[triton.Config]:
    shapes = [(16, 256, 1, 4), (32, 256, 1, 4), (64, 128, 1, 4), (16, 512, 1, 4), (32, 512, 1, 8),
              (64, 256, 1, 8), (8, 512, 1, 4), (16, 256, 2, 4), (16, 512, 4, 4), (32, 256, 4, 4), (8, 512, 8, 4)]
    return [triton.Config({"BN": bn, "BK": bk, "SPLIT_K": s}, num_warps=w, num_stages=3) for bn, bk, s, w in shapes]


def _matmul_configs() -> list[triton.Config]:
    shapes = [(32, 64, 1, 4), (64, 64, 1, 4), (64, 128, 1, 4), (128, 64, 1, 4), (128, 128, 1, 8), (32, 128, 2, 4),
              (64, 128, 4, 4), (64, 256, 1, 8), (32, 256, 4, 4)]
    return [triton.Config({"BN": bn, "BK": bk, "SPLIT_K": s}, num_warps=w, num_stages=3) for bn, bk, s, w in shapes]


def _prune(configs: list[triton.Config], nargs: dict, **consts: Any) -> list[triton.Config]:
    """Drop configurations that waste programs on this shape, break the vq vector gather, or (fp32 x: 3xTF32 dot
    operands) spill registers on sm_90."""
    n, k = nargs["N"], nargs["K"]
    fp32 = nargs["x_ptr"].dtype == torch.float32
    keep = [c for c in configs
            if (not consts.get("VQ_VEC") or c.kwargs["BK"] % consts["VQ_D"] == 0)
            and c.kwargs["BN"] <= max(16, triton.next_power_of_2(n))
            and c.kwargs["SPLIT_K"] <= max(1, triton.cdiv(k, c.kwargs["BK"]))
            and not (fp32 and "BM" in consts and c.kwargs["BK"] > 128)]
    return keep or [min(configs, key=lambda c: c.kwargs["BN"] * c.kwargs["BK"])]


_KEY = ["N", "K", "BITS", "PLANAR", "MAP", "GC", "VQ_M", "VQ_D"]


def autotuned(kernel: Any, do_bench: Any = None) -> Any:
    """``kernel`` (gemv_kernel or matmul_kernel) wrapped in triton.autotune over its configuration list. y is
    restored after every trial, so the tuning call still returns y + x @ W.T. ``do_bench`` replaces the timer
    (tests drive the whole tuning path under the interpreter with it)."""
    gemv = kernel is gemv_kernel
    configs = _gemv_configs() if gemv else _matmul_configs()
    key = _KEY if gemv else _KEY + ["BM"]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune}, restore_value=["y_ptr"],
                           do_bench=do_bench)(kernel)


gemv_tuned = matmul_tuned = None  # built on first use (never under the interpreter, which cannot time kernels)


def _tuned() -> tuple[Any, Any]:
    global gemv_tuned, matmul_tuned
    if gemv_tuned is None:
        gemv_tuned, matmul_tuned = autotuned(gemv_kernel), autotuned(matmul_kernel)
    return gemv_tuned, matmul_tuned


# ---------------------------------------------------------------------------------------------------------------
# launchers

@dataclass
class FusedArgs:
    """A prepared fused term as kernel arguments: tensors, runtime integers and compile-time constants."""

    n: int
    k: int
    tensors: tuple  # codes, scale, zero, offset, table, factor (a placeholder where unused)
    ints: tuple  # KW (words in a one-bit row), s_across, t_across, T, f_across
    consts: dict

    def args(self) -> tuple:
        codes, scale, zero, offset, table, factor = self.tensors
        kw, s_across, t_across, t_size, f_across = self.ints
        return codes, kw, scale, zero, offset, s_across, table, t_across, t_size, factor, f_across


def _block(n: int, cap: int, floor: int) -> int:
    return max(floor, min(cap, triton.next_power_of_2(n)))


def _interpret_config(fa: FusedArgs, m: int) -> dict[str, int]:
    """One big block per program: the interpreter pays per program and per loop step, not per element."""
    bk = _block(fa.k, 512 if m == 1 else 256, 32)
    if fa.consts["VQ_VEC"]:
        bk = max(bk, fa.consts["VQ_D"])
    return {"BN": _block(fa.n, 128, 8 if m == 1 else 16), "BK": bk, "SPLIT_K": 1}


def matmul_into(fa: FusedArgs, x: torch.Tensor, y: torch.Tensor, config: dict[str, int] | None = None) -> None:
    """y [M, N] fp32 += x [M, K] @ W.T for one fused term (x contiguous; fp32, fp16 or bf16).

    ``config`` ({"BN", "BK", "SPLIT_K"}) fixes the launch; otherwise the autotuned kernels pick one on a GPU and
    a single large-block configuration is used under the interpreter."""
    m = x.shape[0]
    if INTERPRET and x.dtype == torch.bfloat16 and m > 1:
        x = x.float()  # the interpreter's tl.dot misreads bf16 operands (triton 3.9); GPUs do not
    if config is None and INTERPRET:
        config = _interpret_config(fa, m)
    bm = _block(m, 64, 16)
    if config is None and not AUTOTUNE:
        nargs = {"N": fa.n, "K": fa.k, "x_ptr": x}
        first = _prune(_gemv_configs() if m == 1 else _matmul_configs(), nargs,
                       **fa.consts, **({} if m == 1 else {"BM": bm}))[0]
        config = dict(first.kwargs)
    if m == 1:
        if config is not None:
            grid = (triton.cdiv(fa.n, config["BN"]), config["SPLIT_K"])
            gemv_kernel[grid](x, y, fa.n, fa.k, *fa.args(), **fa.consts, **config, ACC=True)
            return

        def gemv_grid(meta: dict) -> tuple[int, int]:
            return triton.cdiv(fa.n, meta["BN"]), meta["SPLIT_K"]

        _tuned()[0][gemv_grid](x, y, fa.n, fa.k, *fa.args(), **fa.consts, ACC=True)
        return
    if config is not None:
        grid = (triton.cdiv(fa.n, config["BN"]), triton.cdiv(m, bm), config["SPLIT_K"])
        matmul_kernel[grid](x, y, m, fa.n, fa.k, x.stride(0), *fa.args(), **fa.consts, BM=bm, **config)
        return

    def matmul_grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(fa.n, meta["BN"]), triton.cdiv(m, bm), meta["SPLIT_K"]

    _tuned()[1][matmul_grid](x, y, m, fa.n, fa.k, x.stride(0), *fa.args(), **fa.consts, BM=bm)


def dequantize(fa: FusedArgs, out: torch.Tensor, config: dict[str, int] | None = None) -> None:
    """out [N, K] fp32 = W for one fused term (``config``: {"BN", "BK"})."""
    if config is None:
        config = _interpret_config(fa, 1) if INTERPRET else {"BN": 32, "BK": 128}
        config = {"BN": config["BN"], "BK": max(config["BK"], fa.consts["VQ_D"] if fa.consts["VQ_VEC"] else 0)}
    grid = (triton.cdiv(fa.n, config["BN"]), triton.cdiv(fa.k, config["BK"]))
    # (q - zero) * scale + offset rounds after the product, as the reference does: no fused multiply-add there
    exact = {"enable_fp_fusion": False} if fa.consts["HAS_OFFSET"] else {}
    dequant_kernel[grid](out, fa.n, fa.k, *fa.args(), **fa.consts, BN=config["BN"], BK=config["BK"], **exact)


# ---------------------------------------------------------------------------------------------------------------
# frozen GEMV launches (decode): one launch per call, bound once

def tuned_gemv_config() -> Any:
    """The configuration the GEMV autotuner used for its last call (a triton.Config), or None."""
    tuned = _tuned()[0]
    return getattr(tuned, "best_config", None)


_RUNNER_OK: bool | None = None  # whether the compiled kernel's own launcher works in this triton (checked once)
RUNNER_PROBLEM: str | None = None  # why it does not, for `bench/triton_launch.py`


class FrozenGemv:
    """A GEMV launch with a fixed configuration (the one the autotuner chose): later calls skip the autotuner and,
    once checked equal to the ordinary launch, triton's argument binding too (the compiled kernel's launcher).
    With one K split the kernel writes y directly in x's dtype (ACC=False); with several it accumulates into a
    zeroed fp32 y. A decode step of a small model is bound by launch overhead, so this is where its time goes."""

    def __init__(self, fa: FusedArgs, config: Any) -> None:
        self.n, self.k = fa.n, fa.k
        self.split_k = int(config.kwargs["SPLIT_K"])
        self.direct = self.split_k == 1
        self.grid = (triton.cdiv(fa.n, config.kwargs["BN"]), self.split_k)
        self.consts = {**fa.consts, **config.kwargs, "ACC": not self.direct}
        self.options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        self.args = fa.args()
        names = gemv_kernel.arg_names
        self.const_values = tuple(self.consts[name] for name in names[4 + len(self.args):])
        self.runners: dict[torch.dtype, Any] = {}

    def out_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return x_dtype if self.direct else torch.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """y [1, N] = x [1, K] @ W.T, in x's dtype (x contiguous)."""
        global _RUNNER_OK
        if self.direct:
            y = torch.empty(1, self.n, dtype=x.dtype, device=x.device)
        else:
            y = torch.zeros(1, self.n, dtype=torch.float32, device=x.device)
        runner = self.runners.get(x.dtype)
        if runner is not None and x.data_ptr() % 16 == 0:  # the compiled kernel assumed an aligned x
            runner(x, y, self.n, self.k, *self.args)
        else:
            compiled = gemv_kernel[self.grid](x, y, self.n, self.k, *self.args, **self.consts, **self.options)
            if _RUNNER_OK is not False and x.data_ptr() % 16 == 0 and x.dtype not in self.runners:
                self.runners[x.dtype] = self._checked_runner(compiled, x, y)
        return y if self.direct else y.to(x.dtype)

    def _checked_runner(self, compiled: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        """The compiled kernel's launcher, if it computes exactly what the ordinary launch computed."""
        global _RUNNER_OK, RUNNER_PROBLEM
        ok, problems = False, []
        # Whether the launcher takes the compile-time constants too differs between triton versions: try both.
        for tail in ((), self.const_values):
            try:
                launch = compiled[(*self.grid, 1)]  # the launcher reads three grid dimensions
                again = torch.empty_like(y) if self.direct else torch.zeros_like(y)
                launch(x, again, self.n, self.k, *self.args, *tail)
                ok = torch.equal(again, y) if self.direct else bool(torch.allclose(again, y, rtol=1e-5, atol=1e-6))
                if ok:
                    break
                problems.append(f"{len(tail)} constants: results differ")
            except Exception as exc:  # an API this triton does not have: keep the ordinary launch
                problems.append(f"{len(tail)} constants: {type(exc).__name__}: {str(exc)[:200]}")
        if _RUNNER_OK is None or not ok:
            _RUNNER_OK = ok
            RUNNER_PROBLEM = None if ok else "; ".join(problems)
        if not ok:
            return None

        def runner(*args: Any) -> None:
            launch(*args, *tail)

        return runner
