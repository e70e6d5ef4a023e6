"""Numba CPU kernels: fused dequantize-and-multiply over the "sliced words" layout, plus the cheap correction terms.

Layout (built by ``numba_repack``): a b-bit code matrix [R, C] becomes uint32 words [R, T, 16]. Columns are cut into
slices of 16 (slice s = columns 16s..16s+15); slice s lives in tile t = s // cpw at bit offset (s % cpw) * b of the 16
words of that tile, lane p holding column 16s + p (cpw = 32 // b codes per word). A kernel loads 16 consecutive words
and, for each of the cpw slots, shifts, masks and converts 16 codes at once against 16 consecutive x values: the loops
below are written so LLVM vectorizes the lane loop into one 512-bit (or two 256-bit) operations per slot.

The affine identity keeps the hot loop to one multiply-add per weight:
    y_r = sum_g S[r, g] * sum_{c in g} v(q_rc) x_c  -  sum_g ZS[r, g] * sum_{c in g} x_c
with v(q) = q (affine) or table[q] (lut; per-tile tables are rows of a 2-D table picked by the row's block
``row_tab[r]`` plus the column group's ``grp_tab[g]``), S the product of every scale on the row/column-group grid
and ZS = Z * S (minus an affine offset M times the factors above it: w = S q + M - Z S).
A tile whose slots all fall in one group (tile_group >= 0) multiplies by S once per tile; otherwise each slot
multiplies by its own group's scale (slice_group, unsigned so numba emits no negative-index fix-up). Group sums of
x are computed once per call. Rows are handed out in blocks of 16 and swept in column chunks so the chunk of x
stays in L1 while the block's rows stream past.

Affine codes skip the shift: slot k is read as (w & mask << k*b), which is q * 2**(k*b) exactly, against x
pre-scaled by 2**-(k*b) when it is padded (the top slot, which reaches the sign bit, is shifted instead).

Batches of up to 4 rows of x share each unpacked code (nb = 1, 2 or 4 accumulators). Indices are written as
multi-dimensional array subscripts of loop variables so LLVM can prove them non-negative (a flattened index makes
numba's negative-index wraparound turn every x load into a gather). Tables of up to 16 entries use an explicit
AVX-512 permute, or two AVX2 permutes and a blend (``_lut16_tile``), where the CPU has them; LLVM would otherwise
emit a gather per 8 or 16 codes.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

LANES = 16
BATCH_WIDTHS = (4, 2, 1)  # accumulator counts the fused kernels are compiled for; larger batches are split
# Tables of up to 16 entries are looked up with permutes instead of gathers (a gather per 8 codes is ~10x slower on
# AMD Zen): one AVX-512 vpermps per 16 codes, or with AVX2 two 8-entry vpermps per 8 codes and a blend on the code's
# top bit (one vpermps when the table has at most 8 entries).
_FEATURES = llvm_binding.get_host_cpu_features() if config.CPU_NAME is None else {}
PERMUTE_WIDTH = 16 if _FEATURES.get("avx512f", False) else 8 if _FEATURES.get("avx2", False) else 0
PERMUTE_LUT = PERMUTE_WIDTH > 0
LUT_NONE, LUT_GATHER, LUT_PERMUTE = 0, 1, 2
# 8-bit tables that are FP8 E4M3 / E5M2 (checked at load: ``numba_prepared.fp8_mode``) decode arithmetically: the
# code's bits as an fp16 (one vcvtph2ps per 8 codes, subnormals exact), times 2**8 for E4M3's smaller bias.
LUT_E4M3, LUT_E5M2 = 3, 4
# The same, 32 codes per step (``_fp8_tile``) where every tile lies in one scale group (per-channel FP8): x is then
# laid out in the order the conversions produce.
LUT_E4M3_TILE, LUT_E5M2_TILE = 5, 6
ROW_BLOCK = 16  # rows per parallel work item
X_CHUNK_FLOATS = 4096  # columns x batch rows of x per pass over a row block (16 KB: L1-resident)


def codes_per_word(bits: int) -> int:
    return 32 // bits


def padded_cols(cols: int, bits: int) -> int:
    """Columns after padding to whole tiles of 16 * cpw."""
    tile = LANES * codes_per_word(bits)
    return -(-cols // tile) * tile


# ---------------------------------------------------------------------------------------------------------------
# a 16-entry table lookup as an AVX-512 permute (LLVM vectorizes table[q] into gathers, ~10x slower)

@intrinsic
def _lut16_tile(typingctx, table_t, trow_t, words_t, r_t, t_t, x_t, scale_t, groups_t, nb_t, bits_t, per_slot_t):
    """(sum_{k, p} v_k[p] * x[b, t, k, p] for b < nb) with v_k = table[trow, (words[r, t, p] >> k*bits) & mask],
    times scale[r, groups[t, k]] per slot k when per_slot. The table row must hold 16 floats."""
    literals = (nb_t, bits_t, per_slot_t)
    if not all(isinstance(lit, (types.IntegerLiteral, types.BooleanLiteral)) for lit in literals):
        return None
    nb, bits, per_slot = (lit.literal_value for lit in literals)
    cpw, mask = 32 // bits, (1 << bits) - 1
    sig = types.UniTuple(types.float32, nb)(table_t, trow_t, words_t, r_t, t_t, x_t, scale_t, groups_t, nb_t, bits_t,
                                            per_slot_t)

    def codegen(context, builder, signature, args):  # pragma: no cover - runs inside numba's compiler
        trow, r, t = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3, 4))
        arrays = [context.make_array(ty)(context, builder, val)
                  for ty, val in zip(signature.args[:8], args[:8], strict=False) if isinstance(ty, types.Array)]
        table_a, words_a, x_a, scale_a, groups_a = arrays
        table_ty, _, words_ty, _, _, x_ty, scale_ty, groups_ty = signature.args[:8]
        width = PERMUTE_WIDTH  # lanes per vector: 16 (AVX-512) or 8 (AVX2, two halves per 16 codes)
        f32, i32, intp = ir.FloatType(), ir.IntType(32), context.get_value_type(types.intp)
        vf, vi = ir.VectorType(f32, width), ir.VectorType(i32, width)
        module = builder.module
        permute = cgutils.get_or_insert_function(module, ir.FunctionType(vf, [vf, vi]), (
            "llvm.x86.avx512.permvar.sf.512" if width == 16 else "llvm.x86.avx2.permps"))
        fma = cgutils.get_or_insert_function(module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{width}f32")
        reduce_add = cgutils.get_or_insert_function(module, ir.FunctionType(f32, [f32, vf]),
                                                    f"llvm.vector.reduce.fadd.v{width}f32")

        def vector_at(ary_ty, ary, index, vec_ty):
            ptr = cgutils.get_item_pointer(context, builder, ary_ty, ary, index)
            return builder.load(builder.bitcast(ptr, vec_ty.as_pointer()), align=4)

        def const(value):
            return ir.Constant(intp, value)

        def ints(value):
            return ir.Constant(vi, [value] * width)

        # 8 lanes: vpermps reads the low 3 bits of each index, so a 4-bit code picks from the low and the high
        # half of the table and its top bit, moved to the sign bit, selects; 3-bit codes need no mask either
        split = width == 8 and bits == 4
        tables = [vector_at(table_ty, table_a, [trow, const(h * width)], vf) for h in range(1 + split)]
        accs = [ir.Constant(vf, [0.0] * width) for _ in range(nb)]
        for half in range(LANES // width):
            word_v = vector_at(words_ty, words_a, [r, t, const(half * width)], vi)
            for k in range(cpw):
                shifted = builder.lshr(word_v, ints(k * bits)) if k else word_v
                index = shifted if width == 8 and bits >= 3 else builder.and_(shifted, ints(mask))
                value = builder.call(permute, [tables[0], index])
                if split:
                    high = builder.call(permute, [tables[1], index])
                    top = builder.shl(word_v, ints(28 - 4 * k)) if k < 7 else word_v  # bit 4k+3 -> bit 31
                    value = builder.select(builder.icmp_signed("<", top, ints(0)), high, value)
                if per_slot:
                    group = builder.load(cgutils.get_item_pointer(context, builder, groups_ty, groups_a,
                                                                  [t, const(k)]))
                    group = builder.sext(group, intp)
                    factor = builder.load(cgutils.get_item_pointer(context, builder, scale_ty, scale_a, [r, group]))
                    splat = builder.insert_element(ir.Constant(vf, ir.Undefined), factor, ir.Constant(i32, 0))
                    splat = builder.shuffle_vector(splat, ir.Constant(vf, ir.Undefined), ints(0))
                    value = builder.fmul(value, splat)
                for b in range(nb):
                    xv = vector_at(x_ty, x_a, [const(b), t, const(k), const(half * width)], vf)
                    accs[b] = builder.call(fma, [value, xv, accs[b]])
        sums = []
        for acc in accs:
            total = builder.call(reduce_add, [ir.Constant(f32, 0.0), acc])
            total.fastmath.add("reassoc")
            sums.append(total)
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@intrinsic
def _half_bits(typingctx, bits_t):
    """float32 of the IEEE half whose bits are the low 16 of a uint32 (vectorizes to vcvtph2ps with F16C)."""
    sig = types.float32(bits_t)

    def codegen(context, builder, signature, args):  # pragma: no cover - runs inside numba's compiler
        half = builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=True)
def _fp8_value(q, e4m3):  # pragma: no cover - compiled
    """The FP8 value of the low byte of q (uint32): E5M2 is the top byte of an fp16; E4M3 moves its 4-bit exponent
    and 3-bit mantissa under fp16's fields (bias 15 instead of 7: times 2**8, exact)."""
    if e4m3:
        h = ((q << np.uint32(7)) & np.uint32(0x3F80)) | ((q << np.uint32(8)) & np.uint32(0x8000))
        return _half_bits(h) * np.float32(256.0)
    return _half_bits((q << np.uint32(8)) & np.uint32(0xFF00))


@njit(inline="always")
def _fp8_tile_position(k, p):  # pragma: no cover - compiled
    """Where x of slot k, lane p goes in a tile of 64 for ``_fp8_tile``: vector h*4 + (k & 1)*2 + sub (8 floats
    each) of lanes 8h + 4 sub + i, element 2i + (k >> 1) (the even bytes of a word, then the odd ones)."""
    h = p // 8
    sub = (p % 8) // 4
    i = p % 4
    return (h * 4 + (k & 1) * 2 + sub) * 8 + 2 * i + (k >> 1)


@intrinsic
def _fp8_tile(typingctx, words_t, r_t, t_t, x_t, nb_t, e4m3_t):
    """(sum over the tile's 64 codes of fp8(code) * x for b < nb): each 8 words give 32 codes, the even and the odd
    bytes masked into 16-bit halves, moved under fp16's fields and converted 8 at a time; x in
    ``_fp8_tile_position`` order."""
    if not all(isinstance(lit, (types.IntegerLiteral, types.BooleanLiteral)) for lit in (nb_t, e4m3_t)):
        return None
    nb, e4m3 = nb_t.literal_value, e4m3_t.literal_value
    sig = types.UniTuple(types.float32, nb)(words_t, r_t, t_t, x_t, nb_t, e4m3_t)

    def codegen(context, builder, signature, args):  # pragma: no cover - runs inside numba's compiler
        r, t = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2))
        words_ty, _, _, x_ty = signature.args[:4]
        words_a = context.make_array(words_ty)(context, builder, args[0])
        x_a = context.make_array(x_ty)(context, builder, args[3])
        f32, i32, i16, intp = ir.FloatType(), ir.IntType(32), ir.IntType(16), context.get_value_type(types.intp)
        v8f, v8i, v16i16, v8h = (ir.VectorType(f32, 8), ir.VectorType(i32, 8), ir.VectorType(i16, 16),
                                 ir.VectorType(ir.HalfType(), 8))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f, v8f, v8f]), "llvm.fma.v8f32")
        reduce_add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, v8f]),
                                                    "llvm.vector.reduce.fadd.v8f32")

        def const(value):
            return ir.Constant(intp, value)

        def ints(value):
            return ir.Constant(v8i, [value] * 8)

        def load(ary_ty, ary, index, vec_ty):
            ptr = cgutils.get_item_pointer(context, builder, ary_ty, ary, index)
            return builder.load(builder.bitcast(ptr, vec_ty.as_pointer()), align=4)

        accs = [ir.Constant(v8f, [0.0] * 8) for _ in range(nb)]
        for h in range(2):
            word = load(words_ty, words_a, [r, t, const(8 * h)], v8i)
            for part in range(2):
                v = builder.and_(builder.lshr(word, ints(8)) if part else word, ints(0x00FF00FF))
                if e4m3:
                    bits = builder.or_(builder.shl(builder.and_(v, ints(0x007F007F)), ints(7)),
                                       builder.shl(builder.and_(v, ints(0x00800080)), ints(8)))
                else:
                    bits = builder.shl(v, ints(8))
                halves = builder.bitcast(builder.bitcast(bits, v16i16), ir.VectorType(ir.HalfType(), 16))
                for sub in range(2):
                    picked = builder.shuffle_vector(halves, ir.Constant(ir.VectorType(ir.HalfType(), 16),
                                                                        ir.Undefined),
                                                    ir.Constant(v8i, list(range(8 * sub, 8 * sub + 8))))
                    value = builder.fpext(builder.bitcast(picked, v8h), v8f)
                    vector = h * 4 + part * 2 + sub
                    for b in range(nb):
                        xv = load(x_ty, x_a, [const(b), t, const(vector // 2), const(8 * (vector % 2))], v8f)
                        accs[b] = builder.call(fma, [value, xv, accs[b]])
        sums = []
        for acc in accs:
            total = builder.call(reduce_add, [ir.Constant(f32, 0.0), acc])
            total.fastmath.add("reassoc")
            if e4m3:  # fp16's bias is 8 more than E4M3's
                total = builder.fmul(total, ir.Constant(f32, 256.0))
            sums.append(total)
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


# ---------------------------------------------------------------------------------------------------------------
# a whole row (a range of tiles) in one call: vector accumulators live across tiles, several independent chains

ROW_AFFINE, ROW_LUT, ROW_E4M3, ROW_E5M2, ROW_NIBBLE, ROW_NIBBLE8 = 0, 1, 2, 3, 4, 5  # decodings of ``_row_dot``
VECTOR_WIDTH = 16 if _FEATURES.get("avx512f", False) else 8
# 4-bit codes into a 16-entry table with AVX2: the "nibble" layout of a tile's 128 columns, looked up with vpshufb
# on the four byte planes of the fp32 table (exact) and interleaved back into fp32 (vpunpck), 12 in-lane shuffles
# per 32 codes instead of two lane-crossing permutes, a blend and two shifts per 8. Column c of a tile is vector
# v = c // 8, element E = c % 8; vector v comes from half h = v // 8 (words 8h..8h+7), nibble part (v // 4) % 2 of
# the bytes n = 16 (E // 4) + 4 (v % 4) + E % 4 (the order vpunpck{l,h}bw then vpunpck{l,h}wd produce), so x keeps
# its natural column order and every vector of 8 codes lies in one scale group of 8 or more columns.
NIBBLE_LUT = bool(_FEATURES.get("avx2", False))
# A run of vectors sharing a scale is summed in len(run) // RUN_DEPTH partial chains (1 to 4), each times the run's
# scale into an accumulator: short runs (groups of 16 or 32 columns) then cost one multiply-add per vector plus one
# per run, not two per vector; a chain of 4 FMAs per run is short enough for the out-of-order core to overlap runs.
RUN_DEPTH = 4


def _nibble_map() -> tuple[np.ndarray, np.ndarray]:
    """(word, bit shift) of each of a tile's 128 columns in the nibble layout."""
    c = np.arange(128)
    v, e = c // 8, c % 8
    n = 16 * (e // 4) + 4 * (v % 4) + e % 4
    byte = 32 * (v // 8) + n
    return (byte // 4).astype(np.intp), (8 * (byte % 4) + 4 * ((v // 4) % 2)).astype(np.uint32)


NIBBLE_WORD, NIBBLE_SHIFT = _nibble_map()


# 4-bit codes into a table of small integers times 2**24 (``numba_prepared`` normalises tables whose entries are
# integer multiples, |k| <= 127, of one power of two: E2M1 for MXFP4/NVFP4, GGUF's IQ4_NL values, ...): one vpshufb
# on the table's int8 plane per 32 codes, then each byte of a dword moved to the top byte (a shift and a mask) and
# converted, k * 2**24 exactly: 1 shuffle per 32 codes instead of 12. The "byte" layout: column c of a tile is
# vector v = c // 8, element E = c % 8, from word 8 (v // 8) + E, byte v % 4, nibble part (v // 4) % 2.
def _byte_map() -> tuple[np.ndarray, np.ndarray]:
    """(word, bit shift) of each of a tile's 128 columns in the byte layout."""
    c = np.arange(128)
    v, e = c // 8, c % 8
    return (8 * (v // 8) + e).astype(np.intp), (8 * (v % 4) + 4 * ((v // 4) % 2)).astype(np.uint32)


BYTE_WORD, BYTE_SHIFT = _byte_map()


@intrinsic
def _row_dot(typingctx, words_t, r_t, t0_t, t1_t, x_t, table_t, trow_t, scale_t, sr_t, groups_t, nb_t, mode_t,
             bits_t, spg_t):
    """(sum_{t0 <= t < t1} sum_{k, p} S[sr, g(t, k)] v(words[r, t, p], k) x[b, t, k, p] for b < nb), x as the fused
    kernel lays it out (``sr``: the row of ``scale`` that holds row r's scales: r, or a row of scales the kernel
    decoded). ``spg``: slots per scale group: 0 when the row has one group (scale[sr, 0], applied once at
    the end), >= cpw when every tile lies in one group (groups[t, 0]), else a divisor of cpw (runs of spg slots).
    Decodings (``mode``): affine codes (masked as in the fused kernel, x pre-scaled), a table of up to 16 entries
    (permutes; per run the table itself is scaled, so each value costs no multiply), FP8 E4M3 / E5M2 (fp16 bits, x
    in ``_fp8_tile_position`` order). Products go round-robin into several accumulators per row of x, so the loop
    is bound by decoding throughput, not by the latency of one chain of FMAs; they are reduced once per call."""
    literals = (nb_t, mode_t, bits_t, spg_t)
    if not all(isinstance(lit, types.IntegerLiteral) for lit in literals):
        return None
    nb, mode, bits, spg = (lit.literal_value for lit in literals)
    cpw, mask = 32 // bits, (1 << bits) - 1
    sig = types.UniTuple(types.float32, nb)(words_t, r_t, t0_t, t1_t, x_t, table_t, trow_t, scale_t, sr_t, groups_t,
                                            nb_t, mode_t, bits_t, spg_t)
    fp8 = mode in (ROW_E4M3, ROW_E5M2)
    nibble = mode in (ROW_NIBBLE, ROW_NIBBLE8)
    int8_table = mode == ROW_NIBBLE8

    def codegen(context, builder, signature, args):  # pragma: no cover - runs inside numba's compiler
        words_ty, _, _, _, x_ty, table_ty, _, scale_ty, _, groups_ty = signature.args[:10]
        r, t0, t1, trow, sr = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 3, 6, 8))
        words_a = context.make_array(words_ty)(context, builder, args[0])
        x_a = context.make_array(x_ty)(context, builder, args[4])
        table_a = context.make_array(table_ty)(context, builder, args[5])
        scale_a = context.make_array(scale_ty)(context, builder, args[7])
        groups_a = context.make_array(groups_ty)(context, builder, args[9])
        width = 8 if fp8 or nibble else PERMUTE_WIDTH if mode == ROW_LUT else VECTOR_WIDTH
        f32, i32, i16, intp = ir.FloatType(), ir.IntType(32), ir.IntType(16), context.get_value_type(types.intp)
        vf, vi = ir.VectorType(f32, width), ir.VectorType(i32, width)
        module = builder.module
        fma = cgutils.get_or_insert_function(module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{width}f32")
        reduce_add = cgutils.get_or_insert_function(module, ir.FunctionType(f32, [f32, vf]),
                                                    f"llvm.vector.reduce.fadd.v{width}f32")
        if mode == ROW_LUT:
            permute = cgutils.get_or_insert_function(module, ir.FunctionType(vf, [vf, vi]), (
                "llvm.x86.avx512.permvar.sf.512" if width == 16 else "llvm.x86.avx2.permps"))

        def const(value):
            return ir.Constant(intp, value)

        def ints(value):
            return ir.Constant(vi, [value] * width)

        def vector_at(ary_ty, ary, index, vec_ty):
            ptr = cgutils.get_item_pointer(context, builder, ary_ty, ary, index)
            return builder.load(builder.bitcast(ptr, vec_ty.as_pointer()), align=4)

        def splat(value):
            vec = builder.insert_element(ir.Constant(vf, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(vec, ir.Constant(vf, ir.Undefined), ir.Constant(vi, [0] * width))

        def tree_sum(values):
            values = list(values)
            while len(values) > 1:
                values = [builder.fadd(values[i], values[i + 1]) if i + 1 < len(values) else values[i]
                          for i in range(0, len(values), 2)]
            return values[0]

        chains = 4 if nb == 1 else 2
        zero = ir.Constant(vf, [0.0] * width)
        accs = [[cgutils.alloca_once(builder, vf) for _ in range(chains)] for _ in range(nb)]
        for row in accs:
            for ptr in row:
                builder.store(zero, ptr)
        split = mode == ROW_LUT and width == 8 and bits == 4
        tables = ([vector_at(table_ty, table_a, [trow, const(h * width)], vf) for h in range(1 + split)]
                  if mode == ROW_LUT else [])
        halves = LANES // width
        i8 = ir.IntType(8)
        v32i8 = ir.VectorType(i8, 32)
        if nibble:
            pshufb = cgutils.get_or_insert_function(module, ir.FunctionType(v32i8, [v32i8, v32i8]),
                                                    "llvm.x86.avx2.pshuf.b")
            entries = vector_at(table_ty, table_a, [trow, const(0)], ir.VectorType(f32, 16))
        if int8_table:  # k of every entry k * 2**24, in both 128-bit lanes
            v16i32 = ir.VectorType(i32, 16)
            small = builder.trunc(builder.ashr(builder.fptosi(entries, v16i32), ir.Constant(v16i32, [24] * 16)),
                                  ir.VectorType(i8, 16))
            plane8 = builder.shuffle_vector(small, ir.Constant(ir.VectorType(i8, 16), ir.Undefined),
                                            ir.Constant(ir.VectorType(i32, 32), [e % 16 for e in range(32)]))
        elif nibble:  # the table's byte m of every entry, in both 128-bit lanes
            entries = builder.bitcast(entries, ir.VectorType(i8, 64))
            planes = [builder.shuffle_vector(entries, ir.Constant(ir.VectorType(i8, 64), ir.Undefined),
                                             ir.Constant(ir.VectorType(i32, 32), [4 * (e % 16) + m for e in range(32)]))
                      for m in range(4)]
        if fp8:
            runs = [[(h, part, sub) for h in range(2) for part in range(2) for sub in range(2)]]
        elif nibble:  # vectors of 8 columns, in column order
            per_run = 16 if spg == 0 or spg >= cpw else 2 * spg
            runs = [list(range(j, j + per_run)) for j in range(0, 16, per_run)]
        elif spg == 0 or spg >= cpw:
            runs = [[(k, h) for k in range(cpw) for h in range(halves)]]
        else:
            runs = [[(k, h) for k in range(j * spg, (j + 1) * spg) for h in range(halves)] for j in range(cpw // spg)]
        counter = [0]

        with cgutils.for_range_slice(builder, t0, t1, const(1), intp) as (t, _):
            word_vs = [vector_at(words_ty, words_a, [r, t, const(h * width)], vi) for h in range(halves)]
            fp8_parts = {}
            if fp8:
                for h in range(2):
                    w = word_vs[h]
                    if mode == ROW_E4M3:  # s eeee mmm -> fp16 bits s 0eeee mmm0000000 (bias 15, not 7: x 2**8)
                        even = builder.and_(w, ints(0x00FF00FF))
                        even = builder.shl(builder.add(even, builder.and_(w, ints(0x00800080))), ints(7))
                        odd = builder.or_(builder.and_(builder.lshr(w, ints(1)), ints(0x3F803F80)),
                                          builder.and_(w, ints(0x80008000)))
                    else:  # E5M2 is the top byte of an fp16
                        even = builder.shl(builder.and_(w, ints(0x00FF00FF)), ints(8))
                        odd = builder.and_(w, ints(0xFF00FF00))
                    for part, bits16 in enumerate((even, odd)):
                        fp8_parts[h, part] = builder.bitcast(builder.bitcast(bits16, ir.VectorType(i16, 16)),
                                                             ir.VectorType(ir.HalfType(), 16))

            nibble_vs = {}

            def unpack(a, b, size, high):
                n = 16 // size  # elements per 128-bit lane
                start = n // 2 if high else 0
                order = [i for lane in range(2) for e in range(start, start + n // 2)
                         for i in (lane * n + e, 2 * n + lane * n + e)]
                return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 2 * n), order))

            def nibble_group(h, part):
                """The 4 vectors of 8 codes from nibble part ``part`` of words 8h..8h+7 (decoded when first used,
                so that few decoded vectors are live at once)."""
                w = word_vs[h]
                codes = builder.and_(builder.lshr(w, ints(4)) if part else w, ints(0x0F0F0F0F))
                if int8_table:
                    looked = builder.bitcast(builder.call(pshufb, [plane8, builder.bitcast(codes, v32i8)]), vi)
                    for k in range(4):  # byte k of each dword to the top byte: k * 2**24, sign in place
                        top = builder.shl(looked, ints(24 - 8 * k)) if k < 3 else looked
                        top = builder.and_(top, ints(-(1 << 24))) if k > 0 else top
                        nibble_vs[(2 * h + part) * 4 + k] = builder.sitofp(top, vf)
                    return
                v16i16 = ir.VectorType(i16, 16)
                codes = builder.bitcast(codes, v32i8)
                p0, p1, p2, p3 = (builder.call(pshufb, [plane, codes]) for plane in planes)
                for half16 in range(2):  # bytes 0-7 / 8-15 of each lane, as 16-bit low and high halves
                    low = builder.bitcast(unpack(p0, p1, 1, half16), v16i16)
                    high = builder.bitcast(unpack(p2, p3, 1, half16), v16i16)
                    for q2 in range(2):
                        q = 2 * half16 + q2
                        nibble_vs[(2 * h + part) * 4 + q] = builder.bitcast(unpack(low, high, 2, q2), vf)

            def decode(item, tabs):
                """(value vector, x index) of one vector of codes."""
                if nibble:
                    if item not in nibble_vs:
                        nibble_group(item // 8, (item // 4) % 2)
                    return nibble_vs[item], [t, const(item // 2), const(8 * (item % 2))]
                if fp8:
                    h, part, sub = item
                    picked = builder.shuffle_vector(
                        fp8_parts[h, part], ir.Constant(ir.VectorType(ir.HalfType(), 16), ir.Undefined),
                        ir.Constant(ir.VectorType(i32, 8), list(range(8 * sub, 8 * sub + 8))))
                    vector = h * 4 + part * 2 + sub
                    return builder.fpext(picked, vf), [t, const(vector // 2), const(8 * (vector % 2))]
                k, h = item
                w = word_vs[h]
                index = [t, const(k), const(h * width)]
                if mode == ROW_AFFINE:
                    if k * bits + bits <= 31:  # q * 2**(k*bits); x is pre-scaled
                        return builder.sitofp(builder.and_(w, ints(mask << (k * bits))), vf), index
                    return builder.sitofp(builder.lshr(w, ints(k * bits)), vf), index
                shifted = builder.lshr(w, ints(k * bits)) if k else w
                code = shifted if width == 8 and bits >= 3 else builder.and_(shifted, ints(mask))
                value = builder.call(permute, [tabs[0], code])
                if split:  # bit 4k+3 (the code's top bit) -> the sign bit selects the high half of the table
                    high = builder.call(permute, [tabs[1], code])
                    top = builder.shl(w, ints(28 - 4 * k)) if k < 7 else w
                    value = builder.select(builder.icmp_signed("<", top, ints(0)), high, value)
                return value, index

            def accumulate(b, value, xv):
                slot = accs[b][counter[0] % chains]
                builder.store(builder.call(fma, [value, xv, builder.load(slot)]), slot)

            for run in runs:
                first = 0 if fp8 else run[0] // 2 if nibble else run[0][0]
                factor = None
                if spg != 0:
                    group = builder.load(cgutils.get_item_pointer(context, builder, groups_ty, groups_a,
                                                                  [t, const(first)]))
                    factor = builder.load(cgutils.get_item_pointer(context, builder, scale_ty, scale_a,
                                                                   [sr, builder.zext(group, intp)]))
                if mode == ROW_LUT or factor is None:  # scaled table (or no scale): straight into the chains
                    tabs = [builder.fmul(tab, splat(factor)) for tab in tables] if factor is not None else tables
                    for item in run:
                        value, index = decode(item, tabs)
                        for b in range(nb):
                            accumulate(b, value, vector_at(x_ty, x_a, [const(b)] + index, vf))
                        counter[0] += 1
                    continue
                # codes without a table: partial sums of the run, then one FMA by the run's scale
                parts = [[] for _ in range(nb)]
                pchains = max(1, min(chains, len(run) // RUN_DEPTH))
                for i, item in enumerate(run):
                    value, index = decode(item, tables)
                    for b in range(nb):
                        xv = vector_at(x_ty, x_a, [const(b)] + index, vf)
                        if i < pchains:
                            parts[b].append(builder.fmul(value, xv))
                        else:
                            parts[b][i % pchains] = builder.call(fma, [value, xv, parts[b][i % pchains]])
                # each partial chain times the scale into its own accumulator: a sum of the partials first would let
                # LLVM (unsafe-fp-math) fold the run back into one serial chain of FMAs
                scaled = splat(factor)
                for i in range(len(parts[0])):
                    for b in range(nb):
                        accumulate(b, parts[b][i], scaled)
                    counter[0] += 1

        sums = []
        for b in range(nb):
            total = builder.call(reduce_add, [ir.Constant(f32, 0.0), tree_sum(builder.load(p) for p in accs[b])])
            total.fastmath.add("reassoc")
            if spg == 0:
                total = builder.fmul(total, builder.load(cgutils.get_item_pointer(context, builder, scale_ty, scale_a,
                                                                                  [sr, const(0)])))
            if mode == ROW_E4M3:  # fp16's bias is 8 more than E4M3's
                total = builder.fmul(total, ir.Constant(f32, 256.0))
            sums.append(total)
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


# ---------------------------------------------------------------------------------------------------------------
# the fused grouped dot: y[b, r] += sum_c S[r, g(c)] * v(q_rc) * x[b, c] - sum_g ZS[r, g] * xsum[b, g]

_ROW_MODES = {LUT_NONE: ROW_AFFINE, LUT_PERMUTE: ROW_LUT, LUT_E4M3_TILE: ROW_E4M3, LUT_E5M2_TILE: ROW_E5M2}


NIBBLE_OFF, NIBBLE_PLANES, NIBBLE_INT8 = 0, 1, 2  # how a whole-row 4-bit table kernel looks codes up
# How the whole-row path reads the scale of a group: fp32, or one byte per group decoded exactly in the kernel (a
# quarter of the bytes; ``numba_prepared.compact_scales`` picks it only where the decoding reproduces the fp32 scales
# bit for bit): SCALE_E8M0, scales that are powers of two (MXFP4's shared exponents): the byte is the fp32 exponent
# field, 2**(e - 127), 0 -> 0.0; SCALE_E4M3: an FP8 E4M3 byte under fp32's sign, exponent and mantissa fields
# (its value times 2**-120, exact: E4M3's subnormals become fp32 subnormals) times one fp32 factor ``scale_mul``
# (NVFP4's global scale times 2**120). Each row decodes a column chunk's groups into an fp32 buffer in L1.
SCALE_F32, SCALE_E8M0, SCALE_E4M3 = 0, 1, 2


@intrinsic
def _pick(typingctx, first_t, second_t, which_t):
    """``second`` if the literal ``which`` is true, else ``first`` (arguments of different types: the kernel's scales
    as given or as decoded)."""
    if not isinstance(which_t, (types.BooleanLiteral, types.IntegerLiteral)):
        return None
    chosen = second_t if which_t.literal_value else first_t
    sig = chosen(first_t, second_t, which_t)

    def codegen(context, builder, signature, args):  # pragma: no cover - runs inside numba's compiler
        value = args[1] if which_t.literal_value else args[0]
        return impl_ret_borrowed(context, builder, chosen, value)

    return sig, codegen


@intrinsic
def _f32_from_bits(typingctx, bits_t):
    """The float32 whose bits are the low 32 of the integer ``bits``."""
    sig = types.float32(bits_t)

    def codegen(context, builder, signature, args):  # pragma: no cover - runs inside numba's compiler
        value = args[0]
        if value.type.width != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return sig, codegen


def _make_dot(bits: int, nb: int, lut_mode: int, spg: int = -1, nibble: int = NIBBLE_OFF,
              scale_code: int = 0) -> Callable:
    cpw = codes_per_word(bits)
    # whole rows through ``_row_dot`` where the scale groups line up with slots (spg >= 0, ``row_dot_spg``)
    row_path = spg >= 0 and lut_mode in _ROW_MODES
    row_mode = {NIBBLE_PLANES: ROW_NIBBLE, NIBBLE_INT8: ROW_NIBBLE8}.get(nibble, _ROW_MODES.get(lut_mode, 0))
    mask = (1 << bits) - 1
    lut = lut_mode == LUT_GATHER
    permute = lut_mode == LUT_PERMUTE
    e4m3 = lut_mode == LUT_E4M3
    e5m2 = lut_mode == LUT_E5M2
    fp8_tile = lut_mode in (LUT_E4M3_TILE, LUT_E5M2_TILE)
    tile_e4m3 = lut_mode == LUT_E4M3_TILE
    masked = lut_mode == LUT_NONE  # affine codes are read without a shift (module docstring)
    compact = scale_code != SCALE_F32
    e8m0_scale = scale_code == SCALE_E8M0

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def dot(words, table, row_tab, grp_tab, scale, scale_mul, tile_group, slice_group, zs, group_starts, block_rows,
            xin, y):  # pragma: no cover - compiled
        rows = words.shape[0]
        tiles = words.shape[1]
        nzg = zs.shape[1]
        chunk = max(1, X_CHUNK_FLOATS // (nb * cpw * LANES))  # tiles per column chunk
        # x [n, C] -> padded tiles x[n, T, cpw, 16] (pre-scaled per slot for masked codes), and group sums.
        # n = nb, or nb per block of ``block_rows`` output rows (a multiple of ROW_BLOCK) when x differs per block.
        # np.empty and explicit loops: in a parallel function np.zeros/np.ones become parallel regions of their own.
        x = np.empty((xin.shape[0], tiles, cpw, LANES), dtype=np.float32)
        xsum = np.empty((nb, nzg), dtype=np.float32)
        pre = np.empty(cpw, dtype=np.float32)
        for k in range(cpw):
            pre[k] = np.float32(1.0) / np.float32(1 << (k * bits)) if masked and k * bits + bits <= 31 else 1.0
        cols = xin.shape[1]
        for b in range(xin.shape[0]):
            for t in range(tiles):
                for k in range(cpw):
                    base = (t * cpw + k) * LANES
                    for p in range(LANES):
                        value = xin[b, base + p] * pre[k] if base + p < cols else np.float32(0.0)
                        if fp8_tile:  # the order _fp8_tile converts codes in
                            at = _fp8_tile_position(k, p)
                            x[b, t, at // LANES, at % LANES] = value
                        else:
                            x[b, t, k, p] = value
        for b in range(nb):
            for g in range(nzg):
                end = group_starts[g + 1] if g + 1 < nzg else xin.shape[1]
                acc = np.float32(0.0)
                for c in range(group_starts[g], end):
                    acc += xin[b, c]
                xsum[b, g] = acc
        row_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
        sbuf = np.empty((row_blocks if compact else 0, scale.shape[1] if compact else 0), dtype=np.float32)
        sc = _pick(scale, sbuf, compact)  # fp32 scales for the tile-by-tile paths (not taken with byte scales)
        for rb in prange(row_blocks):
            r_end = min(rows, (rb + 1) * ROW_BLOCK)
            xb = (rb * ROW_BLOCK // block_rows) * nb if block_rows > 0 else 0
            # one 3-D view per batch row, so every row of x is addressed like the first
            x0 = x[xb]
            x1 = x[xb + min(1, nb - 1)]
            x2 = x[xb + min(2, nb - 1)]
            x3 = x[xb + min(3, nb - 1)]
            xs = x[xb:xb + nb]
            for t_start in range(0, tiles, chunk):  # a slice of x that stays in L1 across the block's rows
                t_end = min(tiles, t_start + chunk)
                for r in range(rb * ROW_BLOCK, r_end):
                    tb = row_tab[r]
                    o0 = np.float32(0.0)
                    o1 = np.float32(0.0)
                    o2 = np.float32(0.0)
                    o3 = np.float32(0.0)
                    if row_path:
                        if compact:  # this chunk's groups decoded into fp32, row rb of sbuf
                            g_end = slice_group[t_end - 1, cpw - 1] + np.uint32(1)
                            for g in range(slice_group[t_start, 0], g_end):
                                if e8m0_scale:
                                    sbuf[rb, g] = _f32_from_bits(np.uint32(scale[r, g]) << np.uint32(23))
                                else:
                                    q = np.uint32(scale[r, g])  # E4M3 under fp32's fields (2**-120 x)
                                    sbuf[rb, g] = _f32_from_bits(((q << np.uint32(24)) & np.uint32(0x80000000)) |
                                                                 ((q << np.uint32(20)) & np.uint32(0x07F00000))
                                                                 ) * scale_mul
                        sums = _row_dot(words, r, t_start, t_end, xs, table, tb, _pick(scale, sbuf, compact),
                                        rb if compact else r, slice_group, nb, row_mode, bits, spg)
                        o0 += sums[0]
                        if nb > 1:
                            o1 += sums[1]
                        if nb > 2:
                            o2 += sums[2]
                            o3 += sums[3]
                    for t in range(t_start, t_end if not row_path else t_start):
                        a0 = np.float32(0.0)
                        a1 = np.float32(0.0)
                        a2 = np.float32(0.0)
                        a3 = np.float32(0.0)
                        g = tile_group[t]
                        if fp8_tile:  # every tile in one group (checked at load)
                            sums = _fp8_tile(words, r, t, xs, nb, tile_e4m3)
                            s = sc[r, g]
                            o0 += s * sums[0]
                            if nb > 1:
                                o1 += s * sums[1]
                            if nb > 2:
                                o2 += s * sums[2]
                                o3 += s * sums[3]
                        elif permute:  # one table per row (grp_tab is all zeros in this mode)
                            if g >= 0:
                                sums = _lut16_tile(table, tb, words, r, t, xs, sc, slice_group, nb, bits, False)
                                s = sc[r, g]
                            else:
                                sums = _lut16_tile(table, tb, words, r, t, xs, sc, slice_group, nb, bits, True)
                                s = np.float32(1.0)
                            o0 += s * sums[0]
                            if nb > 1:
                                o1 += s * sums[1]
                            if nb > 2:
                                o2 += s * sums[2]
                                o3 += s * sums[3]
                        elif g >= 0:
                            trow = tb + grp_tab[g]
                            for p in range(LANES):
                                w = words[r, t, p]
                                for k in range(cpw):
                                    if lut:
                                        v = table[trow, np.int32((w >> np.uint32(k * bits)) & np.uint32(mask))]
                                    elif e4m3:
                                        v = _fp8_value(w >> np.uint32(k * bits), True)
                                    elif e5m2:
                                        v = _fp8_value(w >> np.uint32(k * bits), False)
                                    elif k * bits + bits <= 31:  # q * 2**(k*bits) from the word; x is pre-scaled
                                        v = np.float32(np.int32(w & np.uint32(mask << (k * bits))))
                                    else:  # the top slot reaches the sign bit: shift instead (nothing above to mask)
                                        v = np.float32(np.int32(w >> np.uint32(k * bits)))
                                    a0 += v * x0[t, k, p]
                                    if nb > 1:
                                        a1 += v * x1[t, k, p]
                                    if nb > 2:
                                        a2 += v * x2[t, k, p]
                                        a3 += v * x3[t, k, p]
                            s = sc[r, g]
                            o0 += s * a0
                            if nb > 1:
                                o1 += s * a1
                            if nb > 2:
                                o2 += s * a2
                                o3 += s * a3
                        else:
                            for p in range(LANES):
                                w = words[r, t, p]
                                for k in range(cpw):
                                    sg = slice_group[t, k]
                                    if lut:
                                        q = np.int32((w >> np.uint32(k * bits)) & np.uint32(mask))
                                        v = table[tb + grp_tab[sg], q]
                                    elif e4m3:
                                        v = _fp8_value(w >> np.uint32(k * bits), True)
                                    elif e5m2:
                                        v = _fp8_value(w >> np.uint32(k * bits), False)
                                    elif k * bits + bits <= 31:
                                        v = np.float32(np.int32(w & np.uint32(mask << (k * bits))))
                                    else:
                                        v = np.float32(np.int32(w >> np.uint32(k * bits)))
                                    v *= sc[r, sg]
                                    a0 += v * x0[t, k, p]
                                    if nb > 1:
                                        a1 += v * x1[t, k, p]
                                    if nb > 2:
                                        a2 += v * x2[t, k, p]
                                        a3 += v * x3[t, k, p]
                            o0 += a0
                            if nb > 1:
                                o1 += a1
                            if nb > 2:
                                o2 += a2
                                o3 += a3
                    if t_start == 0:
                        for g in range(nzg):
                            z = zs[r, g]
                            o0 -= z * xsum[0, g]
                            if nb > 1:
                                o1 -= z * xsum[1, g]
                            if nb > 2:
                                o2 -= z * xsum[2, g]
                                o3 -= z * xsum[3, g]
                    y[0, r] += o0
                    if nb > 1:
                        y[1, r] += o1
                    if nb > 2:
                        y[2, r] += o2
                        y[3, r] += o3

    return dot


_DOTS: dict[tuple[int, int, int, int, int, int], Callable] = {}


def row_dot_spg(bits: int, lut_mode: int, width: int, count: int) -> int:
    """Slots per scale group for ``_row_dot`` (see there) on a grid of ``count`` column groups of ``width``
    columns, or -1 where the groups do not line up with slots (then the kernel decodes tile by tile)."""
    cpw = codes_per_word(bits)
    if lut_mode not in _ROW_MODES or (lut_mode == LUT_PERMUTE and not PERMUTE_LUT):
        return -1
    if count == 1:
        return 0
    if width % (LANES * cpw) == 0:
        return cpw
    if lut_mode in (LUT_E4M3_TILE, LUT_E5M2_TILE):  # needs whole tiles per group
        return -1
    if width % LANES == 0 and cpw % (width // LANES) == 0:
        return width // LANES
    return -1


def dot_kernel(bits: int, nb: int, lut_mode: int, spg: int = -1, nibble: int = NIBBLE_OFF,
               scale_code: int = 0) -> Callable:
    """The fused kernel for b-bit codes and nb rows of x (compiled on first use, cached on disk); ``spg`` >= 0
    (:func:`row_dot_spg`) selects the whole-row path, ``nibble`` its 4-bit table lookups: NIBBLE_PLANES (words in
    the nibble layout, fp32 byte planes) or NIBBLE_INT8 (the byte layout, a table normalised to k * 2**24);
    ``scale_code`` how the whole-row path reads the scales (SCALE_F32, or one byte per group: SCALE_E8M0,
    SCALE_E4M3; then ``scale`` is uint8 and the kernel decodes each column chunk's groups into fp32)."""
    key = (bits, nb, lut_mode, spg, nibble, scale_code)
    kernel = _DOTS.get(key)
    if kernel is None:
        kernel = _DOTS[key] = _make_dot(bits, nb, lut_mode, spg, nibble, scale_code)
    return kernel


def _layout_map(int8_table: bool) -> tuple[np.ndarray, np.ndarray]:
    return (BYTE_WORD, BYTE_SHIFT) if int8_table else (NIBBLE_WORD, NIBBLE_SHIFT)


def to_nibble_layout(words: np.ndarray, int8_table: bool = False) -> np.ndarray:
    """Sliced 4-bit words [R, T, 16] (slot k of lane p = column 16k + p of the tile) in the nibble layout (or, for
    tables normalised to int8 values, the byte layout)."""
    word_of, shift_of = _layout_map(int8_table)
    out = np.zeros_like(words)
    for c in range(128):
        code = (words[:, :, c % 16] >> np.uint32(4 * (c // 16))) & np.uint32(15)
        out[:, :, word_of[c]] |= code << shift_of[c]
    return out


def from_nibble_layout(words: np.ndarray, int8_table: bool = False) -> np.ndarray:
    """The inverse of :func:`to_nibble_layout`."""
    word_of, shift_of = _layout_map(int8_table)
    out = np.zeros_like(words)
    for c in range(128):
        code = (words[:, :, word_of[c]] >> shift_of[c]) & np.uint32(15)
        out[:, :, c % 16] |= code << np.uint32(4 * (c // 16))
    return out


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def dot_any_group(words, bits, table, lut, row_tab, grp_tab, scale, col_group, zs, xsum, x, y):  # pragma: no cover
    """The same sum for column groups that are not multiples of 16 (any width): scalar, slower, still fused.

    x: [nb, Cpad] (flat padded columns), col_group: [C] group of each column.
    """
    rows = words.shape[0]
    cols = col_group.shape[0]
    nb = x.shape[0]
    cpw = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    for r in prange(rows):
        for b in range(nb):
            acc = np.float32(0.0)
            for c in range(cols):
                s = c >> 4
                t = s // cpw
                q = np.int32((words[r, t, c & 15] >> np.uint32((s - t * cpw) * bits)) & mask)
                g = col_group[c]
                v = table[row_tab[r] + grp_tab[g], q] if lut else np.float32(q)
                acc += v * scale[r, g] * x[b, c]
            for g in range(zs.shape[1]):
                acc -= zs[r, g] * xsum[b, g]
            y[b, r] += acc


@njit(cache=True, nogil=True)
def pad_and_group_sums(x, xp, group_starts, xsum):  # pragma: no cover - compiled
    """Copy x [B, C] into the zeroed padded buffer xp [B, Cpad] and sum each column group into xsum [B, G]."""
    batch, cols = x.shape
    groups = xsum.shape[1]
    for b in range(batch):
        for c in range(cols):
            xp[b, c] = x[b, c]
        for g in range(groups):
            end = group_starts[g + 1] if g + 1 < groups else cols
            acc = np.float32(0.0)
            for c in range(group_starts[g], end):
                acc += x[b, c]
            xsum[b, g] = acc


# ---------------------------------------------------------------------------------------------------------------
# additive vector codebooks

@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def vq_dot(codes, books, scale, vec_group, col_group, x, y):  # pragma: no cover - compiled
    """y[b, r] += sum_v S[r, g(v)] sum_m books[m, codes[r, v, m]] . x[b, v].

    codes [R, V, M]; books [M, K, d]; x [nb, V, d]. When a vector straddles scale groups (vec_group[v] < 0) each
    element takes its own column's scale (col_group).
    """
    rows, vectors, books_n = codes.shape
    d = books.shape[2]
    nb = x.shape[0]
    for r in prange(rows):
        for b in range(nb):
            acc = np.float32(0.0)
            for v in range(vectors):
                g = vec_group[v]
                part = np.float32(0.0)
                for m in range(books_n):
                    code = codes[r, v, m]
                    if g >= 0:
                        for e in range(d):
                            part += books[m, code, e] * x[b, v, e]
                    else:
                        for e in range(d):
                            part += books[m, code, e] * x[b, v, e] * scale[r, col_group[v * d + e]]
                acc += part * scale[r, g] if g >= 0 else part
            y[b, r] += acc


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def vq_lookup_dot(codes, partial, scale, vec_group, y):  # pragma: no cover - compiled
    """y[b, r] += sum_v S[r, g(v)] sum_m partial[b, m, v, codes[r, v, m]], partial = books . x precomputed per call."""
    rows, vectors, books_n = codes.shape
    nb = partial.shape[0]
    for r in prange(rows):
        for b in range(nb):
            acc = np.float32(0.0)
            for v in range(vectors):
                part = np.float32(0.0)
                for m in range(books_n):
                    part += partial[b, m, v, codes[r, v, m]]
                acc += part * scale[r, vec_group[v]]
            y[b, r] += acc


# ---------------------------------------------------------------------------------------------------------------
# sparse outliers

@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def csr_dot(row_ptr, col_idx, values, x, y):  # pragma: no cover - compiled
    """y[b, r] += sum_i values[i] * x[b, col_idx[i]] over the nonzeros of row r."""
    rows = row_ptr.shape[0] - 1
    nb = x.shape[0]
    for r in prange(rows):
        start = row_ptr[r]
        end = row_ptr[r + 1]
        for b in range(nb):
            acc = np.float32(0.0)
            for i in range(start, end):
                acc += values[i] * x[b, col_idx[i]]
            y[b, r] += acc


# ---------------------------------------------------------------------------------------------------------------
# dequantization (large batches, conformance): the same layouts written out to a dense fp32 matrix (W += term)

@njit(parallel=True, cache=True, nogil=True)
def dequant_codes(words, bits, table, lut, row_tab, grp_tab, scale, col_group, zs, out, overwrite):  # pragma: no cover
    rows, cols = out.shape
    tiles = words.shape[1]
    cpw = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    has_zero = zs.shape[1] > 0
    for r in prange(rows):
        tb = row_tab[r]
        for t in range(tiles):
            for k in range(cpw):  # 16 consecutive columns share a slot: the lane loop vectorizes
                base = (t * cpw + k) * 16
                if base >= cols:
                    break
                shift = np.uint32(k * bits)
                width = min(16, cols - base)
                g = col_group[base]
                if not lut and col_group[base + width - 1] == g:  # one group: scalar scale, vector lanes
                    s = scale[r, g]
                    z = zs[r, g] if has_zero else np.float32(0.0)
                    for p in range(width):
                        w = np.float32(np.int32((words[r, t, p] >> shift) & mask)) * s - z
                        if overwrite:  # the first term of an uninitialised output: no read, no zeroing pass
                            out[r, base + p] = w
                        else:
                            out[r, base + p] += w
                    continue
                for p in range(width):
                    c = base + p
                    q = np.int32((words[r, t, p] >> shift) & mask)
                    g = col_group[c]
                    w = (table[tb + grp_tab[g], q] if lut else np.float32(q)) * scale[r, g]
                    if has_zero:
                        w -= zs[r, g]
                    if overwrite:
                        out[r, c] = w
                    else:
                        out[r, c] += w


@njit(parallel=True, cache=True, nogil=True)
def dequant_vq(codes, books, scale, col_group, out):  # pragma: no cover - compiled
    rows, vectors, books_n = codes.shape
    d = books.shape[2]
    for r in prange(rows):
        for v in range(vectors):
            for e in range(d):
                acc = np.float32(0.0)
                for m in range(books_n):
                    acc += books[m, codes[r, v, m], e]
                c = v * d + e
                out[r, c] += acc * scale[r, col_group[c]]


@njit(parallel=True, cache=True, nogil=True)
def dequant_csr(row_ptr, col_idx, values, out):  # pragma: no cover - compiled
    for r in prange(row_ptr.shape[0] - 1):
        for i in range(row_ptr[r], row_ptr[r + 1]):
            out[r, col_idx[i]] += values[i]


@njit(parallel=True, cache=True, nogil=True)
def dequant_signs(words, u, v, out):  # pragma: no cover - compiled
    """out += sign * (u @ v) with sign = +1 where the 1-bit code is 1, -1 where it is 0."""
    rows, cols = out.shape
    rank = u.shape[1]
    for r in prange(rows):
        for c in range(cols):
            s = c >> 4
            bit = (words[r, s >> 5, c & 15] >> np.uint32(s & 31)) & np.uint32(1)
            acc = np.float32(0.0)
            for k in range(rank):
                acc += u[r, k] * v[k, c]
            out[r, c] += acc if bit else -acc


# ---------------------------------------------------------------------------------------------------------------
# vq version 2: vectors spanning p output rows (a [p, d] tile; VPTQ's [v, 1]). Codes are repacked to [M, I, J]
# (I = R / p code rows, J = C / d vectors per code row), so each codebook's codes of a code row are contiguous.

VQ_COLUMN_MAX_ROWS = 16  # [p, 1] vectors up to this p get a kernel with p scalar accumulators (``vq_column_kernel``)
_VQ_COLUMN_KERNELS: dict[int, Callable] = {}


def vq_column_kernel(p: int, histogram: bool) -> Callable:
    """The kernel for [p, 1] vectors (VPTQ), compiled once per (p, form):
    y[b, i p + a] += s[i p + a] sum_m sum_j books[m, codes[m, i, j], a] x[b, j].

    Direct form: each code row keeps its p sums in p scalars (registers: a local array would round-trip through
    memory every vector), walks its codes once per codebook, and reads p contiguous floats of a codebook that stays
    in L1. Histogram form: the same sum regrouped by entry, y[b, i p + a] = s sum_m sum_k books[m, k, a] h[m, k] with
    h[m, k] = sum of x[b, j] over the j where codes[m, i, j] = k: one scalar add per code, then K p multiply-adds per
    code row, so it wins when a code row has more codes than the codebook entries (``VQ_HISTOGRAM_RATIO``). The
    source is generated because numba has no fixed-size register vectors."""
    key = (p, histogram)
    kernel = _VQ_COLUMN_KERNELS.get(key)
    if kernel is None:
        kernel = _VQ_COLUMN_KERNELS[key] = _make_vq_column(p, histogram)
    return kernel


# Histogram form when the vectors per code row exceed this many times the entries: measured single-threaded (shared
# 2-core EPYC, v8, K 256) direct vs histogram 4096^2 3.15 vs 1.32 ms, 576x1536 0.174 vs 0.090 ms, 1536x576 (576
# codes per row) 0.167 vs 0.132 ms: ~1.5 ns per code direct, ~0.5 ns per code plus ~1.5 ns per entry histogram.
VQ_HISTOGRAM_RATIO = 1.5
VQ_HISTOGRAM_CHUNK = 16  # code rows per parallel work item (one histogram buffer each)


def _make_vq_column(p: int, histogram: bool) -> Callable:
    acc = [f"a{a}" for a in range(p)]
    head = [
        "import numpy as np",
        "from numba import njit, prange",
        "",
        "",
        "@njit(parallel=True, fastmath=True, cache=True, nogil=True)",
        "def vq_column(codes, books, row_scale, x, y):",
        "    books_n, code_rows, vectors = codes.shape",
    ]
    store = [f"            y[b, i * {p} + {a}] += {name} * row_scale[i * {p} + {a}]" for a, name in enumerate(acc)]
    if not histogram:
        body = [
            "    for i in prange(code_rows):",
            "        for b in range(x.shape[0]):",
            *(f"            {name} = np.float32(0.0)" for name in acc),
            "            for m in range(books_n):",
            "                for j in range(vectors):",
            "                    xj = x[b, j]",
            "                    q = codes[m, i, j]",
            *(f"                    {name} += books[m, q, {a}] * xj" for a, name in enumerate(acc)),
            *store,
        ]
    else:
        body = [
            "    entries = books.shape[1]",
            "    flat = books.reshape(books_n * entries, books.shape[2])",
            f"    chunks = (code_rows + {VQ_HISTOGRAM_CHUNK - 1}) // {VQ_HISTOGRAM_CHUNK}",
            "    for c in prange(chunks):",
            "        h = np.empty(books_n * entries, dtype=np.float32)",
            f"        for i in range(c * {VQ_HISTOGRAM_CHUNK}, min(code_rows, (c + 1) * {VQ_HISTOGRAM_CHUNK})):",
            "          for b in range(x.shape[0]):",
            "            for t in range(books_n * entries):",
            "                h[t] = np.float32(0.0)",
            "            for m in range(books_n):",
            "                for j in range(vectors):",
            "                    h[m * entries + codes[m, i, j]] += x[b, j]",
            *(f"            {name} = np.float32(0.0)" for name in acc),
            "            for t in range(books_n * entries):",
            "                hv = h[t]",
            *(f"                {name} += flat[t, {a}] * hv" for a, name in enumerate(acc)),
            *store,
        ]
    form = "hist" if histogram else "direct"
    return _generated_module(f"qformat_vq_column_{form}_{p}", "\n".join(head + body) + "\n").vq_column


VQ_ROW_MAX_WIDTH = 16  # row vectors of up to this d read directly get d scalar accumulators (``vq_row_kernel``)
_VQ_ROW_KERNELS: dict[int, Callable] = {}


def vq_row_kernel(d: int) -> Callable:
    """Version 1 read directly (no table: AQLM 1x16, whose per-call table would be M V 65536 floats), under row
    scales, compiled once per d: y[b, r] += s[r] sum_v sum_m books[m, codes[r, v, m]] . x[b, v d : v d + d].

    d partial sums (lane e of every vector's dot) in scalars, added up once per row: one multiply-add per weight
    that LLVM can keep in a vector register, instead of a horizontal sum per vector."""
    kernel = _VQ_ROW_KERNELS.get(d)
    if kernel is None:
        kernel = _VQ_ROW_KERNELS[d] = _make_vq_row(d)
    return kernel


def _make_vq_row(d: int) -> Callable:
    acc = [f"a{e}" for e in range(d)]
    lines = [
        "import numpy as np",
        "from numba import njit, prange",
        "",
        "",
        "@njit(parallel=True, fastmath=True, cache=True, nogil=True)",
        "def vq_row(codes, books, row_scale, x, y):",
        "    rows, vectors, books_n = codes.shape",
        "    for r in prange(rows):",
        "        for b in range(x.shape[0]):",
        *(f"            {name} = np.float32(0.0)" for name in acc),
        "            for v in range(vectors):",
        "                for m in range(books_n):",
        "                    q = codes[r, v, m]",
        *(f"                    {name} += books[m, q, {e}] * x[b, v * {d} + {e}]" for e, name in enumerate(acc)),
        f"            y[b, r] += ({' + '.join(acc)}) * row_scale[r]",
    ]
    return _generated_module(f"qformat_vq_row_{d}", "\n".join(lines) + "\n").vq_row


def _generated_module(name: str, source: str) -> ModuleType:
    """Import generated ``source`` from a file of its own, so that numba's on-disk cache keeps the compiled kernel
    (a kernel compiled from a string is recompiled in every process: seconds for 16 accumulators). The file is
    rewritten only when its text changes (numba's cache is keyed on the file's timestamp), atomically. The folder
    is this package's ``__pycache__`` (numba's cache folder when NUMBA_CACHE_DIR is set), never a shared temporary
    folder: code imported from there could be anyone's."""
    root = Path(config.CACHE_DIR) if config.CACHE_DIR else Path(__file__).resolve().parent / "__pycache__"
    folder = root / "qformat_generated_kernels"
    path = folder / f"{name}.py"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != source:
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)
    except OSError:  # a read-only install: compile in this process only
        module = ModuleType(name)
        exec(compile(source.replace("cache=True", "cache=False"), name, "exec"), module.__dict__)  # noqa: S102
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba's cache finds the kernel's globals by module name
    spec.loader.exec_module(module)
    return module


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def vq_tile_dot(codes, books, scale, col_group, p, x, y):  # pragma: no cover - compiled
    """Any [p, d] tile, any scale grid: y[b, r] += sum_c W[r, c] x[b, c] with
    W[i p + a, j d + e] = S[i p + a, g(j d + e)] sum_m books[m, codes[m, i, j], a d + e]."""
    books_n, code_rows, vectors = codes.shape
    d = books.shape[2] // p
    nb = x.shape[0]
    for i in prange(code_rows):
        for a in range(p):
            r = i * p + a
            for b in range(nb):
                acc = np.float32(0.0)
                for j in range(vectors):
                    for e in range(d):
                        c = j * d + e
                        w = np.float32(0.0)
                        for m in range(books_n):
                            w += books[m, codes[m, i, j], a * d + e]
                        acc += w * scale[r, col_group[c]] * x[b, c]
                y[b, r] += acc


@njit(parallel=True, cache=True, nogil=True)
def dequant_vq_tile(codes, books, scale, col_group, p, out):  # pragma: no cover - compiled
    """out += W of :func:`vq_tile_dot`, summed over the codebooks in order m = 0, 1, ... (the reference's order)."""
    books_n, code_rows, vectors = codes.shape
    d = books.shape[2] // p
    for i in prange(code_rows):
        for j in range(vectors):
            for a in range(p):
                r = i * p + a
                for e in range(d):
                    c = j * d + e
                    w = np.float32(0.0)
                    for m in range(books_n):
                        w += books[m, codes[m, i, j], a * d + e]
                    out[r, c] += w * scale[r, col_group[c]]


# ---------------------------------------------------------------------------------------------------------------
# vq version 1 with codes of at most 8 bits (AQLM 2x8, 1x8) under row scales: the per-call table as one row of 256
# floats per code byte. Code byte i of a row (vector i // M, codebook i % M) indexes table row i, so the bytes are
# read 8 at a time as uint64 words whatever M is, and table[b, i, q] = books[i % M, q] . x[b, vector i // M].

VQ_BYTE_ROW_TILE = 64  # output rows per parallel work item
VQ_BYTE_WORD_CHUNK = 2  # code words per pass over a row tile: a 16 x 1 KB table slice that stays in L1


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def vq_byte_tables(x, books_t, table):  # pragma: no cover - compiled
    """table[b, v M + m, k] = sum_e books_t[m, e, k] x[b, v d + e] for k < 256; the rows past V M (padding to whole
    words) are zero. books_t: [M, d, 256] (entries past K zero). The inner loop runs down 256 contiguous entries."""
    nb = x.shape[0]
    books_n, d, entries = books_t.shape
    vectors = x.shape[1] // d
    used = vectors * books_n
    for i in prange(table.shape[1]):
        v = i // books_n
        m = i - v * books_n
        for b in range(nb):
            for k in range(entries):
                table[b, i, k] = np.float32(0.0)
            if i < used:
                for e in range(d):
                    xe = x[b, v * d + e]
                    for k in range(entries):
                        table[b, i, k] += books_t[m, e, k] * xe


@njit(parallel=True, cache=True, nogil=True)
def vq_byte_lookup_dot(words, table, row_scale, y):  # pragma: no cover - compiled
    """y[b, r] += s_r sum_i table[b, i, byte i of row r]; words [R, W] uint64 (8 code bytes each, zero padded),
    table [nb, 8 W, 256]. Rows go in tiles, the words in chunks, so a chunk's table slice serves the whole tile
    from L1. No fastmath: LLVM would vectorize the sums into gathers, several times slower on AMD Zen than scalar
    loads; four partial sums hide the add latency instead (two: 1.5x slower, the adds' latency bound)."""
    rows, n_words = words.shape
    nb = table.shape[0]
    flat = table.reshape(nb, -1)
    tiles = (rows + VQ_BYTE_ROW_TILE - 1) // VQ_BYTE_ROW_TILE
    byte = np.uint64(255)
    for t in prange(tiles):
        r0 = t * VQ_BYTE_ROW_TILE
        r1 = min(rows, r0 + VQ_BYTE_ROW_TILE)
        acc = np.zeros((nb, VQ_BYTE_ROW_TILE), dtype=np.float32)
        for w0 in range(0, n_words, VQ_BYTE_WORD_CHUNK):
            w1 = min(n_words, w0 + VQ_BYTE_WORD_CHUNK)
            for b in range(nb):
                tb = flat[b]
                for r in range(r0, r1):
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    s2 = np.float32(0.0)
                    s3 = np.float32(0.0)
                    for w in range(w0, w1):
                        q = words[r, w]
                        base = np.uint64(w) * np.uint64(2048)
                        s0 += tb[base + (q & byte)]
                        s1 += tb[base + np.uint64(256) + ((q >> np.uint64(8)) & byte)]
                        s2 += tb[base + np.uint64(512) + ((q >> np.uint64(16)) & byte)]
                        s3 += tb[base + np.uint64(768) + ((q >> np.uint64(24)) & byte)]
                        s0 += tb[base + np.uint64(1024) + ((q >> np.uint64(32)) & byte)]
                        s1 += tb[base + np.uint64(1280) + ((q >> np.uint64(40)) & byte)]
                        s2 += tb[base + np.uint64(1536) + ((q >> np.uint64(48)) & byte)]
                        s3 += tb[base + np.uint64(1792) + (q >> np.uint64(56))]
                    acc[b, r - r0] += (s0 + s1) + (s2 + s3)
        for b in range(nb):
            for r in range(r0, r1):
                y[b, r] += acc[b, r - r0] * row_scale[r]
