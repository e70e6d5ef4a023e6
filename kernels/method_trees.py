"""Records with the codec signatures the built-in methods write, from random data, for kernel tests and benchmarks.

One builder per signature (issue 14): the kernels' speed does not depend on the values, and their results are
compared with the reference decoder, so random codes and statistics of the right dtypes and shapes are enough.
``build(name, rows, cols)`` returns a validated :class:`~qformat.format.QuantizedTensor`; ``TREES`` names them.
Shapes: ``cols`` a multiple of 64 for the block formats (as the methods require), ``rows`` a multiple of 64 for
HQQ axis 0 tiles to be whole (a ragged last tile is allowed by the format and handled by the kernels), and of
:data:`ROW_MULTIPLE` for VPTQ (its vectors span 8 rows).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qformat.format import QuantizedTensor, RecordBuilder, ternary_dict

NF4 = np.array([-1.0, -0.6961928, -0.52507305, -0.39491749, -0.28444138, -0.18477343, -0.09105004, 0.0,
                0.0795803, 0.1609302, 0.2461123, 0.33791524, 0.44070983, 0.562617, 0.72295684, 1.0], dtype=np.float32)
# OCP E2M1: codes 0..7 positive, 8..15 their negatives
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                dtype=np.float32)


def e4m3_table() -> np.ndarray:
    """All 256 FP8 E4M3 (fn) values by code; the two NaN codes map to 0 (the methods never write them)."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    value = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    value[(exp == 0xF) & (man == 0x7)] = 0.0
    return (sign * value).astype(np.float32)


def e8m0_table() -> np.ndarray:
    """MX shared exponents: code e -> 2**(e - 127) (255, NaN in the spec, never written: 0)."""
    table = np.ldexp(1.0, np.arange(256) - 127)
    table[255] = 0.0
    return table.astype(np.float32)


def _f16(rng: np.random.Generator, *shape: int, low: float = 0.005) -> np.ndarray:
    return (np.abs(rng.standard_normal(shape)) * 0.02 + low).astype(np.float16)


def _codes4(b: RecordBuilder, rng: np.random.Generator, rows: int, cols: int) -> dict:
    return b.packed("codes", rng.integers(0, 16, (rows, cols)), 4)


def _outliers(b: RecordBuilder, rng: np.random.Generator, rows: int, cols: int, columns: int = 4) -> dict:
    """A few whole outlier columns in fp16 (LLM.int8's layout: the columns calibration flags)."""
    dense = np.zeros((rows, cols), dtype=np.float32)
    picked = rng.choice(cols, size=min(columns, cols), replace=False)
    dense[:, picked] = rng.standard_normal((rows, picked.size))
    return b.sparse_from_dense("outliers", dense)


def nf4(rows: int, cols: int, seed: int = 0, table: np.ndarray = NF4) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    lut = b.lut(_codes4(b, rng, rows, cols), b.tensor("table", table))
    absmax = b.tensor("absmax", np.abs(rng.standard_normal((rows, cols // 64))).astype(np.float32))
    return b.finish(b.scale(lut, absmax, (1, 64)))


def nf4_double_quant(rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    """spec/composition.md "NF4 with double quantization": the absmax is scale(lut(U8, map), s2) + ones @ offset."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    blocks = cols // 64
    tile_rows = max(1, 256 // blocks)
    dynamic = np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)
    nested = b.scale(b.lut(b.tensor("absmax.codes", rng.integers(0, 256, (rows, blocks)).astype(np.uint8)),
                           b.tensor("absmax.map", dynamic)),
                     b.tensor("absmax.scale", rng.random((-(-rows // tile_rows), 1)).astype(np.float32)),
                     (tile_rows, blocks))
    offset = b.lowrank(b.tensor("absmax.ones", np.ones((rows, 1), dtype=np.int8)),
                       b.tensor("absmax.offset", np.full((1, blocks), 0.5, dtype=np.float32)))
    lut = b.lut(_codes4(b, rng, rows, cols), b.tensor("table", NF4))
    return b.finish(b.scale(lut, b.sum([nested, offset]), (1, 64)))


def fp8(rows: int, cols: int, seed: int = 0, factor_dtype: type = np.float32) -> QuantizedTensor:
    """FP8 E4M3 per output channel: U8 codes into the 256-entry table, one factor per row."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    codes = rng.integers(0, 255, (rows, cols)).astype(np.uint8)
    codes[codes == 0x7F] = 0x7E  # the NaN codes (0x7F, 0xFF) never occur
    lut = b.lut(b.tensor("codes", codes), b.tensor("table", e4m3_table()))
    return b.finish(b.scale(lut, b.tensor("scale", _f16(rng, rows, 1).astype(factor_dtype)), (1, cols)))


def e2m1(rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    lut = b.lut(_codes4(b, rng, rows, cols), b.tensor("table", E2M1))
    return b.finish(b.scale(lut, b.tensor("scale", _f16(rng, rows, cols // 32)), (1, 32)))


def mxfp4(rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    lut = b.lut(_codes4(b, rng, rows, cols), b.tensor("table", E2M1))
    exponents = b.lut(b.tensor("scale.codes", rng.integers(118, 130, (rows, cols // 32)).astype(np.uint8)),
                      b.tensor("scale.table", e8m0_table()))
    return b.finish(b.scale(lut, exponents, (1, 32)))


def nvfp4(rows: int, cols: int, seed: int = 0, global_scale: bool = True) -> QuantizedTensor:
    """E2M1 codes, an E4M3 scale per 16 (a lut over U8 codes), and an fp32 per-tensor scale as one more scale."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    lut = b.lut(_codes4(b, rng, rows, cols), b.tensor("table", E2M1))
    block = b.lut(b.tensor("scale.codes", rng.integers(0x20, 0x70, (rows, cols // 16)).astype(np.uint8)),
                  b.tensor("scale.table", e4m3_table()))
    node = b.scale(lut, block, (1, 16))
    if global_scale:
        node = b.scale(node, b.tensor("global_scale", np.array([[0.0123]], dtype=np.float32)), (rows, cols))
    return b.finish(node)


def int8(rows: int, cols: int, seed: int = 0, packed: bool = False) -> QuantizedTensor:
    """LLM.int8(): row-wise absmax codes (offset 128) plus fp16 outlier columns."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    q = rng.integers(1, 256, (rows, cols))
    codes = b.packed("codes", q, 8) if packed else b.tensor("codes", q.astype(np.uint8))
    base = b.affine(codes, scale=b.tensor("scale", _f16(rng, rows, 1).astype(np.float32)), zero=128.0, bits=8,
                    group_shape=(1, cols))
    return b.finish(b.sum([base, _outliers(b, rng, rows, cols)]))


def hqq(rows: int, cols: int, seed: int = 0, bits: int = 4, axis: int = 1, group: int = 64) -> QuantizedTensor:
    """HQQ: float zero points in fp16; axis 1 groups along a row [1, g], axis 0 groups down a column [g, 1]."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    grid = (rows, -(-cols // group)) if axis == 1 else (-(-rows // group), cols)
    zero = (rng.random(grid) * ((1 << bits) - 1)).astype(np.float16)
    node = b.affine(b.packed("codes", rng.integers(0, 1 << bits, (rows, cols)), bits),
                    scale=b.tensor("scale", _f16(rng, *grid)), zero=b.tensor("zero", zero), bits=bits,
                    group_shape=(1, group) if axis == 1 else (group, 1))
    return b.finish(node)


def squeeze(rows: int, cols: int, seed: int = 0, bits: int = 3, outliers: bool = False) -> QuantizedTensor:
    """SqueezeLLM: a per-row fp16 codebook [R, 1, 2**bits], optionally dense-and-sparse."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    table = np.sort(rng.standard_normal((rows, 1, 1 << bits)) * 0.02, axis=-1).astype(np.float16)
    node = b.lut(b.packed("codes", rng.integers(0, 1 << bits, (rows, cols)), bits), b.tensor("table", table),
                 group_shape=(1, cols))
    if outliers:
        node = b.sum([node, _outliers(b, rng, rows, cols)])
    return b.finish(node)


def awq(rows: int, cols: int, seed: int = 0, group: int = 128) -> QuantizedTensor:
    """RTN/GPTQ's affine tree (fp16 scales, packed zeros) under a per-input-column scale (AWQ's unfolded s)."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    groups = -(-cols // group)
    inner = b.affine(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4), scale=b.tensor("scale", _f16(
        rng, rows, groups)), zero=b.packed("zero", rng.integers(0, 16, (rows, groups)), 4), bits=4,
        group_shape=(1, group))
    column = b.tensor("input_scale", (rng.random((1, cols)) + 0.5).astype(np.float16))
    return b.finish(b.scale(inner, column, (rows, 1)))


def aqlm(rows: int, cols: int, seed: int = 0, books_n: int = 2, bits: int = 8, group: int = 8) -> QuantizedTensor:
    """AQLM (plugins/aqlm.py ``aqlm_record``): scale(vq(packed codes [R, C / g * M], codebooks F16 [M, 2**B, g]),
    scales F16 [R, 1], group [1, C]). 2x8: M = 2 codebooks of 256 entries; 1x16: one of 65536."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    codes = b.packed("codes", rng.integers(0, 1 << bits, (rows, cols // group * books_n)), bits)
    books = b.tensor("codebooks", (rng.standard_normal((books_n, 1 << bits, group)) * 0.3).astype(np.float16))
    return b.finish(b.scale(b.vq(codes, books), b.tensor("scale", _f16(rng, rows, 1)), (1, cols)))


def vptq(rows: int, cols: int, seed: int = 0, v: int = 8, entries: int = 256, residual: int = 0,
         norm: bool = True) -> QuantizedTensor:
    """VPTQ (plugins/vptq.py): vq version 2 with vector_shape [v, 1], packed codes [R / v, C] of ceil(log2 k) bits,
    codebook F16 [1, 2**bits, v]; a residual codebook makes it sum(main, residual); the norm is an outer scale with
    group [R, 1] and an F16 [1, C] factor. ``rows`` must be a multiple of ``v`` (:data:`ROW_MULTIPLE`)."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")

    def book(role: str, k: int) -> dict:
        bits = max(1, (k - 1).bit_length())
        codes = b.packed(f"{role}codes", rng.integers(0, k, (rows // v, cols)), bits)
        books = np.zeros((1, 1 << bits, v), dtype=np.float16)  # padded with zeros to 2**bits, as the plugin does
        books[0, :k] = rng.standard_normal((k, v)) * 0.02
        return b.vq(codes, b.tensor(f"{role}codebooks", books), vector_shape=(v, 1))

    node = book("", entries)
    if residual:
        node = b.sum([node, book("res.", residual)])
    if norm:
        node = b.scale(node, b.tensor("norm", (rng.random((1, cols)) + 0.5).astype(np.float16)), (rows, 1))
    return b.finish(node)


def bcq(rows: int, cols: int, seed: int = 0, planes: int = 3, group: int = 128, offset: bool = False) -> QuantizedTensor:
    """BCQ (plugins/bcq.py): sum over planes of affine(1-bit packed plane, F16 scale 2α [R, G], zero 0.5, [1, g]);
    with ``offset`` (uniform=true) the first term is affine version 2 with an F16 offset [R, G]."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    groups = -(-cols // group)
    terms = [b.affine(b.packed(f"plane{i}", rng.integers(0, 2, (rows, cols)), 1), scale=b.tensor(f"alpha{i}",
             _f16(rng, rows, groups) / 2 ** i), zero=0.5, bits=1, group_shape=(1, group),
             offset=b.tensor("offset", _f16(rng, rows, groups)) if offset and i == 0 else None)
             for i in range(planes)]
    return b.finish(terms[0] if planes == 1 else b.sum(terms))


def ternary(rows: int, cols: int, seed: int = 0, per_row: bool = False) -> QuantizedTensor:
    """BitNet b1.58 (plugins/ternary.py): scale(ternary, F32 factor [1, 1] or [R, 1])."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    factor = (rng.random((rows, 1) if per_row else (1, 1)) * 0.02 + 0.01).astype(np.float32)
    node = b.scale(b.ternary("trits", rng.integers(-1, 2, (rows, cols))), b.tensor("scale", factor),
                   (1, cols) if per_row else (rows, cols))
    return b.finish(node)


def qmoe(rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    """QMoE ternary (plugins/qmoe.py): lut(2-bit packed codes 0..2, per-row table [R, 1, 4] = (min, 0, max, 0))."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    table = np.zeros((rows, 1, 4), dtype=np.float32)
    table[:, 0, 0], table[:, 0, 2] = -rng.random(rows) * 0.05, rng.random(rows) * 0.05
    node = b.lut(b.packed("codes", rng.integers(0, 3, (rows, cols)), 2), b.tensor("levels", table), (1, cols))
    return b.finish(node)


def qmoe_stream(rows: int, cols: int, seed: int = 0, zeros: float = 0.885) -> QuantizedTensor:
    """QMoE with stream=true (plugins/qmoe.py): lut(ternary_dict, per-row table [R, 1, 3] = (0, low, high)); symbols
    drawn with QMoE's assumed statistics (``zeros`` of them 0), encoded greedily."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    symbols = rng.choice(3, size=(rows, cols), p=[zeros, (1 - zeros) / 2, (1 - zeros) / 2])
    words, row_ptr = ternary_dict.encode(symbols)
    table = np.zeros((rows, 1, 3), dtype=np.float32)
    table[:, 0, 1], table[:, 0, 2] = -rng.random(rows) * 0.05, rng.random(rows) * 0.05
    codes = b.node("ternary_dict", 1, tensor=b.store("codewords", words), row_ptr=b.store("row_ptr", row_ptr),
                   shape=[rows, cols], dictionary="qmoe")
    return b.finish(b.lut(codes, b.tensor("levels", table), (1, cols)))


def bitstack(rows: int, cols: int, seed: int = 0, blocks: int = 1, rank: int = 16) -> QuantizedTensor:
    """BitStack (plugins/bitstack.py): scale(sum of sign_lowrank(1-bit packed signs, u F16 [R, k], v F16 [k, C]),
    F16 [1, C] input-channel factor, group [R, 1]); one block is a lone sign_lowrank under the scale."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    rank = min(rank, rows, cols)
    terms = [b.sign_lowrank(b.packed(f"b{i}.sign", rng.integers(0, 2, (rows, cols)), 1),
                            b.tensor(f"b{i}.u", _f16(rng, rows, rank)), b.tensor(f"b{i}.v", _f16(rng, rank, cols)))
             for i in range(blocks)]
    node = terms[0] if blocks == 1 else b.sum(terms)
    factor = (rng.random((1, cols)) + 0.5).astype(np.float16)
    return b.finish(b.scale(node, b.tensor("inv_act_scale", factor), (rows, 1)))


def slim(rows: int, cols: int, seed: int = 0, bits: int = 3, group: int = 64) -> QuantizedTensor:
    """SliM-LLM: groups of ``group`` columns at bits - 1, bits, bits + 1 (GPTQ statistics per width), stored as
    permute(concat(affine per width over its groups' columns, ascending))."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("w", (rows, cols), "BF16")
    n = -(-cols // group)
    widths = [(bits, bits - 1, bits + 1)[g % 3] for g in range(n)]
    parts, order = [], []
    for width in sorted(set(widths)):
        columns = [c for g in range(n) if widths[g] == width for c in range(g * group, min(cols, (g + 1) * group))]
        count = widths.count(width)
        parts.append(b.affine(b.packed(f"b{width}.codes", rng.integers(0, 1 << width, (rows, len(columns))), width),
                              bits=width, group_shape=(1, group), scale=b.tensor(f"b{width}.scale",
                                                                                 _f16(rng, rows, count)),
                              zero=b.packed(f"b{width}.zero", rng.integers(0, 1 << width, (rows, count)), width)))
        order += columns
    return b.finish(b.permute(b.concat(parts), np.array(order)))


TREES: dict[str, Callable[..., QuantizedTensor]] = {
    "nf4": nf4,
    "nf4dq": nf4_double_quant,
    "fp4": lambda rows, cols, seed=0: nf4(rows, cols, seed, table=E2M1 / 6),  # bitsandbytes FP4: same tree
    "fp8": fp8,
    "fp8h": lambda rows, cols, seed=0: fp8(rows, cols, seed, factor_dtype=np.float16),
    "e2m1": e2m1,
    "mxfp4": mxfp4,
    "nvfp4": nvfp4,
    "nvfp4n": lambda rows, cols, seed=0: nvfp4(rows, cols, seed, global_scale=False),
    "int8": int8,
    "int8p": lambda rows, cols, seed=0: int8(rows, cols, seed, packed=True),
    "hqq4": hqq,
    "hqq3": lambda rows, cols, seed=0: hqq(rows, cols, seed, bits=3),
    "hqq4a0": lambda rows, cols, seed=0: hqq(rows, cols, seed, axis=0),
    "hqq3a0": lambda rows, cols, seed=0: hqq(rows, cols, seed, bits=3, axis=0),
    "squeeze3": squeeze,
    "squeeze4": lambda rows, cols, seed=0: squeeze(rows, cols, seed, bits=4),
    "squeeze3s": lambda rows, cols, seed=0: squeeze(rows, cols, seed, outliers=True),
    "awq": awq,
    "aqlm2x8": aqlm,
    "aqlm1x16": lambda rows, cols, seed=0: aqlm(rows, cols, seed, books_n=1, bits=16),
    "vptq8": vptq,
    "vptq8r": lambda rows, cols, seed=0: vptq(rows, cols, seed, residual=256),
    "bcq2": lambda rows, cols, seed=0: bcq(rows, cols, seed, planes=2),
    "bcq3": bcq,
    "bcq4": lambda rows, cols, seed=0: bcq(rows, cols, seed, planes=4),
    "bcq4u": lambda rows, cols, seed=0: bcq(rows, cols, seed, planes=4, offset=True),
    "ternary": ternary,
    "ternaryr": lambda rows, cols, seed=0: ternary(rows, cols, seed, per_row=True),
    "qmoe": qmoe,
    "qmoe_stream": qmoe_stream,
    "bitstack1": bitstack,
    "bitstack2": lambda rows, cols, seed=0: bitstack(rows, cols, seed, blocks=2),
    "slim3": slim,
    "slim2": lambda rows, cols, seed=0: slim(rows, cols, seed, bits=2),
}
ROW_MULTIPLE = {"vptq8": 8, "vptq8r": 8}  # trees whose rows must be a multiple of this (vq vectors spanning rows)


def build(name: str, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    """The record of signature ``name`` (a key of :data:`TREES`) for an [rows, cols] weight."""
    if name not in TREES:
        raise KeyError(f"unknown tree {name!r}; known: {', '.join(TREES)}")
    return TREES[name](rows, cols, seed)
