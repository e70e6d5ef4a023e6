"""Generate the frozen conformance vectors (run from the repository root).

    python conformance/generate.py            # (re)write conformance/vectors/
    python conformance/generate.py --check    # regenerate into a temp dir; fail unless byte-identical to the checked-in

Valid vectors are written with the reference writer (``RecordBuilder`` + ``write_file``); their expected fp32 decode
is computed here with plain numpy from the generating arrays, independently of the reference decoder, and stored as a
plain safetensors file. Invalid vectors are assembled from raw bytes by the small writer below, so they can hold what
no correct writer produces: malformed headers, overlapping offsets, duplicate JSON keys, records that lie.

Each vector draws from its own generator seeded with (SEED, crc32(id)), so adding a vector never changes the others.
"""

from __future__ import annotations

import argparse
import copy
import filecmp
import hashlib
import json
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from qformat.format import QuantizedTensor, RecordBuilder, bitpack, signature, ternary_dict, write_file

SEED = 20250611
MANIFEST_VERSION = 1
VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
F16, F32, BF16 = np.float16, np.float32, ml_dtypes.bfloat16

# NF4 (QLoRA, bitsandbytes): the 16 quantiles of N(0, 1) normalised to [-1, 1], as fp32.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# vector bookkeeping

@dataclass
class Valid:
    id: str
    description: str
    records: list[QuantizedTensor]
    expected: dict[str, np.ndarray]  # record name -> fp32 decode in the record's shape
    plain: dict[str, np.ndarray] = field(default_factory=dict)
    # records with matrix products: the summed product bounds 2 * gamma_k * (|a| @ |b|) per element (float64);
    # tolerance() adds 4 ulp of the expected value, as spec/composition.md#arithmetic prescribes
    product_bounds: dict[str, np.ndarray] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # more vectors on the same file: (id, description, decode options, expected)
    extra: list[tuple[str, str, dict[str, Any], dict[str, np.ndarray]]] = field(default_factory=list)


@dataclass
class Invalid:
    id: str
    description: str
    data: bytes
    code: str
    stage: str  # "open" (structure) or "decode" (needs tensor data)
    tensor: str | None = None
    field: str | None = None


def rng_for(vector_id: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(vector_id.encode())])


# ---------------------------------------------------------------------------------------------------------------
# independent numpy reference for expected values (never calls qformat's decoder)

def tiles(params: np.ndarray, group: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """out[r, c] = params[r // gr, c // gc] (a [1, 1] parameter covers everything)."""
    params = np.asarray(params, dtype=np.float32)
    if params.shape == (1, 1):
        return np.broadcast_to(params, shape)
    rows = np.arange(shape[0]) // group[0]
    cols = np.arange(shape[1]) // group[1]
    return params[rows[:, None], cols[None, :]]


def as_2d(value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    return array.reshape(1, 1) if array.ndim == 0 else array


def affine_ref(q: np.ndarray, scale: Any, zero: Any, group: tuple[int, int], offset: Any = None) -> np.ndarray:
    """((q - zero) * scale) + offset in fp32, the order the spec fixes (each step rounded, no fused multiply-add);
    scale, zero and offset are numbers or per-tile arrays."""
    values = q.astype(np.float32)
    if zero is not None:
        values = values - tiles(as_2d(zero), group, q.shape)
    values = values * tiles(as_2d(scale), group, q.shape)
    if offset is not None:
        values = values + tiles(as_2d(offset), group, q.shape)
    return values


def csr(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(dense)
    ptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(rows, minlength=dense.shape[0]))
    return ptr, cols, dense[rows, cols]


def dyadic(rng: np.random.Generator, shape: tuple[int, ...], step: float = 1 / 64, limit: float = 4.0) -> np.ndarray:
    """fp16 values on a 2**-6 grid: products and short sums are exact in fp32, so matmuls give unique answers."""
    values = np.round(np.clip(rng.standard_normal(shape), -limit, limit) / step) * step
    return values.astype(np.float16)


def fp16(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0, positive: bool = False) -> np.ndarray:
    values = rng.standard_normal(shape) * scale
    return (np.abs(values) + scale / 8 if positive else values).astype(np.float16)


def codes(rng: np.random.Generator, shape: tuple[int, int], bits: int) -> np.ndarray:
    """Random codes that include both 0 and the largest code, so every width is exercised at its edges."""
    q = rng.integers(0, 1 << bits, size=shape, dtype=np.int64)
    q.flat[0] = 0
    q.flat[-1] = (1 << bits) - 1
    return q


def f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a @ b of fp16 factors rounded once to fp32, and its spec bound 2 * gamma_k * (|a| @ |b|) (float64)."""
    a64, b64 = f32(a).astype(np.float64), f32(b).astype(np.float64)
    k = a64.shape[1]
    unit = 2.0 ** -24
    gamma = k * unit / (1 - k * unit)
    return f32(a64 @ b64), 2 * gamma * (np.abs(a64) @ np.abs(b64))


def tolerance(expected: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Per-element tolerance: the product bound plus 4 ulp of the expected value, rounded up to fp32."""
    tau = bound + 4 * np.spacing(np.abs(expected)).astype(np.float64)
    tau32 = tau.astype(np.float32)
    return np.where(tau32.astype(np.float64) < tau, np.nextafter(tau32, np.float32(np.inf)), tau32)


# ---------------------------------------------------------------------------------------------------------------
# valid vectors

@dataclass
class Draft:
    """One valid vector of one record being built: its id, its own generator and the record's builder."""

    vid: str
    rng: np.random.Generator
    b: RecordBuilder

    def valid(self, description: str, weight: dict, expected: np.ndarray, info: dict[str, Any] | None = None,
              **more: Any) -> Valid:
        """The vector: the record finished from ``weight``, decoding to ``expected``."""
        return Valid(self.vid, description, [self.b.finish(weight, info=info)], {self.b.name: expected}, **more)


def draft(vid: str, shape: tuple[int, ...], dtype: str = "F32", name: str = "layer.weight") -> Draft:
    return Draft(vid, rng_for(vid), RecordBuilder(name, shape, dtype))


def affine(b: RecordBuilder, q: np.ndarray, bits: int, group: tuple[int, int], scale: Any, zero: Any = None, *,
           roles: tuple[str, str, str] = ("codes", "scale", "zero"), zero_bits: int | None = None,
           ) -> tuple[dict, np.ndarray]:
    """An affine node over ``bits``-bit packed codes, and its expected value (independent numpy).

    ``scale`` and ``zero`` are JSON numbers or arrays stored as tensors under ``roles``; with ``zero_bits`` the zero
    array is stored as packed codes of that width (GPTQ's qzeros).
    """
    codes_role, scale_role, zero_role = roles
    codes_node = b.packed(codes_role, q, bits)
    scale_node = b.tensor(scale_role, scale) if isinstance(scale, np.ndarray) else scale
    zero_node = zero
    if isinstance(zero, np.ndarray):
        zero_node = b.packed(zero_role, zero, zero_bits) if zero_bits else b.tensor(zero_role, zero)
    node = b.affine(codes_node, scale=scale_node, zero=zero_node, bits=bits, group_shape=group)
    return node, affine_ref(q, scale, zero, group)


def permuted(stored: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The weight a `permute` node decodes to: stored column j is input channel perm[j]."""
    w = np.empty(stored.shape, np.float32)
    w[:, perm] = f32(stored)
    return w


def v_tensor(dtype: Any, label: str) -> Valid:
    d = draft(f"tensor_{label}", (6, 10), "F32" if label == "f32" else label.upper(), "model.embed.weight")
    w = (d.rng.standard_normal((6, 10)) * 0.1).astype(dtype)
    return d.valid(f"a stored {label.upper()} tensor used as the weight (widened to fp32)", d.b.tensor("weight", w),
                   f32(w))


def v_packed(bits: int) -> Valid:
    d = draft(f"packed_w{bits}", (5, 37))
    q = codes(d.rng, (5, 37), bits)  # 37 columns: most widths leave padding bits in each row
    node, _ = affine(d.b, q, bits, (1, 37), 1.0)
    return d.valid(f"{bits}-bit packed codes (5x37, LSB-first rows padded to a byte) under affine scale=1: "
                   "decodes to the codes themselves", node, f32(q))


def v_bitplanes() -> Valid:
    d = draft("bitplanes_w4", (6, 21))
    q = codes(d.rng, (6, 21), 4)
    b = d.b
    truncated = ((q >> 2) << 2) | 0b10  # two planes kept: dropped bits decode to the middle of their interval
    v = d.valid("4 bit-planes (MSB first, 21 columns) under affine scale=0.5, all planes used",
                b.affine(b.bitplanes("planes", q, 4), scale=0.5, bits=4, group_shape=(1, 21)), f32(q) * np.float32(0.5))
    v.extra.append(("bitplanes_w4_use2", "same file decoded with use_planes=2: low bits become 0b10", {"use_planes": 2},
                    {b.name: f32(truncated) * np.float32(0.5)}))
    return v


def v_bitplanes_lut() -> Valid:
    d = draft("bitplanes_lut_w3", (4, 16))
    q = codes(d.rng, (4, 16), 3)
    table = np.sort(fp16(d.rng, (8,))).astype(np.float32)
    b = d.b
    v = d.valid("3-bit codes as bit-planes looked up in an 8-entry fp32 table",
                b.lut(b.bitplanes("planes", q, 3), b.tensor("table", table)), table[q])
    v.extra.append(("bitplanes_lut_w3_use1", "same file with use_planes=1: the two dropped bits decode as 0b10",
                    {"use_planes": 1}, {b.name: table[((q >> 2) << 2) | 0b010]}))
    return v


def v_ternary() -> Valid:
    d = draft("ternary_per_row", (7, 23))
    t = d.rng.integers(-1, 2, size=(7, 23))
    s = fp16(d.rng, (7, 1), 0.05, positive=True)
    b = d.b
    return d.valid("ternary weights (5 trits per byte, 23 columns) times a per-row fp16 scale (BitNet)",
                   b.scale(b.ternary("trits", t), b.tensor("scale", s), group_shape=(1, 23)),
                   f32(t) * tiles(s, (1, 23), t.shape))


def v_ternary_tensor_scale() -> Valid:
    d = draft("ternary_per_tensor", (3, 5))
    t = d.rng.integers(-1, 2, size=(3, 5))
    b = d.b
    return d.valid("ternary 3x5 (exactly one byte per row) with one [1, 1] scale",
                   b.scale(b.ternary("trits", t), b.tensor("scale", np.array([[0.75]], np.float32)), group_shape=(3, 5)),
                   f32(t) * np.float32(0.75))


def v_affine_asym() -> Valid:
    d = draft("affine_asym_g32", (8, 80), "F16")
    q = codes(d.rng, (8, 80), 4)
    s, z = fp16(d.rng, (8, 3), 0.02, positive=True), fp16(d.rng, (8, 3), 3.0)
    return d.valid("4-bit asymmetric, groups of 32 along the input (80 columns: last group has 16), fp16 scale "
                   "and non-integer fp16 zero", *affine(d.b, q, 4, (1, 32), s, z))


def v_affine_packed_zero() -> Valid:
    d = draft("affine_packed_zero", (6, 64))
    q = codes(d.rng, (6, 64), 4)
    s, z = fp16(d.rng, (6, 4), 0.02, positive=True), codes(d.rng, (6, 4), 4)
    return d.valid("4-bit with integer zero points packed as 4-bit codes (GPTQ-style qzeros)",
                   *affine(d.b, q, 4, (1, 16), s, z, zero_bits=4))


def v_affine_per_channel() -> Valid:
    d = draft("affine_per_channel_w8", (9, 24), "BF16")
    q = codes(d.rng, (9, 24), 8)
    s = (np.abs(d.rng.standard_normal((9, 1))) * 0.01 + 0.001).astype(np.float32)
    return d.valid("8-bit symmetric per output channel: fp32 scale [R, 1], constant zero 128",
                   *affine(d.b, q, 8, (1, 24), s, 128))


def v_affine_tiles() -> Valid:
    d = draft("affine_2d_tiles", (10, 40))
    q = codes(d.rng, (10, 40), 3)
    s, z = fp16(d.rng, (3, 3), 0.1, positive=True), fp16(d.rng, (3, 3), 2.0)
    return d.valid("3-bit with 4x16 tiles over 10x40 (partial tiles on both edges)",
                   *affine(d.b, q, 3, (4, 16), s, z))


def v_affine_constants() -> Valid:
    d = draft("affine_constants", (4, 12))
    q = codes(d.rng, (4, 12), 5)
    return d.valid("5-bit with per-tensor constants in the JSON: scale 0.0125, zero 15.5",
                   *affine(d.b, q, 5, (1, 1), 0.0125, 15.5))


def v_affine_w16() -> Valid:
    d = draft("affine_w16", (3, 33))
    q = codes(d.rng, (3, 33), 16)
    s = fp16(d.rng, (3, 3), 1e-4, positive=True)
    return d.valid("16-bit codes (the widest), groups of 16 over 33 columns", *affine(d.b, q, 16, (1, 16), s, 32768))


def v_affine_offset_constant() -> Valid:
    d = draft("affine_v2_offset_constant", (5, 40))
    q = codes(d.rng, (5, 40), 3)
    s = fp16(d.rng, (5, 3), 0.1, positive=True)
    b = d.b
    node = b.affine(b.packed("codes", q, 3), scale=b.tensor("scale", s), zero=3.5, offset=-0.75, bits=3,
                    group_shape=(1, 16))
    return d.valid("affine version 2: 3-bit, groups of 16 over 40 columns, fp16 scale, constant zero 3.5 and constant "
                   "offset -0.75: ((q - 3.5) * s) - 0.75, three fp32 roundings", node,
                   affine_ref(q, s, 3.5, (1, 16), -0.75))


def v_affine_offset_q4_1() -> Valid:
    d = draft("affine_v2_offset_q4_1", (6, 80), "F16")
    q = codes(d.rng, (6, 80), 4)
    scale, offset = fp16(d.rng, (6, 3), 0.02), fp16(d.rng, (6, 3), 0.5)  # signed, like GGUF's d and m
    b = d.b
    node = b.affine(b.packed("codes", q, 4), scale=b.tensor("d", scale), offset=b.tensor("m", offset), bits=4,
                    group_shape=(1, 32))
    return d.valid("affine version 2, GGUF Q4_1-like: 4-bit codes in blocks of 32 (80 columns: the last block has "
                   "16), fp16 d and m per block, no zero: d * q + m in fp32", node,
                   affine_ref(q, scale, None, (1, 32), offset), info={"method": "gguf", "type": "Q4_1"})


def v_affine_offset_nested() -> Valid:
    d = draft("affine_v2_offset_nested", (4, 128), "F16")
    q = codes(d.rng, (4, 128), 4)
    sc, mn = codes(d.rng, (4, 4), 6), codes(d.rng, (4, 4), 6)
    dd, dmin = fp16(d.rng, (4, 2), 0.01), fp16(d.rng, (4, 2), 0.01, positive=True)
    b = d.b
    scale = b.scale(b.packed("scale.codes", sc, 6), b.tensor("scale.d", dd), group_shape=(1, 2))
    offset = b.scale(b.packed("offset.codes", mn, 6), b.tensor("offset.neg_dmin", -dmin), group_shape=(1, 2))
    node = b.affine(b.packed("codes", q, 4), scale=scale, offset=offset, bits=4, group_shape=(1, 32))
    s = f32(sc) * tiles(dd, (1, 2), sc.shape)
    o = f32(mn) * tiles(-dmin, (1, 2), mn.shape)
    return d.valid("affine version 2, GGUF K-quant-like: scale and offset are scale nodes of 6-bit codes per block "
                   "of 32 times fp16 factors per 2 blocks (d, and -dmin stored negated): (d * sc) * q - dmin * mn",
                   node, affine_ref(q, s, None, (1, 32), o), info={"method": "gguf", "type": "Q4_K-like"})


def scaled_lut(b: RecordBuilder, q: np.ndarray, bits: int, table: np.ndarray, factor: tuple[str | dict, np.ndarray],
               group: tuple[int, int]) -> tuple[dict, np.ndarray]:
    """``bits``-bit packed codes looked up in a stored 1-D table, times a per-tile factor, and the expected value.

    ``factor`` is (role, array) for a stored factor, or (node, its value) for one built already (double quantization).
    """
    where, value = factor
    looked_up = b.lut(b.packed("codes", q, bits), b.tensor("table", table))
    node = b.scale(looked_up, b.tensor(where, value) if isinstance(where, str) else where, group_shape=group)
    return node, table[q] * tiles(value, group, q.shape)


def v_lut_nf4() -> Valid:
    d = draft("lut_nf4_absmax", (4, 128), "BF16")
    q = codes(d.rng, (4, 128), 4)
    absmax = (np.abs(d.rng.standard_normal((4, 2))) * 0.05 + 0.01).astype(np.float32)
    return d.valid("NF4: 4-bit codes into the NF4 table, times an fp32 absmax per block of 64 (bitsandbytes)",
                   *scaled_lut(d.b, q, 4, NF4, ("absmax", absmax), (1, 64)))


def v_lut_tile_table_1x1() -> Valid:
    d = draft("lut_tile_table_1x1", (4, 8))
    q = codes(d.rng, (4, 8), 4)
    table = np.sort(fp16(d.rng, (1, 1, 16)), axis=-1)
    b = d.b
    return d.valid("a [1, 1, 16] per-tile table with group_shape [1, 4]: used for every element",
                   b.lut(b.packed("codes", q, 4), b.tensor("table", table), group_shape=(1, 4)), f32(table)[0, 0][q])


def v_lut_per_tile() -> Valid:
    d = draft("lut_per_tile", (16, 64))
    q = codes(d.rng, (16, 64), 3)
    table = np.sort(fp16(d.rng, (2, 2, 8), 0.1), axis=-1)
    b = d.b
    rows = np.arange(16)[:, None] // 8
    cols = np.arange(64)[None, :] // 32
    return d.valid("3-bit codes into a learned fp16 table per 8x32 tile ([2, 2, 8] tables)",
                   b.lut(b.packed("codes", q, 3), b.tensor("table", table), group_shape=(8, 32)),
                   f32(table)[rows, cols, q])


def v_lut_fp8() -> Valid:
    d = draft("lut_fp8_e4m3", (5, 20))
    table = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    table[np.isnan(table)] = 0.0  # e4m3fn's two NaN codes are never produced by a quantizer
    q = codes(d.rng, (5, 20), 8)
    s = (np.abs(d.rng.standard_normal((5, 1))) * 0.01 + 0.001).astype(np.float32)
    return d.valid("FP8 e4m3 as a 256-entry table, per-row fp32 scale", *scaled_lut(d.b, q, 8, table, ("scale", s), (1, 20)))


def v_scale_input_channel() -> Valid:
    d = draft("scale_input_channel", (8, 32))
    q = codes(d.rng, (8, 32), 4)
    s = fp16(d.rng, (8, 2), 0.02, positive=True)
    z = codes(d.rng, (8, 2), 4).astype(np.float16)
    col = fp16(d.rng, (1, 32), 0.5, positive=True)
    inner, stored = affine(d.b, q, 4, (1, 16), s, z)
    return d.valid("AWQ-like: 4-bit g16 weights times a per-input-channel fp16 factor [1, C]",
                   d.b.scale(inner, d.b.tensor("input_scale", col), group_shape=(8, 1)),
                   stored * tiles(col, (8, 1), q.shape))


def vq_ref(q: np.ndarray, books: np.ndarray) -> np.ndarray:
    m, _, _ = books.shape
    books = f32(books)
    rows = q.shape[0]
    q = q.reshape(rows, -1, m)
    out = books[0][q[:, :, 0]]
    for i in range(1, m):
        out = out + books[i][q[:, :, i]]
    return out.reshape(rows, -1)


def v_vq_single() -> Valid:
    d = draft("vq_single_codebook", (6, 32))
    books = fp16(d.rng, (1, 256, 8), 0.1)
    q = codes(d.rng, (6, 4), 8)
    b = d.b
    return d.valid("vector quantization: one 256x8 fp16 codebook, 8-bit codes per 8-wide slice",
                   b.vq(b.packed("codes", q, 8), b.tensor("codebooks", books)), vq_ref(q, books))


def v_vq_aqlm() -> Valid:
    d = draft("vq_additive_aqlm", (8, 64))
    books = fp16(d.rng, (2, 256, 8), 0.05)
    q = codes(d.rng, (8, 8 * 2), 8)  # 64 columns = 8 slices, two codes per slice (slice-major, codebook-minor)
    s = fp16(d.rng, (8, 1), 1.0, positive=True)
    b = d.b
    return d.valid("AQLM-like additive codebooks: 2 x 256 x 8 fp16, summed in codebook order, per-row scale",
                   b.scale(b.vq(b.packed("codes", q, 8), b.tensor("codebooks", books)), b.tensor("scale", s),
                           group_shape=(1, 64)),
                   vq_ref(q, books) * tiles(s, (1, 64), (8, 64)))


def v_vq_tensor_codes() -> Valid:
    d = draft("vq_u16_codes", (5, 12))
    books = fp16(d.rng, (3, 300, 4), 0.1)
    q = d.rng.integers(0, 300, size=(5, 3 * 3)).astype(np.uint16)
    q.flat[-1] = 299
    b = d.b
    return d.valid("3 additive codebooks of 300 entries (not a power of two): codes stored as a U16 tensor",
                   b.vq(b.tensor("codes", q), b.tensor("codebooks", books)), vq_ref(q.astype(np.int64), books))


def vq2_ref(q: np.ndarray, books: np.ndarray, vector_shape: tuple[int, int]) -> np.ndarray:
    """vq version 2, element by element from the spec: w[i*p + a, j*d + b] = sum_m B[m, q[i, j*M + m], a*d + b]."""
    p, d = vector_shape
    m = books.shape[0]
    books = f32(books)
    rows, cols = q.shape[0] * p, q.shape[1] // m * d
    out = np.zeros((rows, cols), np.float32)
    for i in range(q.shape[0]):
        for j in range(q.shape[1] // m):
            for a in range(p):
                for t in range(d):
                    acc = books[0, q[i, j * m], a * d + t]
                    for k in range(1, m):
                        acc = np.float32(acc + books[k, q[i, j * m + k], a * d + t])
                    out[i * p + a, j * d + t] = acc
    return out


def v_vq2_columns() -> Valid:
    d = draft("vq_v2_column_vectors", (16, 6))
    books = fp16(d.rng, (1, 256, 8), 0.1)
    q = codes(d.rng, (2, 6), 8)  # 16 rows / p = 8, 6 columns / d = 1, one codebook
    b = d.b
    return d.valid("vq version 2, VPTQ-like: vector_shape [8, 1] (8 output rows of one column), one 256 x 8 fp16 "
                   "codebook, 8-bit codes [2, 6] including 0 and 255",
                   b.vq(b.packed("codes", q, 8), b.tensor("codebooks", books), vector_shape=(8, 1)),
                   vq2_ref(q, books, (8, 1)))


def v_vq2_tiles() -> Valid:
    d = draft("vq_v2_tile_vectors", (6, 12))
    books = fp16(d.rng, (2, 16, 8), 0.25)
    q = codes(d.rng, (3, 3 * 2), 4)  # 2 x 4 tiles: 6 rows / 2, 12 columns / 4 vectors x 2 codebooks
    q[1, 2:4] = (15, 0)
    b = d.b
    return d.valid("vq version 2: vector_shape [2, 4] (AQLM out_group_size 2), 2 additive codebooks of 16 entries of "
                   "2 x 4 values (row-major), 4-bit codes [3, 6] including 0 and 15, summed in codebook order",
                   b.vq(b.packed("codes", q, 4), b.tensor("codebooks", books), vector_shape=(2, 4)),
                   vq2_ref(q, books, (2, 4)))


def v_vq2_vptq_residual() -> Valid:
    d = draft("vq_v2_vptq_residual_norm", (16, 10))
    main = fp16(d.rng, (1, 32, 4), 0.5)
    res = fp16(d.rng, (1, 4, 4), 0.05)
    qm, qr = codes(d.rng, (4, 10), 5), codes(d.rng, (4, 10), 2)
    s = fp16(d.rng, (1, 10), 1.0, positive=True)
    b = d.b
    terms = [b.vq(b.packed("main.codes", qm, 5), b.tensor("main.codebooks", main), vector_shape=(4, 1)),
             b.vq(b.packed("res.codes", qr, 2), b.tensor("res.codebooks", res), vector_shape=(4, 1))]
    return d.valid("VPTQ v4: main (32 entries) plus residual (4 entries) vq version 2 nodes [4, 1] under sum, "
                   "times a per-input-column norm (scale group [16, 1], factor [1, 10])",
                   b.scale(b.sum(terms), b.tensor("in_scale", s), group_shape=(16, 1)),
                   (vq2_ref(qm, main, (4, 1)) + vq2_ref(qr, res, (4, 1))) * tiles(s, (16, 1), (16, 10)))


def sparse_dense(rng: np.random.Generator, shape: tuple[int, int], density: float) -> np.ndarray:
    mask = rng.random(shape) < density
    mask[1] = False  # an empty row
    return np.where(mask, fp16(rng, shape, 2.0), 0).astype(np.float16)


def v_sparse_only() -> Valid:
    d = draft("sparse_csr_only", (6, 30))
    dense = sparse_dense(d.rng, (6, 30), 0.1)
    return d.valid("only outliers: CSR with I32 row_ptr, U16 col_idx, fp16 values, one empty row",
                   d.b.sparse_from_dense("outliers", dense), f32(dense))


def v_sparse_wide_indices() -> Valid:
    d = draft("sparse_csr_i64_i32", (5, 12))
    dense = sparse_dense(d.rng, (5, 12), 0.25)
    ptr, cols, vals = csr(dense)
    b = d.b
    node = {"codec": "sparse_csr", "version": 1, "row_ptr": b.store("outliers.row_ptr", ptr.astype(np.int64)),
            "col_idx": b.store("outliers.col_idx", cols.astype(np.int32)),
            "values": b.tensor("outliers.values", vals.astype(np.float32)), "shape": [5, 12]}
    return d.valid("CSR with I64 row_ptr, I32 col_idx and fp32 values", node, f32(dense))


def v_sparse_empty() -> Valid:
    d = draft("sparse_csr_empty", (4, 16))
    q = codes(d.rng, (4, 16), 2)
    base, expected = affine(d.b, q, 2, (1, 16), 0.25, 1.5)
    outliers = d.b.sparse_csr("outliers", np.zeros(5, np.int32), np.zeros(0, np.uint16), np.zeros(0, np.float16))
    return d.valid("2-bit base plus a CSR term with no outliers (zero-length tensors)", d.b.sum([base, outliers]),
                   expected + np.float32(0))


def v_lowrank_only() -> Valid:
    d = draft("lowrank_only", (12, 20))
    a, bb = dyadic(d.rng, (12, 4)), dyadic(d.rng, (4, 20))
    w, bound = product(a, bb)
    return d.valid("a rank-4 product a @ b of fp16 factors", d.b.lowrank(d.b.tensor("a", a), d.b.tensor("b", bb)), w,
                   product_bounds={d.b.name: bound})


def v_lowrank_sidecar() -> Valid:
    d = draft("lowrank_sidecar", (16, 128))
    q = codes(d.rng, (16, 128), 4)
    s, z = fp16(d.rng, (16, 2), 0.01, positive=True), fp16(d.rng, (16, 2), 8.0)
    a, bb = dyadic(d.rng, (16, 8)), dyadic(d.rng, (8, 128))
    b = d.b
    base, stored = affine(b, q, 4, (1, 64), s, z)
    low, bound = product(a, bb)
    return d.valid("LQ-LoRA / SVDQuant: 4-bit g64 base plus a rank-8 fp16 low-rank sidecar",
                   b.sum([base, b.lowrank(b.tensor("lora_a", a), b.tensor("lora_b", bb))]), stored + low,
                   product_bounds={b.name: bound})


def sign_block(b: RecordBuilder, rng: np.random.Generator, i: int, shape: tuple[int, int], rank: int,
               planes: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
    sign = rng.integers(0, 2, size=shape)
    u, v = dyadic(rng, (shape[0], rank)), dyadic(rng, (rank, shape[1]))
    sign_node = b.bitplanes(f"blocks.{i}.sign", sign, 1) if planes else b.packed(f"blocks.{i}.sign", sign, 1)
    node = b.sign_lowrank(sign_node, b.tensor(f"blocks.{i}.u", u), b.tensor(f"blocks.{i}.v", v))
    magnitude, bound = product(u, v)
    return node, np.where(sign == 1, magnitude, -magnitude).astype(np.float32), bound


def v_sign_lowrank() -> Valid:
    d = draft("sign_lowrank_single", (9, 19))
    node, expected, bound = sign_block(d.b, d.rng, 0, (9, 19), 1)
    return d.valid("one BitStack block: 1-bit packed signs times a rank-1 |u v| (9x19)", node, expected,
                   product_bounds={d.b.name: bound})


def v_bitstack() -> Valid:
    d = draft("bitstack_three_blocks", (16, 24))
    nodes, parts, bounds = zip(*(sign_block(d.b, d.rng, i, (16, 24), 2, planes=(i == 1)) for i in range(3)),
                               strict=True)
    v = d.valid("BitStack: a sum of three sign x rank-2 blocks (block 1's signs stored as a bit-plane)",
                d.b.sum(list(nodes)), parts[0] + parts[1] + parts[2], product_bounds={d.b.name: sum(bounds)})
    v.extra.append(("bitstack_keep_terms_2", "same file decoded with keep_terms=2 (spec/partial.md): blocks 0 and 1",
                    {"keep_terms": 2}, {d.b.name: parts[0] + parts[1]}))
    return v


def v_bcq() -> Valid:
    """BCQ (composition.md): three 1-bit affine planes, zero 0.5, scale 2 alpha per group of 16; the first carries
    an offset (the uniform form)."""
    rows, cols, g = 6, 40, 16
    d = draft("bcq_three_planes", (rows, cols), "F16", "model.layers.0.mlp.up_proj.weight")
    b = d.b
    groups = -(-cols // g)
    offset = fp16(d.rng, (rows, groups), 0.01)
    terms, values = [], []
    for i in range(3):
        bits = codes(d.rng, (rows, cols), 1)
        scale = fp16(d.rng, (rows, groups), 0.1 / 2 ** i, positive=True)
        node = b.affine(b.packed(f"plane{i}", bits, 1), scale=b.tensor(f"alpha{i}", scale), zero=0.5, bits=1,
                        group_shape=(1, g), offset=b.tensor("offset", offset) if i == 0 else None)
        value = (f32(bits) - np.float32(0.5)) * np.repeat(f32(scale), g, axis=1)[:, :cols]
        if i == 0:
            value = value + np.repeat(f32(offset), g, axis=1)[:, :cols]
        terms.append(node)
        values.append(value)
    v = d.valid("BCQ: three sign planes (1-bit affine, zero 0.5, scale 2 alpha per 16 columns, a short last group), "
                "the first with an F16 offset", b.sum(terms), (values[0] + values[1]) + values[2])
    v.extra.append(("bcq_keep_terms_1", "same file decoded with keep_terms=1 (spec/partial.md): the first plane "
                    "and the offset", {"keep_terms": 1}, {b.name: values[0]}))
    return v


def ternary_dict_encode(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy longest-match encoding (spec/components.md, ternary_dict), written independently of the plugin's
    encoder: per row, the longest dictionary entry that prefixes the remaining pairs, repeatedly."""
    seqs, lengths = ternary_dict.dictionary()
    index = {tuple(int(v) for v in seqs[i, :lengths[i]]): i for i in range(len(lengths))}
    words, ptr = [], [0]
    for row in symbols:
        padded = [int(v) for v in row] + ([0] if len(row) % 2 else [])
        pairs = [padded[2 * j] + 3 * padded[2 * j + 1] for j in range(len(padded) // 2)]
        i = 0
        while i < len(pairs):
            for n in range(min(14, len(pairs) - i), 0, -1):
                if tuple(pairs[i:i + n]) in index:
                    words.append(index[tuple(pairs[i:i + n])])
                    i += n
                    break
        ptr.append(len(words))
    return np.array(words, dtype=np.uint16), np.array(ptr, dtype=np.int32)


def ternary_dict_node(b: RecordBuilder, words: np.ndarray, ptr: np.ndarray, shape: tuple[int, int]) -> dict:
    return b.node("ternary_dict", 1, tensor=b.store("codewords", words), row_ptr=b.store("row_ptr", ptr),
                  shape=list(shape), dictionary="qmoe")


def v_ternary_dict() -> Valid:
    rows, cols = 4, 37  # odd: each row's last pair has a pad weight
    d = draft("ternary_dict_qmoe", (rows, cols), "BF16", "experts.3.wi.weight")
    symbols = d.rng.choice(3, size=(rows, cols), p=[0.885, 0.0575, 0.0575])
    symbols[0, :] = 0  # a row of zeros: long zero runs
    symbols[3, ::2] = 2  # a dense row: short entries
    words, ptr = ternary_dict_encode(symbols)
    table = np.zeros((rows, 1, 3), dtype=np.float32)
    table[:, 0, 1], table[:, 0, 2] = -fp16(d.rng, (rows,), 0.05, positive=True), fp16(d.rng, (rows,), 0.05, True)
    b = d.b
    node = b.lut(ternary_dict_node(b, words, ptr, (rows, cols)), b.tensor("levels", table), (1, cols))
    return d.valid("QMoE's dictionary-coded ternary stream (37 columns, greedy codewords, one zero row, one dense row) "
                   "into a per-row table (0, low, high)", node, np.take_along_axis(table[:, 0, :], symbols, axis=1),
                   info={"method": "qmoe", "stream": True})


def v_ternary_dict_not_greedy() -> Valid:
    d = draft("ternary_dict_single_pairs", (2, 6))
    symbols = np.zeros((2, 6), dtype=np.int64)
    symbols[1, 2] = 1
    seqs, lengths = ternary_dict.dictionary()
    single = {int(seqs[i, 0]): i for i in range(len(lengths)) if lengths[i] == 1}
    words = np.array([single[int(a) + 3 * int(c)] for row in symbols for a, c in zip(row[0::2], row[1::2], strict=True)],
                     dtype=np.uint16)  # one codeword per pair: valid, just not what a greedy writer gives
    ptr = np.array([0, 3, 6], dtype=np.int64)
    table = np.array([0.0, -0.5, 0.25], dtype=np.float32)
    b = d.b
    return d.valid("ternary_dict with one codeword per pair (not greedy: readers take any valid codewords), I64 "
                   "row_ptr, a global 3-entry table", b.lut(ternary_dict_node(b, words, ptr, (2, 6)),
                                                             b.tensor("table", table)), table[symbols])


def v_permute() -> Valid:
    d = draft("permute_only", (4, 11))
    stored = fp16(d.rng, (4, 11))
    perm = d.rng.permutation(11)
    return d.valid("an input-channel permutation of a stored fp16 matrix: w[:, perm[j]] = stored[:, j]",
                   d.b.permute(d.b.tensor("stored", stored), perm), permuted(stored, perm))


def v_gptq_act_order() -> Valid:
    d = draft("gptq_act_order", (8, 96), "F16", "model.layers.0.self_attn.q_proj.weight")
    q = codes(d.rng, (8, 96), 4)
    s, z = fp16(d.rng, (8, 3), 0.02, positive=True), codes(d.rng, (8, 3), 4)
    perm = d.rng.permutation(96)
    inner, stored = affine(d.b, q, 4, (1, 32), s, z, roles=("qweight", "scales", "qzeros"), zero_bits=4)
    return d.valid("GPTQ with act-order: 4-bit g32 in permuted column order, packed zeros, then permute",
                   d.b.permute(inner, perm, role="g_idx_perm"), permuted(stored, perm),
                   info={"method": "gptq", "act_order": True})


def quantized_stats(b: RecordBuilder, rng: np.random.Generator, role: str, values: np.ndarray, bits: int,
                    group: tuple[int, int]) -> tuple[dict, np.ndarray]:
    """A statistic [R, G] stored as `bits`-bit codes with fp16 second-level scale/zero per `group` tile."""
    grid = (-(-values.shape[0] // group[0]), -(-values.shape[1] // group[1]))
    q = codes(rng, values.shape, bits)
    s2 = fp16(rng, grid, float(np.abs(values).mean()) / 4, positive=True)
    z2 = fp16(rng, grid, 1.0)
    return affine(b, q, bits, group, s2, z2, roles=(f"{role}.codes", f"{role}.scale", f"{role}.zero"))


def v_spqr() -> Valid:
    rows, cols, g = 32, 64, 16
    d = draft("spqr_like", (rows, cols), "F16", "model.layers.3.mlp.down_proj.weight")
    q = codes(d.rng, (rows, cols), 3)
    b = d.b
    scale_node, scale = quantized_stats(b, d.rng, "scale", np.full((rows, cols // g), 0.05), 3, (16, 1))
    zero_node, zero = quantized_stats(b, d.rng, "zero", np.full((rows, cols // g), 3.0), 3, (16, 1))
    base = b.affine(b.packed("codes", q, 3), scale=scale_node, zero=zero_node, bits=3, group_shape=(1, g))
    dense = sparse_dense(d.rng, (rows, cols), 0.01)
    perm = d.rng.permutation(cols)
    return d.valid("SpQR-like: 3-bit weights in groups of 16, their scale and zero themselves 3-bit quantized "
                   "(fp16 second-level stats per 16 rows), fp16 CSR outliers, input permutation",
                   b.permute(b.sum([base, b.sparse_from_dense("outliers", dense)]), perm),
                   permuted(affine_ref(q, scale, zero, (1, g)) + f32(dense), perm),
                   info={"method": "spqr", "groupsize": g})


def v_nf4_double_quant() -> Valid:
    d = draft("nf4_double_quant", (8, 512), "BF16", "model.layers.1.mlp.gate_proj.weight")
    q = codes(d.rng, (8, 512), 4)
    absmax_codes = codes(d.rng, (8, 512 // 64), 8)
    s2 = (np.abs(d.rng.standard_normal((8, 2))) * 1e-4 + 1e-5).astype(np.float32)
    z2 = (127.0 - d.rng.random((8, 2)) * 10).astype(np.float32)  # the mean offset, folded into the zero
    b = d.b
    absmax, factor = affine(b, absmax_codes, 8, (1, 4), s2, z2,
                            roles=("absmax.codes", "absmax.scale", "absmax.offset"))
    return d.valid("QLoRA NF4 with double quantization: absmax per 64 weights stored as 8-bit codes with fp32 "
                   "scale and offset per 4 blocks", *scaled_lut(b, q, 4, NF4, (absmax, factor), (1, 64)))


def v_residual() -> Valid:
    d = draft("residual_two_stage", (6, 48))
    q1, q2 = codes(d.rng, (6, 48), 2), codes(d.rng, (6, 48), 2)
    s1, s2 = fp16(d.rng, (6, 2), 0.1, positive=True), fp16(d.rng, (6, 2), 0.02, positive=True)
    t1, w1 = affine(d.b, q1, 2, (1, 32), s1, 1.5, roles=("stage0.codes", "stage0.scale", "stage0.zero"))
    t2, w2 = affine(d.b, q2, 2, (1, 32), s2, 1.5, roles=("stage1.codes", "stage1.scale", "stage1.zero"))
    dense = sparse_dense(d.rng, (6, 48), 0.05)
    v = d.valid("two 2-bit residual stages plus outliers, summed left to right in fp32",
                d.b.sum([t1, t2, d.b.sparse_from_dense("outliers", dense)]), w1 + w2 + f32(dense))
    v.extra.append(("residual_keep_terms_1", "same file decoded with keep_terms=1 (spec/partial.md): stage 0 only",
                    {"keep_terms": 1}, {d.b.name: w1}))
    v.extra.append(("residual_keep_terms_9", "keep_terms larger than the stack: every term", {"keep_terms": 9},
                    {d.b.name: w1 + w2 + f32(dense)}))
    return v


def v_conv() -> Valid:
    d = draft("conv_4d_shape", (8, 4, 3, 3), name="encoder.conv.weight")
    q = codes(d.rng, (8, 36), 4)
    s = fp16(d.rng, (8, 1), 0.05, positive=True)
    node, expected = affine(d.b, q, 4, (1, 36), s, 8)
    return d.valid("a 4-D conv weight [8, 4, 3, 3] decoded as the matrix [8, 36], reshaped back", node,
                   expected.reshape(8, 4, 3, 3))


def v_one_by_one() -> Valid:
    d = draft("one_by_one", (1, 1), name="head.weight")
    node, _ = affine(d.b, np.array([[5]]), 3, (1, 1), 0.5, 2)
    return d.valid("the smallest record: 1x1, one 3-bit code in one byte", node, np.array([[1.5]], F32))


def v_multi_record() -> Valid:
    vid = "multi_record_with_plain"
    rng = rng_for(vid)
    records, expected = [], {}
    for i, bits in enumerate((2, 4)):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        q = codes(rng, (6, 32), bits)
        s = fp16(rng, (6, 1), 0.05, positive=True)
        b = RecordBuilder(name, q.shape, "BF16")
        node, expected[name] = affine(b, q, bits, (1, 32), s, (1 << bits) / 2)
        records.append(b.finish(node))
    plain = {"model.embed_tokens.weight": fp16(rng, (10, 32), 0.1),
             "model.norm.weight": np.ones(32, np.float32) + np.float32(0.5),
             "model.layers.0.mlp.up_proj.bias": rng.standard_normal(6).astype(BF16)}
    return Valid(vid, "two records (2- and 4-bit) plus plain F16, F32 and BF16 tensors in one file", records, expected,
                 plain=plain)


def v_depth_limit() -> Valid:
    d = draft("depth_16_limit", (3, 4))
    x = fp16(d.rng, (3, 4))
    factors = [np.array([[f]], np.float16) for f in d.rng.choice([0.5, 2.0, -1.0, 1.0], size=15)]
    node = d.b.tensor("x", x)
    expected = f32(x)
    for i, f in enumerate(factors):
        node = d.b.scale(node, d.b.tensor(f"f{i}", f), group_shape=(3, 4))
        expected = expected * f32(f)
    return d.valid("15 nested scale nodes over a tensor: exactly the maximum tree depth of 16", node, expected)


def v_group_larger_than_output() -> Valid:
    vid = "group_larger_than_output"
    rng = rng_for(vid)
    records, expected = [], {}
    for name, group, grid in (("rows.weight", (1 << 20, 16), (1, 3)), ("cols.weight", (1, 64), (4, 1))):
        q = codes(rng, (4, 40), 4)
        s, z = fp16(rng, grid, 0.02, positive=True), fp16(rng, grid, 8.0)
        b = RecordBuilder(name, (4, 40))
        node, expected[name] = affine(b, q, 4, group, s, z)
        records.append(b.finish(node))
    return Valid(vid, "groups larger than the output: [2^20, 16] over 4 x 40 (one tile of rows, grid [1, 3]) and "
                 "[1, 64] over 40 columns (grid [4, 1]); each decodes as if the group were clipped to the output, "
                 "and a reader must not allocate in proportion to the group", records, expected)


def v_reshape_hqq_axis0() -> Valid:
    d = draft("reshape_hqq_axis0", (12, 20), "F16", "model.layers.0.self_attn.q_proj.weight")
    q = codes(d.rng, (8, 30), 4)  # HQQ's M = W.reshape(8, 30): one scale and zero per column of M
    s, z = fp16(d.rng, (1, 30), 0.05, positive=True), fp16(d.rng, (1, 30), 8.0)
    node, m = affine(d.b, q, 4, (8, 1), s, z)
    return d.valid("HQQ axis-0 groups of 8 on a 12x20 weight: affine over M [8, 30] with group_shape [8, 1], "
                   "reshaped row-major to [12, 20] (each group takes every 30th weight)", d.b.reshape(node),
                   m.reshape(12, 20))


def v_reshape_blocks_across_rows() -> Valid:
    d = draft("reshape_blocks_across_rows", (6, 24), "BF16")
    q = codes(d.rng, (9, 16), 4)  # bitsandbytes blocks of 16 over the flattened 6x24 weight: one per row of [9, 16]
    absmax = (np.abs(d.rng.standard_normal((9, 1))) * 0.05 + 0.01).astype(np.float32)
    node, blocks = scaled_lut(d.b, q, 4, NF4, ("absmax", absmax), (1, 16))
    return d.valid("NF4 absmax blocks of 16 that end mid-row (rows of 24): the scale(lut) tree over [9, 16], one "
                   "block per row, reshaped to [6, 24]", d.b.reshape(node), blocks.reshape(6, 24))


def v_reshape_int_input() -> Valid:
    d = draft("reshape_int_input", (3, 4))
    x = d.rng.integers(-100, 100, size=(2, 6)).astype(np.int16)
    return d.valid("a reshape of an I16 tensor [2, 6] to [3, 4]: integers convert to fp32", d.b.reshape(
        d.b.tensor("x", x)), f32(x).reshape(3, 4))


def v_concat_two_affine() -> Valid:
    d = draft("concat_two_affine", (6, 32), "F16")
    q2, q4 = codes(d.rng, (6, 20), 2), codes(d.rng, (6, 12), 4)
    s2, z2 = fp16(d.rng, (6, 2), 0.1, positive=True), codes(d.rng, (6, 2), 2)
    s4, z4 = fp16(d.rng, (6, 3), 0.02, positive=True), codes(d.rng, (6, 3), 4)
    a2, w2 = affine(d.b, q2, 2, (1, 10), s2, z2, roles=("b2.codes", "b2.scale", "b2.zero"), zero_bits=2)
    a4, w4 = affine(d.b, q4, 4, (1, 4), s4, z4, roles=("b4.codes", "b4.scale", "b4.zero"), zero_bits=4)
    return d.valid("concat of two affine parts side by side: 2-bit codes in groups of 10 over 20 columns, then 4-bit "
                   "codes in groups of 4 over 12 columns (each part's grid tiles the part)",
                   d.b.concat([a2, a4]), np.concatenate([w2, w4], axis=1))


def v_concat_slim() -> Valid:
    d = draft("concat_slim_permuted", (5, 48), "BF16", "model.layers.0.mlp.down_proj.weight")
    group_bits = [3, 2, 3, 4, 3, 3]  # groups of 8 columns, average 3 bits
    parts, values, order = [], [], []
    for k in (2, 3, 4):
        cols = [c for g, bits in enumerate(group_bits) if bits == k for c in range(8 * g, 8 * g + 8)]
        n = len(cols) // 8
        q, s, z = codes(d.rng, (5, len(cols)), k), fp16(d.rng, (5, n), 0.05, positive=True), codes(d.rng, (5, n), k)
        node, value = affine(d.b, q, k, (1, 8), s, z, roles=(f"b{k}.codes", f"b{k}.scale", f"b{k}.zero"), zero_bits=k)
        parts.append(node)
        values.append(value)
        order += cols
    perm = np.array(order)
    stored = np.concatenate(values, axis=1)
    return d.valid("SliM-LLM mixed bits per group: groups of 8 at widths [3, 2, 3, 4, 3, 3]; one affine per width "
                   "over its groups' columns (ascending), concatenated in ascending width under a permute that puts "
                   "every column back", d.b.permute(d.b.concat(parts), perm), permuted(stored, perm),
                   info={"method": "slim", "slim": {"group_bits": group_bits}})


def v_concat_single_part() -> Valid:
    d = draft("concat_single_part", (3, 7))
    x = fp16(d.rng, (3, 7))
    return d.valid("a concat of one part (an F16 tensor): the part itself, converted to fp32",
                   d.b.node("concat", 1, parts=[d.b.tensor("x", x)], axis=1), f32(x))


def valid_vectors() -> list[Valid]:
    vectors = [v_tensor(F32, "f32"), v_tensor(F16, "f16"), v_tensor(BF16, "bf16")]
    vectors += [v_packed(bits) for bits in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)]
    vectors += [v_bitplanes(), v_bitplanes_lut(), v_ternary(), v_ternary_tensor_scale(), v_affine_asym(),
                v_affine_packed_zero(), v_affine_per_channel(), v_affine_tiles(), v_affine_constants(),
                v_affine_w16(), v_lut_nf4(), v_lut_per_tile(), v_lut_tile_table_1x1(), v_lut_fp8(),
                v_scale_input_channel(), v_vq_single(),
                v_vq_aqlm(), v_vq_tensor_codes(), v_sparse_only(), v_sparse_wide_indices(), v_sparse_empty(),
                v_lowrank_only(), v_lowrank_sidecar(), v_sign_lowrank(), v_bitstack(), v_bcq(), v_ternary_dict(),
                v_ternary_dict_not_greedy(), v_permute(),
                v_gptq_act_order(), v_spqr(), v_nf4_double_quant(), v_residual(), v_conv(), v_one_by_one(),
                v_multi_record(), v_depth_limit()]
    vectors += [v_group_larger_than_output()]
    vectors += [v_affine_offset_constant(), v_affine_offset_q4_1(), v_affine_offset_nested()]
    vectors += [v_reshape_hqq_axis0(), v_reshape_blocks_across_rows(), v_reshape_int_input()]
    vectors += [v_vq2_columns(), v_vq2_tiles(), v_vq2_vptq_residual()]
    vectors += [v_concat_two_affine(), v_concat_slim(), v_concat_single_part()]
    return vectors


# ---------------------------------------------------------------------------------------------------------------
# raw safetensors writer for invalid vectors (no validation at all)

DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(BF16): "BF16",
               np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
               np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
               np.dtype(np.float64): "F64", np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64",
               np.dtype(np.bool_): "BOOL"}


def raw_header(entries: list[tuple[str, Any]]) -> bytes:
    """JSON object text from (key, value) pairs, keeping order and repeats; padded to a multiple of 8 bytes."""
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in entries) + "}"
    data = text.encode()
    return data + b" " * (-len(data) % 8)


def raw_file(header: bytes, data: bytes, header_len: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if header_len is None else header_len) + header + data


@dataclass
class Parts:
    """The pieces of a safetensors file before serialization, for invalid vectors to edit."""

    entries: list[tuple[str, Any]]  # ("__metadata__", {...}) first, then (name, {"dtype", "shape", "data_offsets"})
    data: bytes

    def to_bytes(self) -> bytes:
        return raw_file(raw_header(self.entries), self.data)

    def entry(self, name: str) -> dict:
        return next(v for k, v in self.entries if k == name)


def parts_of(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> Parts:
    entries: list[tuple[str, Any]] = []
    if metadata is not None:
        entries.append(("__metadata__", metadata))
    data = bytearray()
    for name in sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n)):
        array = np.ascontiguousarray(tensors[name])
        entries.append((name, {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                               "data_offsets": [len(data), len(data) + array.nbytes]}))
        data += array.tobytes()
    return Parts(entries, bytes(data))


def qformat_meta(records: dict[str, Any], version: Any = 1) -> dict[str, str]:
    return {"format": "pt", "qformat": json.dumps({"format_version": version, "records": records}, sort_keys=True,
                                                  separators=(",", ":"))}


def file_of(qts: list[QuantizedTensor], plain: dict[str, np.ndarray] | None = None,
            edit: Callable[[dict[str, Any], dict[str, np.ndarray]], None] | None = None) -> Parts:
    """Parts for records (deep-copied so `edit(records, tensors)` may change anything) plus plain tensors."""
    records = {qt.name: copy.deepcopy(qt.record) for qt in qts}
    tensors = {k: np.array(v) for qt in qts for k, v in qt.tensors.items()}
    tensors.update(plain or {})
    if edit is not None:
        edit(records, tensors)
    return parts_of(tensors, qformat_meta(records))


# ---------------------------------------------------------------------------------------------------------------
# invalid vectors

BASE = "model.layers.0.mlp.up_proj.weight"


def base_record(name: str = BASE, bits: int = 4, cols: int = 40) -> QuantizedTensor:
    """A small valid 4-bit affine record (4 x 40, groups of 16) that invalid vectors corrupt."""
    rng = rng_for("invalid-base:" + name)
    q = codes(rng, (4, cols), bits)
    groups = -(-cols // 16)
    s, z = fp16(rng, (4, groups), 0.02, True), fp16(rng, (4, groups), 8.0)
    b = RecordBuilder(name, (4, cols), "F16")
    return b.finish(affine(b, q, bits, (1, 16), s, z)[0])


def sparse_record(name: str = BASE) -> QuantizedTensor:
    rng = rng_for("invalid-sparse")
    q = codes(rng, (4, 24), 2)
    dense = np.zeros((4, 24), np.float16)
    dense[0, 3], dense[0, 9], dense[2, 20], dense[3, 0] = 1.5, -2.0, 3.0, 0.5
    b = RecordBuilder(name, (4, 24))
    base, _ = affine(b, q, 2, (1, 24), 0.5, 1.5)
    return b.finish(b.sum([base, b.sparse_from_dense("outliers", dense)]))


def small_plain() -> dict[str, np.ndarray]:
    return {"a": np.arange(4, dtype=np.float32), "b": np.arange(3, dtype=np.int16)}


def plain_parts() -> Parts:
    return parts_of(small_plain(), {"format": "pt"})


def edited(edit: Callable[[dict[str, Any], dict[str, np.ndarray]], None], qt: QuantizedTensor | None = None) -> bytes:
    return file_of([qt or base_record()], edit=edit).to_bytes()


def node_at(record: dict, *path: str | int) -> dict:
    node = record["weight"]
    for key in path:
        node = node[key]
    return node


def bitflip(tensors: dict[str, np.ndarray], name: str, index: tuple[int, ...], value: int) -> None:
    array = tensors[name].copy()
    array[index] = value
    tensors[name] = array


def invalid_file_level() -> list[Invalid]:
    good = file_of([base_record()]).to_bytes()
    out = [
        Invalid("truncated_data", "a valid file missing its last 5 bytes", good[:-5], "truncated", "open"),
        Invalid("truncated_prefix", "a 5-byte file: shorter than the 8-byte header length", good[:5], "truncated",
                "open"),
        Invalid("header_length_beyond_file", "the header length points past the end of the file",
                struct.pack("<Q", len(good)) + good[8:], "bad_header", "open"),
        Invalid("header_length_huge", "header length 2**63: must be refused before any allocation",
                struct.pack("<Q", 1 << 63) + good[8:], "bad_header", "open"),
        Invalid("header_not_json", "the header is not JSON", raw_file(b"{not json at all}      ", b""),
                "bad_header", "open"),
        Invalid("header_not_utf8", "the header is not UTF-8", raw_file(b"{\"\xff\xfe\":1}  ", b""), "bad_header",
                "open"),
        Invalid("header_json_array", "the header is a JSON array, not an object", raw_file(b"[]      ", b""),
                "bad_header", "open"),
        Invalid("header_deep_nesting", "the header nests 20000 JSON arrays: parsers must refuse, not crash",
                raw_file(b"[" * 20000 + b"]" * 20000, b""), "bad_header", "open"),
    ]
    parts = plain_parts()
    dup = Parts(parts.entries + [("a", parts.entry("a"))], parts.data)
    out.append(Invalid("duplicate_tensor_key", "the header names tensor 'a' twice (JSON parsers would merge them)",
                       dup.to_bytes(), "duplicate_name", "open", tensor="a"))

    def with_entry(name: str, **changes: Any) -> bytes:
        p = plain_parts()
        entries = [(k, {**v, **changes} if k == name else v) for k, v in p.entries]
        return Parts(entries, p.data).to_bytes()

    out += [
        Invalid("unknown_dtype", "a tensor of dtype 'Q4_K' (not a safetensors dtype this format allows)",
                with_entry("b", dtype="Q4_K"), "bad_dtype", "open", tensor="b", field="dtype"),
        Invalid("dtype_not_string", "a tensor whose dtype is a JSON list", with_entry("b", dtype=["I16"]),
                "bad_dtype", "open", tensor="b", field="dtype"),
        Invalid("entry_size_mismatch", "F32 [4] needs 16 bytes but data_offsets cover 12",
                with_entry("a", shape=[3, 1], dtype="F32"), "shape_mismatch", "open", tensor="a",
                field="data_offsets"),
        Invalid("negative_shape", "a shape with a negative dimension", with_entry("b", shape=[-3]), "bad_header",
                "open", tensor="b", field="shape"),
        Invalid("rank_9_tensor", "a tensor of rank 9 (at most 8)", with_entry("b", shape=[1] * 8 + [3]),
                "bad_header", "open", tensor="b", field="shape"),
        Invalid("entry_extra_key", "a tensor entry with a key besides dtype, shape and data_offsets",
                with_entry("b", crc=0), "bad_header", "open", tensor="b", field="entry"),
    ]
    p = plain_parts()
    a, b = p.entry("a"), p.entry("b")
    overlap = [(k, {**v, "data_offsets": [10, 16]} if k == "b" else v) for k, v in p.entries]
    out.append(Invalid("offsets_overlap", "tensor b's bytes overlap tensor a's", Parts(overlap, p.data[:16]).to_bytes(),
                       "bad_offsets", "open", tensor="b", field="data_offsets"))
    hole = [(k, {**v, "data_offsets": [b["data_offsets"][0] + 2, b["data_offsets"][1] + 2]} if k == "b" else v)
            for k, v in p.entries]
    out.append(Invalid("offsets_hole", "two unused bytes between tensors a and b",
                       Parts(hole, p.data[:16] + b"\0\0" + p.data[16:]).to_bytes(), "bad_offsets", "open",
                       tensor="b", field="data_offsets"))
    out.append(Invalid("trailing_bytes", "8 bytes after the last tensor",
                       Parts(p.entries, p.data + bytes(8)).to_bytes(), "bad_offsets", "open"))
    assert a["data_offsets"] == [0, 16]
    meta_obj = [(k, {"format": "pt", "qformat": {"format_version": 1}} if k == "__metadata__" else v)
                for k, v in p.entries]
    out.append(Invalid("metadata_not_strings", "__metadata__ maps 'qformat' to an object instead of a string",
                       Parts(meta_obj, p.data).to_bytes(), "bad_header", "open", field="__metadata__"))
    return out


def invalid_qformat_metadata() -> list[Invalid]:
    qt = base_record()
    tensors = {k: np.array(v) for k, v in qt.tensors.items()}

    def with_meta(text: str) -> bytes:
        return parts_of(tensors, {"format": "pt", "qformat": text}).to_bytes()

    record_text = json.dumps(qt.record, sort_keys=True, separators=(",", ":"))
    dup_records = '{"format_version":1,"records":{' + f'"{BASE}":{record_text},"{BASE}":{record_text}' + "}}"
    return [
        Invalid("qformat_metadata_not_json", "__metadata__['qformat'] is not JSON", with_meta("{records: }"),
                "bad_header", "open"),
        Invalid("unsupported_format_version", "format_version 2 (a future format)",
                with_meta(json.dumps({"format_version": 2, "records": {BASE: qt.record}})),
                "unsupported_format_version", "open", field="format_version"),
        Invalid("duplicate_record_key", "the records object names the same record twice", with_meta(dup_records),
                "duplicate_name", "open", tensor=BASE),
        Invalid("record_is_also_tensor", "a record has the same name as a stored tensor",
                file_of([qt], plain={BASE: np.zeros(2, np.float32)}).to_bytes(), "duplicate_name", "open",
                tensor=BASE),
    ]


def set_field(path: tuple[str | int, ...], key: str, value: Any) -> Callable[[dict, dict], None]:
    def edit(records: dict, tensors: dict) -> None:
        node_at(records[BASE], *path)[key] = value
    return edit


def invalid_records() -> list[Invalid]:
    out: list[Invalid] = []

    def add(vid: str, description: str, data: bytes, code: str, fld: str | None, stage: str = "open",
            tensor: str | None = BASE) -> None:
        out.append(Invalid(vid, description, data, code, stage, tensor=tensor, field=fld))

    add("unknown_codec", "a node names codec 'hqq_magic' that no reader knows",
        edited(set_field((), "codec", "hqq_magic")), "unknown_codec", "weight/codec")
    add("unsupported_codec_version", "an affine node of version 3 (versions 1 and 2 exist)",
        edited(set_field((), "version", 3)), "unsupported_codec_version", "weight/version")
    add("codec_version_not_integer", "a node whose version is the list [1]",
        edited(set_field(("codes",), "version", [1])), "unsupported_codec_version", "weight/codes/version")

    def drop_scale_tensor(records: dict, tensors: dict) -> None:
        del tensors[BASE + ".scale"]
    add("missing_tensor", "the scale tensor the record references is not in the file", edited(drop_scale_tensor),
        "missing_tensor", "weight/scale/tensor")

    def codes_as_i8(records: dict, tensors: dict) -> None:
        tensors[BASE + ".codes"] = tensors[BASE + ".codes"].view(np.int8)
    add("wrong_dtype_packed", "packed codes stored as I8 instead of U8", edited(codes_as_i8), "bad_dtype",
        "weight/codes/tensor")

    def codes_short_rows(records: dict, tensors: dict) -> None:
        tensors[BASE + ".codes"] = np.ascontiguousarray(tensors[BASE + ".codes"][:, :-1])
        records[BASE]["storage_bytes"] -= 4
    add("packed_shape_mismatch", "4x40 4-bit codes need U8 [4, 20]; the tensor is [4, 19]", edited(codes_short_rows),
        "shape_mismatch", "weight/codes/tensor")

    def scale_two_groups(records: dict, tensors: dict) -> None:
        tensors[BASE + ".scale"] = np.ascontiguousarray(tensors[BASE + ".scale"][:, :2])
        records[BASE]["storage_bytes"] -= 8
    add("scale_grid_mismatch", "groups of 16 over 40 columns need 3 scales per row; the file has 2",
        edited(scale_two_groups), "shape_mismatch", "weight/scale")

    def record_shape(records: dict, tensors: dict) -> None:
        records[BASE]["shape"] = [4, 41]
    add("record_shape_mismatch", "the record declares [4, 41] but its weight decodes to [4, 40]",
        edited(record_shape), "shape_mismatch", "weight")
    add("code_wider_than_declared", "affine declares bits=3 over 4-bit packed codes",
        edited(set_field((), "bits", 3)), "code_out_of_range", "weight/codes")

    def lie_bytes(records: dict, tensors: dict) -> None:
        records[BASE]["storage_bytes"] += 1
    add("bad_accounting", "storage_bytes is one more than the referenced tensors hold", edited(lie_bytes),
        "bad_accounting", "storage_bytes")
    add("unknown_field", "an affine node carries an unknown field 'rounding'",
        edited(set_field((), "rounding", "nearest")), "bad_field", "weight/rounding")

    def drop_scale(records: dict, tensors: dict) -> None:
        del node_at(records[BASE])["scale"]
        del tensors[BASE + ".scale"]
        records[BASE]["storage_bytes"] -= 24
    add("missing_field", "an affine node without its required 'scale'", edited(drop_scale), "bad_record",
        "weight/scale")

    def float_codes(records: dict, tensors: dict) -> None:
        node = node_at(records[BASE])
        node["codes"] = {"codec": "tensor", "version": 1, "tensor": BASE + ".codes"}
        tensors[BASE + ".codes"] = np.zeros((4, 40), np.float16)
        records[BASE]["storage_bytes"] += 240
    add("bad_kind_float_codes", "affine codes that are an F16 tensor instead of integer codes", edited(float_codes),
        "bad_kind", "weight/codes")

    def foreign_name(records: dict, tensors: dict) -> None:
        node_at(records[BASE], "scale")["tensor"] = "shared.scale"
        tensors["shared.scale"] = tensors.pop(BASE + ".scale")
    add("bad_tensor_name", "the record references 'shared.scale', not a '<record>.<part>' tensor",
        edited(foreign_name), "bad_tensor_name", "weight")

    def bad_dtype(records: dict, tensors: dict) -> None:
        records[BASE]["dtype"] = "I8"
    add("record_bad_dtype", "a record whose original dtype is I8 (only F32, F16, BF16)", edited(bad_dtype),
        "bad_field", "dtype")

    def huge_scale(records: dict, tensors: dict) -> None:
        node_at(records[BASE])["scale"] = 1e39
        del tensors[BASE + ".scale"]
        records[BASE]["storage_bytes"] -= 24
    add("non_finite_constant", "a constant scale of 1e39: finite JSON, but infinite once rounded to fp32",
        edited(huge_scale), "bad_field", "weight/scale")
    add("bits_not_integer", "bits written as 4.0 (integers have no fraction)", edited(set_field((), "bits", 4.0)),
        "bad_field", "weight/bits")
    add("bits_too_wide", "a packed node of 17 bits (1..16 allowed)", edited(set_field(("codes",), "bits", 17)),
        "bad_field", "weight/codes/bits")
    add("group_shape_zero", "group_shape [0, 16]", edited(set_field((), "group_shape", [0, 16])), "bad_field",
        "weight/group_shape")

    def no_terms(records: dict, tensors: dict) -> None:
        records[BASE]["weight"] = {"codec": "sum", "version": 1, "terms": []}
    add("sum_no_terms", "a sum node with an empty terms list", edited(no_terms), "bad_field", "weight/terms")

    def many_nodes(records: dict, tensors: dict) -> None:
        scale = {"codec": "tensor", "version": 1, "tensor": BASE + ".scale"}
        term = node_at(records[BASE])
        for _ in range(2):  # affine, packed, 2 tensors, then 2 x (scale + tensor): 8 nodes per term
            term = {"codec": "scale", "version": 1, "input": term, "factor": scale, "group_shape": [1, 16]}
        records[BASE]["weight"] = {"codec": "sum", "version": 1, "terms": [term] * 64}
    add("too_many_nodes", "a sum of 64 identical 8-node terms: 513 nodes, over the limit of 256", edited(many_nodes),
        "limit_exceeded", None)

    # two records sharing one tensor: "x" and "x.y" both reference "x.y.codes"
    qx = base_record("x")
    qy = base_record("x.y")

    def share(records: dict, tensors: dict) -> None:
        node_at(records["x"], "codes")["tensor"] = "x.y.codes"
        del tensors["x.codes"]
    add("shared_tensor", "records 'x' and 'x.y' both reference tensor 'x.y.codes'",
        file_of([qx, qy], edit=share).to_bytes(), "shared_tensor", None, tensor="x.y")

    # tree depth 17
    b = RecordBuilder(BASE, (2, 2))
    node = b.tensor("x", np.ones((2, 2), np.float16))
    for i in range(16):
        node = {"codec": "scale", "version": 1, "input": node, "factor": b.tensor(f"f{i}", np.ones((1, 1), F16)),
                "group_shape": [2, 2]}
    record = {"shape": [2, 2], "dtype": "F32", "storage_bytes": sum(a.nbytes for a in b.tensors.values()),
              "weight": node}
    deep = parts_of(dict(b.tensors), qformat_meta({BASE: record})).to_bytes()
    add("tree_too_deep", "16 nested scale nodes over a tensor: depth 17 exceeds the limit of 16", deep,
        "limit_exceeded", "/".join(["weight"] + ["input"] * 16))

    # a node whose output exceeds 2**34 elements: lowrank of U8 [131073, 1] @ [1, 131072]
    b = RecordBuilder(BASE, (131073, 131072))
    node = b.lowrank(b.tensor("a", np.ones((131073, 1), np.uint8)), b.tensor("b", np.ones((1, 131072), np.uint8)))
    record = {"shape": [131073, 131072], "dtype": "F32", "storage_bytes": 262145, "weight": node}
    add("output_too_large", "a low-rank node whose output has 131073 x 131072 > 2**34 elements",
        parts_of(dict(b.tensors), qformat_meta({BASE: record})).to_bytes(), "limit_exceeded", "weight")

    # codec-specific structure
    rng = rng_for("invalid-vq")
    b = RecordBuilder(BASE, (2, 32))
    vq = b.finish(b.vq(b.packed("codes", rng.integers(0, 16, (2, 8)), 4), b.tensor("codebooks", fp16(rng, (1, 16, 4)))))

    def vq_cols(records: dict, tensors: dict) -> None:
        node_at(records[BASE])["shape"] = [2, 30]
        records[BASE]["shape"] = [2, 30]
    add("vq_cols_not_multiple", "30 columns are not a multiple of the vector length 4",
        edited(vq_cols, vq), "shape_mismatch", "weight/codebooks")

    out += _invalid_vq2()

    out.append(_sign_not_one_bit())
    out.append(_lut_table_too_small())
    out += _invalid_offsets()
    out += _invalid_reshapes()
    out += _invalid_concats()
    return out


def _invalid_vq2() -> list[Invalid]:
    """vq version 2's vector_shape: not in version 1, required in version 2, two integers >= 1, dividing the shape,
    matching the codebooks; codes [R / p, (C / d) * M]; no version 3."""
    rng = rng_for("invalid-vq2")
    b = RecordBuilder(BASE, (8, 6))  # vector_shape [4, 1], codebooks [1, 16, 4], codes [2, 6]
    vq2 = b.finish(b.vq(b.packed("codes", codes(rng, (2, 6), 4), 4), b.tensor("codebooks", fp16(rng, (1, 16, 4))),
                        vector_shape=(4, 1)))
    b = RecordBuilder(BASE, (8, 6))
    u16 = b.finish(b.vq(b.tensor("codes", rng.integers(0, 16, (2, 6)).astype(np.uint16)),
                        b.tensor("codebooks", fp16(rng, (1, 16, 4))), vector_shape=(4, 1)))
    b = RecordBuilder(BASE, (2, 32))
    vq1 = b.finish(b.vq(b.packed("codes", codes(rng, (2, 8), 4), 4), b.tensor("codebooks", fp16(rng, (1, 16, 4)))))

    def rows(count: int) -> Callable[[dict, dict], None]:
        def edit(records: dict, tensors: dict) -> None:
            node_at(records[BASE])["shape"] = [count, 6]
            records[BASE]["shape"] = [count, 6]
        return edit

    def drop(records: dict, tensors: dict) -> None:
        del node_at(records[BASE])["vector_shape"]

    def codes_full_rows(records: dict, tensors: dict) -> None:  # [R, C] codes as if p were 1
        node_at(records[BASE], "codes")["shape"] = [8, 6]
        tensors[BASE + ".codes"] = bitpack.pack_codes(np.zeros((8, 6), np.int64), 4)
        records[BASE]["storage_bytes"] += 6 * 3

    def invalid(vid: str, description: str, edit: Callable[[dict, dict], None], code: str, fld: str,
                qt: QuantizedTensor = vq2) -> Invalid:
        return Invalid(vid, description, edited(edit, qt), code, "open", tensor=BASE, field=fld)

    return [
        invalid("vq_v2_rows_not_multiple", "vq version 2 with vector_shape [4, 1] over 10 rows (10 mod 4 != 0)",
                rows(10), "shape_mismatch", "weight/vector_shape"),
        invalid("vq_v1_vector_shape", "a vq version 1 node with a vector_shape (a field only version 2 has)",
                set_field((), "vector_shape", [1, 4]), "bad_field", "weight/vector_shape", vq1),
        invalid("vq_v2_missing_vector_shape", "a vq version 2 node without its required vector_shape", drop,
                "bad_record", "weight/vector_shape"),
        invalid("vq_v2_vector_shape_zero", "vq version 2 with vector_shape [0, 1]",
                set_field((), "vector_shape", [0, 1]), "bad_field", "weight/vector_shape"),
        invalid("vq_v2_vector_shape_rank", "vq version 2 with vector_shape [4] (one dimension)",
                set_field((), "vector_shape", [4]), "bad_field", "weight/vector_shape"),
        invalid("vq_v2_vector_shape_not_integer", "vq version 2 with vector_shape [4.0, 1] (integers are written "
                "without a fraction)", set_field((), "vector_shape", [4.0, 1]), "bad_field", "weight/vector_shape"),
        invalid("vq_v2_tile_codes_mismatch", "vq version 2 with vector_shape [2, 2]: codebooks [1, 16, 4] hold 4 = p*d "
                "values, but 8 rows / 2 x 6 columns / 2 needs codes [4, 3], not [2, 6]",
                set_field((), "vector_shape", [2, 2]), "shape_mismatch", "weight/codes"),
        invalid("vq_v2_entries_not_p_times_d", "vq version 2 with vector_shape [2, 1]: codebooks [1, 16, 4] hold 4 "
                "values per entry, not p*d = 2", set_field((), "vector_shape", [2, 1]), "shape_mismatch",
                "weight/codebooks"),
        invalid("vq_v2_codes_rows", "vq version 2 [4, 1] with codes [8, 6] (one row per output row instead of R / p)",
                codes_full_rows, "shape_mismatch", "weight/codes"),
        invalid("vq_unsupported_version_3", "a vq node of version 3 (versions 1 and 2 exist)",
                set_field((), "version", 3), "unsupported_codec_version", "weight/version"),
        Invalid("vq_v2_code_out_of_range", "vq version 2 [4, 1]: a U16 code 16 into codebooks of 16 entries",
                edited(lambda r, t: bitflip(t, BASE + ".codes", (1, 5), 16), u16), "code_out_of_range", "decode",
                tensor=BASE, field="weight/codes"),
    ]


def _invalid_reshapes() -> list[Invalid]:
    """reshape: the element count, its dims, and the input's grids over the input's own shape."""
    rng = rng_for("invalid-reshape")
    b = RecordBuilder(BASE, (4, 40), "F16")  # groups of 8 along the flattened weight: M = W.reshape(8, 20)
    inner, _ = affine(b, codes(rng, (8, 20), 4), 4, (8, 1), fp16(rng, (1, 20), 0.02, True), fp16(rng, (1, 20), 8.0))
    qt = b.finish(b.reshape(inner))

    def count(records: dict, tensors: dict) -> None:
        node_at(records[BASE])["shape"] = records[BASE]["shape"] = [4, 41]

    def zero_dim(records: dict, tensors: dict) -> None:
        node_at(records[BASE])["shape"] = [0, 160]

    def grid_of_output(records: dict, tensors: dict) -> None:  # one scale per output column: not M's grid
        tensors[BASE + ".scale"] = np.ones((1, 40), F16)
        records[BASE]["storage_bytes"] += 40

    return [
        Invalid("reshape_count_mismatch", "a reshape to [4, 41] of an input with 8 x 20 = 160 elements",
                edited(count, qt), "shape_mismatch", "open", tensor=BASE, field="weight/input"),
        Invalid("reshape_dim_zero", "a reshape whose shape is [0, 160]", edited(zero_dim, qt), "bad_field", "open",
                tensor=BASE, field="weight/shape"),
        Invalid("reshape_input_grid_mismatch", "the affine below a reshape has a [1, 40] scale (the output's "
                "columns); its own [8, 20] codes in groups of [8, 1] need [1, 20]", edited(grid_of_output, qt),
                "shape_mismatch", "open", tensor=BASE, field="weight/input/scale"),
    ]


def _invalid_concats() -> list[Invalid]:
    """concat: a non-empty list of float parts with one row count, axis 1 only."""
    rng = rng_for("invalid-concat")
    b = RecordBuilder(BASE, (4, 40), "F16")
    left, _ = affine(b, codes(rng, (4, 24), 2), 2, (1, 8), fp16(rng, (4, 3), 0.1, True), 1.5,
                     roles=("b2.codes", "b2.scale", "b2.zero"))
    qt = b.finish(b.concat([left, b.tensor("rest", fp16(rng, (4, 16)))]))

    def rows(records: dict, tensors: dict) -> None:  # part 1 with 5 rows
        tensors[BASE + ".rest"] = np.zeros((5, 16), F16)
        records[BASE]["storage_bytes"] += 32

    def int_part(records: dict, tensors: dict) -> None:  # part 1 as raw 4-bit codes, no value map
        del tensors[BASE + ".rest"]
        tensors[BASE + ".rest.codes"] = bitpack.pack_codes(np.zeros((4, 16), np.int64), 4)
        node_at(records[BASE], "parts")[1] = {"codec": "packed", "version": 1, "tensor": BASE + ".rest.codes",
                                             "bits": 4, "shape": [4, 16]}
        records[BASE]["storage_bytes"] += 32 - 128

    def drop_axis(records: dict, tensors: dict) -> None:
        del node_at(records[BASE])["axis"]

    def invalid(vid: str, description: str, edit: Callable[[dict, dict], None], code: str, fld: str) -> Invalid:
        return Invalid(vid, description, edited(edit, qt), code, "open", tensor=BASE, field=fld)

    return [
        invalid("concat_rows_mismatch", "a concat whose part 1 has 5 rows while part 0 has 4", rows,
                "shape_mismatch", "weight/parts[1]"),
        invalid("concat_axis_0", "a concat with axis 0 (version 1 concatenates columns only: axis 1)",
                set_field((), "axis", 0), "bad_field", "weight/axis"),
        invalid("concat_axis_not_integer", "a concat with axis 1.0 (integers are written without a fraction)",
                set_field((), "axis", 1.0), "bad_field", "weight/axis"),
        invalid("concat_missing_axis", "a concat node without its required axis", drop_axis, "bad_record",
                "weight/axis"),
        invalid("concat_parts_empty", "a concat with an empty parts list", set_field((), "parts", []), "bad_field",
                "weight/parts"),
        invalid("concat_int_part", "a concat whose part 1 is 4-bit packed codes (int kind): parts must be float",
                int_part, "bad_kind", "weight/parts[1]"),
    ]

def _invalid_offsets() -> list[Invalid]:
    """affine version 2's offset: not in version 1, on the parameter grid, finite."""
    def v1_offset(records: dict, tensors: dict) -> None:
        node_at(records[BASE])["offset"] = 0.5

    def v2_offset(value: Any, stored: np.ndarray | None = None) -> Callable[[dict, dict], None]:
        def edit(records: dict, tensors: dict) -> None:
            node = node_at(records[BASE])
            node["version"] = 2
            node["offset"] = value
            if stored is not None:
                tensors[BASE + ".offset"] = stored
                records[BASE]["storage_bytes"] += stored.nbytes
        return edit

    two_groups = np.full((4, 2), -0.5, F16)  # groups of 16 over 40 columns need [4, 3]
    offset_node = {"codec": "tensor", "version": 1, "tensor": BASE + ".offset"}
    return [
        Invalid("affine_v1_offset", "an affine version 1 node with an offset (a field only version 2 has)",
                edited(v1_offset), "bad_field", "open", tensor=BASE, field="weight/offset"),
        Invalid("affine_offset_grid_mismatch", "an affine version 2 offset [4, 2]: groups of 16 over 40 columns "
                "need [4, 3]", edited(v2_offset(offset_node, two_groups)), "shape_mismatch", "open", tensor=BASE,
                field="weight/offset"),
        Invalid("affine_offset_non_finite", "an affine version 2 constant offset of -1e39: finite JSON, but infinite "
                "once rounded to fp32", edited(v2_offset(-1e39)), "bad_field", "open", tensor=BASE,
                field="weight/offset"),
    ]


def _sign_not_one_bit() -> Invalid:
    b = RecordBuilder(BASE, (4, 8))
    sign = b.packed("sign", np.ones((4, 8), int), 1)
    qt = b.finish(b.sign_lowrank(sign, b.tensor("u", np.ones((4, 1), F16)), b.tensor("v", np.ones((1, 8), F16))))

    def two_bits(records: dict, tensors: dict) -> None:
        node = node_at(records[BASE], "sign")
        node["bits"] = 2
        tensors[BASE + ".sign"] = np.zeros((4, 2), np.uint8)
        records[BASE]["storage_bytes"] += 4
    return Invalid("sign_not_one_bit", "sign_lowrank whose sign is a 2-bit packed node", edited(two_bits, qt),
                   "bad_kind", "open", tensor=BASE, field="weight/sign")


def _lut_table_too_small() -> Invalid:
    b = RecordBuilder(BASE, (2, 8))
    qt = b.finish(b.lut(b.packed("codes", np.arange(16).reshape(2, 8), 4),
                        b.tensor("table", np.linspace(-1, 1, 16).astype(np.float32))))

    def short_table(records: dict, tensors: dict) -> None:
        tensors[BASE + ".table"] = tensors[BASE + ".table"][:10].copy()
        records[BASE]["storage_bytes"] -= 24
    return Invalid("lut_table_too_small", "4-bit codes (up to 15) into a table of 10 entries", edited(short_table, qt),
                   "code_out_of_range", "open", tensor=BASE, field="weight/codes")


def invalid_data() -> list[Invalid]:
    """Errors only tensor data reveals: readers may find them at open or at decode."""
    out: list[Invalid] = []

    def add(vid: str, description: str, data: bytes, code: str, fld: str) -> None:
        out.append(Invalid(vid, description, data, code, "decode", tensor=BASE, field=fld))

    sp = sparse_record()
    col, ptr = BASE + ".outliers.col_idx", BASE + ".outliers.row_ptr"
    add("outlier_index_out_of_range", "an outlier column index equals the column count (24)",
        edited(lambda r, t: bitflip(t, col, (3,), 24), sp), "index_out_of_range", "weight/terms[1]/col_idx")
    add("outlier_columns_not_increasing", "row 0's outlier columns are 9 then 3",
        edited(lambda r, t: bitflip(t, col, (0,), 9) or bitflip(t, col, (1,), 3), sp), "bad_index",
        "weight/terms[1]/col_idx")
    add("row_ptr_inconsistent", "row_ptr ends at 3 but there are 4 outliers",
        edited(lambda r, t: bitflip(t, ptr, (4,), 3), sp), "bad_index", "weight/terms[1]/row_ptr")

    add("nonzero_padding", "a packed row's padding bits are not zero",
        _padding_vector(), "nonzero_padding",
        "weight/codes/tensor")

    b = RecordBuilder(BASE, (2, 5))
    planes = b.finish(b.affine(b.bitplanes("planes", np.arange(10).reshape(2, 5) % 4, 2), scale=1.0, bits=2,
                               group_shape=(1, 5)))
    add("bitplanes_nonzero_padding", "plane 1 of a 2x5 bit-plane node has a padding bit set",
        edited(lambda r, t: bitflip(t, BASE + ".planes", (1, 0, 0), int(t[BASE + ".planes"][1, 0, 0]) | 0x80),
               planes), "nonzero_padding", "weight/codes/tensor")

    b = RecordBuilder(BASE, (2, 5))
    words, ptr = ternary_dict_encode(np.array([[0, 0, 1, 0, 2], [1, 1, 0, 0, 0]]))
    stream = b.finish(b.lut(ternary_dict_node(b, words, ptr, (2, 5)), b.tensor("table", np.ones(3, np.float32))))
    seqs, lengths = ternary_dict.dictionary()
    two_pairs = int(np.flatnonzero(lengths == 2)[0])  # row 0 is one 3-pair codeword
    add("ternary_dict_pair_count", "row 0's codeword replaced by one of two pairs: the row expands to 2 pairs, not 3",
        edited(lambda r, t: bitflip(t, BASE + ".codewords", (0,), two_pairs), stream), "code_out_of_range",
        "weight/codes/tensor")
    single = {int(seqs[i, 0]): i for i in np.flatnonzero(lengths == 1)}
    b = RecordBuilder(BASE, (1, 5))  # pairs 0, 0, 3: pair 3 = (0, 1), so the pad weight after column 4 is 1
    padded = b.finish(b.lut(ternary_dict_node(b, np.array([single[0], single[0], single[3]], np.uint16),
                                              np.array([0, 3], np.int32), (1, 5)), b.tensor("table", np.ones(3, np.float32))))
    add("ternary_dict_nonzero_pad", "a 5-column row coded as pairs 0, 0, 3: its pad weight (pair 3's second) is 1",
        edited(lambda r, t: None, padded), "nonzero_padding", "weight/codes/tensor")
    add("ternary_dict_row_ptr", "row_ptr ends past the codewords",
        edited(lambda r, t: bitflip(t, BASE + ".row_ptr", (2,), int(t[BASE + ".row_ptr"][2]) + 1), stream),
        "bad_index", "weight/codes/row_ptr")

    b = RecordBuilder(BASE, (2, 6))
    perm = b.finish(b.permute(b.tensor("stored", np.ones((2, 6), F16)), np.arange(6)))
    add("bad_permutation", "perm holds 2 twice and never 5",
        edited(lambda r, t: bitflip(t, BASE + ".perm", (5,), 2), perm), "bad_permutation", "weight/perm")

    b = RecordBuilder(BASE, (2, 4))
    raw_codes = b.finish(b.affine(b.tensor("codes", np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)), scale=1.0,
                                  bits=2, group_shape=(1, 4)))
    add("code_out_of_range", "2-bit affine over a U8 code tensor holding the value 5",
        edited(lambda r, t: bitflip(t, BASE + ".codes", (1, 1), 5), raw_codes), "code_out_of_range", "weight/codes")

    b = RecordBuilder(BASE, (2, 4))
    lut = b.finish(b.lut(b.tensor("codes", np.zeros((2, 4), np.uint8)), b.tensor("table", np.ones(6, np.float32))))
    add("lut_code_out_of_range", "a U8 code 6 into a table of 6 entries",
        edited(lambda r, t: bitflip(t, BASE + ".codes", (0, 3), 6), lut), "code_out_of_range", "weight/codes")

    b = RecordBuilder(BASE, (2, 7))
    tern = b.finish(b.scale(b.ternary("trits", np.zeros((2, 7), int)), b.tensor("scale", np.ones((1, 1), F16)),
                            group_shape=(2, 7)))
    add("ternary_invalid_byte", "a ternary byte of 250 (at most 242 is valid)",
        edited(lambda r, t: bitflip(t, BASE + ".trits", (0, 0), 250), tern), "code_out_of_range",
        "weight/input/tensor")
    add("ternary_nonzero_pad_digit", "the pad digits of a row's last byte (7 trits in 2 bytes) are not 0",
        edited(lambda r, t: bitflip(t, BASE + ".trits", (1, 1), int(t[BASE + ".trits"][1, 1]) + 81), tern),
        "code_out_of_range", "weight/input/tensor")

    b = RecordBuilder(BASE, (2, 8))
    vq = b.finish(b.vq(b.tensor("codes", np.zeros((2, 2), np.uint16)), b.tensor("codebooks", np.ones((1, 5, 4), F16))))
    add("vq_code_out_of_range", "a U16 code 5 into codebooks of 5 entries",
        edited(lambda r, t: bitflip(t, BASE + ".codes", (1, 0), 5), vq), "code_out_of_range", "weight/codes")
    return out


def _padding_vector() -> bytes:
    b = RecordBuilder(BASE, (2, 5))  # 5 codes of 3 bits = 15 bits: one padding bit per row
    qt = b.finish(affine(b, np.arange(10).reshape(2, 5) % 8, 3, (1, 5), 1.0)[0])
    return edited(lambda r, t: bitflip(t, BASE + ".codes", (1, 1), int(t[BASE + ".codes"][1, 1]) | 0x80), qt)


def raw_record(tensors: dict[str, np.ndarray], weight: dict, shape: list[int]) -> bytes:
    """A file with one record over ``tensors``, storage_bytes computed, nothing validated."""
    record = {"shape": shape, "dtype": "F32", "storage_bytes": sum(a.nbytes for a in tensors.values()),
              "weight": weight}
    return parts_of(tensors, qformat_meta({BASE: record})).to_bytes()


def u8_tensor(tensors: dict[str, np.ndarray], role: str, shape: tuple[int, ...]) -> dict:
    tensors[f"{BASE}.{role}"] = np.ones(shape, np.uint8)
    return {"codec": "tensor", "version": 1, "tensor": f"{BASE}.{role}"}


def lowrank_node(a: dict, b: dict) -> dict:
    return {"codec": "lowrank", "version": 1, "a": a, "b": b}


def invalid_hardening() -> list[Invalid]:
    """Files that crashed or exhausted readers: wrapping row_ptr, amplification through inner nodes and repeated
    references, huge groups, strings that are not Unicode (spec/record.md#limits, spec/components.md#sparse_csr)."""
    out: list[Invalid] = []
    tensors: dict[str, np.ndarray] = {BASE + ".outliers.row_ptr": np.array([0, (1 << 63) - 1, -2, 1], np.int64),
                                      BASE + ".outliers.col_idx": np.array([2], np.int32),
                                      BASE + ".outliers.values": np.array([1.5], np.float32)}
    node = {"codec": "sparse_csr", "version": 1, "row_ptr": BASE + ".outliers.row_ptr",
            "col_idx": BASE + ".outliers.col_idx", "shape": [3, 4],
            "values": {"codec": "tensor", "version": 1, "tensor": BASE + ".outliers.values"}}
    out.append(Invalid("row_ptr_wraps_around", "I64 row_ptr [0, 2^63 - 1, -2, 1]: its differences wrap around to "
                       "non-negative values in 64-bit arithmetic; compared entry by entry it decreases",
                       raw_record(tensors, node, [3, 4]), "bad_index", "decode", tensor=BASE,
                       field="weight/row_ptr"))

    def huge_group(records: dict, tensors: dict) -> None:
        node_at(records[BASE])["group_shape"] = [1 << 40, 16]
        for role in ("scale", "zero"):  # the grid [1, 3] that groups of 2^40 x 16 rows over 4 x 40 would have
            tensors[f"{BASE}.{role}"] = tensors[f"{BASE}.{role}"][:1].copy()
        records[BASE]["storage_bytes"] -= 2 * 3 * 3 * 2
    out.append(Invalid("group_shape_over_2_40", "group_shape [2^40, 16] with its [1, 3] parameter grid: dims "
                       "entries must be below 2^40", edited(huge_group), "bad_field", "open", tensor=BASE,
                       field="weight/group_shape"))

    n = 8192
    tensors = {}
    node = lowrank_node(u8_tensor(tensors, "a", (n, 1)), u8_tensor(tensors, "b", (1, n)))
    out.append(Invalid("lowrank_amplification", f"a {n} x {n} rank-1 product of U8 factors: 2^26 elements from "
                       f"{2 * n} stored bytes, over the 256 elements per byte limit", raw_record(tensors, node, [n, n]),
                       "limit_exceeded", "open", tensor=BASE, field="weight"))

    tensors = {}
    inner = lowrank_node(u8_tensor(tensors, "x", (n, 1)), u8_tensor(tensors, "y", (1, n)))
    node = lowrank_node(inner, u8_tensor(tensors, "z", (n, 1)))
    out.append(Invalid("inner_node_amplification", f"a [{n}, 1] record whose factor a is itself a {n} x {n} "
                       "product: the record is small, the intermediate is 2^26 elements from 3 * 8192 stored bytes",
                       raw_record(tensors, node, [n, 1]), "limit_exceeded", "open", tensor=BASE, field="weight/a"))

    m = 2048
    tensors = {}
    term = lowrank_node(u8_tensor(tensors, "a", (m, 1)), u8_tensor(tensors, "b", (1, m)))
    node = {"codec": "sum", "version": 1, "terms": [copy.deepcopy(term) for _ in range(64)]}
    out.append(Invalid("reference_counted_each_use", f"a sum of 64 copies of one {m} x {m} rank-1 product over the "
                       "same two tensors: stored once, decoded 64 times (2^28 elements from 4096 bytes)",
                       raw_record(tensors, node, [m, m]), "limit_exceeded", "open", tensor=BASE,
                       field="weight/terms[0]"))

    p = parts_of({"a\ud800": np.arange(4, dtype=np.float32)}, {"format": "pt"})
    out.append(Invalid("tensor_name_lone_surrogate", "a tensor named 'a' + the JSON escape \\ud800, a lone "
                       "surrogate: valid JSON, not Unicode text", p.to_bytes(), "bad_header", "open"))

    p = plain_parts()
    p.entries.append(("empty", {"dtype": "F32", "shape": [(1 << 40) - 1, 0, (1 << 40) - 1],
                                "data_offsets": [len(p.data), len(p.data)]}))
    out.append(Invalid("empty_tensor_huge_dims", "an empty F32 tensor of shape [2^40 - 1, 0, 2^40 - 1]: no array "
                       "library can represent it (its non-zero dims reach 2^63 bytes)", p.to_bytes(), "bad_header",
                       "open", tensor="empty", field="shape"))

    p = parts_of({"a": np.arange(4, dtype=np.float32)}, {"format": "pt"})
    header = raw_header(p.entries).replace(b'"a"', b'"a\xed\xa0\x80"')  # U+D800 encoded as if it were a character
    out.append(Invalid("header_utf8_encoded_surrogate", "a tensor name holding the bytes ED A0 80 (U+D800 encoded "
                       "as UTF-8 would encode a character): not UTF-8, though lenient decoders accept it",
                       raw_file(header, p.data), "bad_header", "open"))

    def note(records: dict, tensors: dict) -> None:
        records[BASE]["info"] = {"note": "\ud800"}
    out.append(Invalid("record_info_lone_surrogate", "a record's info holds the string \\ud800 (a lone "
                       "surrogate), escaped inside the JSON of __metadata__['qformat']", edited(note), "bad_header",
                       "open"))

    qt = base_record()
    record = {**copy.deepcopy(qt.record), "info": {"note": "\ud800"}}
    text = json.dumps({"format_version": 1, "records": {BASE: record}}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)  # the surrogate itself: the header's JSON escapes it
    p = parts_of({k: np.array(v) for k, v in qt.tensors.items()}, {"format": "pt", "qformat": text})
    out.append(Invalid("metadata_lone_surrogate", "the __metadata__['qformat'] string of the header holds a lone "
                       "surrogate (the header escapes it as \\ud800)", p.to_bytes(), "bad_header", "open"))
    return out


def invalid_vectors() -> list[Invalid]:
    return (invalid_file_level() + invalid_qformat_metadata() + invalid_records() + invalid_data()
            + invalid_hardening())


# ---------------------------------------------------------------------------------------------------------------
# writing

def write_expected(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tensors = {name: np.ascontiguousarray(arrays[name], dtype=np.float32) for name in sorted(arrays)}
    path.write_bytes(parts_of(tensors, None).to_bytes())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def codecs_used(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("codec"), str):
            found.add(node["codec"])
        for value in node.values():
            found |= codecs_used(value)
    elif isinstance(node, list):
        for value in node:
            found |= codecs_used(value)
    return found


def generate(out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.safetensors"):
        old.unlink()
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for v in valid_vectors():
        path = out_dir / f"{v.id}.safetensors"
        write_file(path, v.plain, v.records)
        expected = {**v.expected, **{n: f32(a) for n, a in v.plain.items()}}
        write_expected(out_dir / f"{v.id}.expected.safetensors", expected)
        tolerance_name = None
        if v.product_bounds:
            tolerance_name = f"{v.id}.tolerance.safetensors"
            write_expected(out_dir / tolerance_name, {n: tolerance(expected[n], v.product_bounds.get(n, 0.0))
                                                      for n in expected})
        variants = [(v.id, v.description, v.options, f"{v.id}.expected.safetensors")]
        for extra_id, extra_description, options, extra_expected in v.extra:
            write_expected(out_dir / f"{extra_id}.expected.safetensors", extra_expected)
            variants.append((extra_id, extra_description, options, f"{extra_id}.expected.safetensors"))
        for vid, description, options, expected_name in variants:
            assert vid not in seen, vid
            seen.add(vid)
            entries.append({
                "id": vid, "kind": "valid", "description": description, "file": path.name, "sha256": sha256(path),
                "expected": expected_name, "expected_sha256": sha256(out_dir / expected_name),
                "records": sorted(qt.name for qt in v.records), "plain": sorted(v.plain),
                "signatures": {qt.name: signature(qt.record["weight"]) for qt in v.records},
                "codecs": sorted(set().union(*(codecs_used(qt.record["weight"]) for qt in v.records))),
                "exact": tolerance_name is None, "options": options,
            })
            if tolerance_name:
                entries[-1].update(tolerance=tolerance_name, tolerance_sha256=sha256(out_dir / tolerance_name))
    for inv in invalid_vectors():
        assert inv.id not in seen, inv.id
        seen.add(inv.id)
        path = out_dir / f"{inv.id}.safetensors"
        path.write_bytes(inv.data)
        error = {"code": inv.code, "stage": inv.stage}
        if inv.tensor:
            error["tensor"] = inv.tensor
        if inv.field:
            error["field"] = inv.field
        entries.append({"id": inv.id, "kind": "invalid", "description": inv.description, "file": path.name,
                        "sha256": sha256(path), "error": error})
    manifest = {"manifest_version": MANIFEST_VERSION, "format_version": 1, "generator": "conformance/generate.py",
                "seed": SEED, "vectors": entries}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def check(reference: Path = VECTORS_DIR) -> list[str]:
    """Regenerate into a temp dir; return the files that differ from (or are missing in) ``reference``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        names = sorted({p.name for p in fresh.iterdir()} | {p.name for p in reference.iterdir()
                                                            if p.suffix in (".safetensors", ".json")})
        return [n for n in names if not (fresh / n).is_file() or not (reference / n).is_file()
                or not filecmp.cmp(fresh / n, reference / n, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=VECTORS_DIR, help="output folder (default: conformance/vectors)")
    parser.add_argument("--check", action="store_true", help="verify the checked-in vectors are reproduced exactly")
    args = parser.parse_args(argv)
    if args.check:
        differing = check(args.out)
        if differing:
            print("vectors differ from a fresh generation: " + ", ".join(differing), file=sys.stderr)
            return 1
        print(f"ok: {args.out} matches a fresh generation byte for byte")
        return 0
    manifest = generate(args.out)
    kinds = [v["kind"] for v in manifest["vectors"]]
    print(f"wrote {kinds.count('valid')} valid and {kinds.count('invalid')} invalid vectors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
