"""The records of bitsandbytes' stored layouts (the trees of ``plugins/nf4.py`` and ``plugins/int8.py``).

**4-bit** (``Params4bit``): the packed uint8 weight holds the flattened codes two per byte, the first in the high
nibble; ``absmax`` one fp32 per block of ``blocksize`` along the flattened tensor, or with double quantization uint8
codes into ``nested_quant_map`` times ``nested_absmax`` per ``nested_blocksize`` absmax values plus ``nested_offset``.
bitsandbytes' ``dequantize_4bit`` computes ``table[q] * absmax`` in fp32 (the absmax first as
``nested_quant_map[c] * nested_absmax + offset``) and casts to the quant state's dtype.

``scale(lut(packed codes, table F32[16]), absmax, [1, blocksize])`` over [R, C] when the blocks are tiles of the
weight (``blocksize`` dividing the row, or whole rows); when blocks end mid-row, the same tree over the flattened
weight's ``[R·C / w, w]`` (``w = gcd(R·C, blocksize)``: blocks of whole rows) or, for an odd ``w``, ``[1, R·C]`` (one
packed row), inside a ``reshape`` to [R, C]. The absmax either the stored fp32 array or
``sum(scale(lut(U8 codes, map F32[256]), nested_absmax), lowrank(ones, offset))``. Codes are re-laid into the
``packed`` order (nibbles swapped), never changed. The table is ``get_4bit_type(quant_type)``, what checkpoints
store as ``quant_map`` and what bitsandbytes' portable ``dequantize_4bit`` (``backends/default``) looks codes up in.
Its native kernels can differ in the sign of FP4's zero (code 8: -0.0 from the bit pattern on CUDA and, depending on
the CPU and the shape, on CPU): a sign of zero, equal in every product. bitsandbytes' AVX-512 CPU kernel (0.50.2) also
decodes blocks that end mid-row or span rows differently from its own ``quantize_4bit``, which lays blocks along the
flattened weight as the CUDA kernels and the portable path do (measured: twice the portable decode's error against the
original weight); these records follow the flattened blocks.

**8-bit** (``Int8Params``, LLM.int8): ``weight`` int8 ``CB`` [R, C] and ``SCB`` fp32 [R]; ``int8_vectorwise_dequant``
is ``CB * SCB * 7.874015718698502e-3`` in fp32, left to right. Outlier columns are not stored apart (bitsandbytes
dequantizes them from ``CB`` too at run time). ``scale(affine(packed CB + 128, scale=SCB [R, 1], zero=128,
[1, C]), 1/127 F32 [1, 1], [R, C])``: ``(q - 128) * SCB`` is exactly ``CB * SCB``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qformat.plugin import Node, QuantizedTensor, RecordBuilder

# bitsandbytes get_4bit_type: NF4 (as plugins/nf4.py), FP4 in bit-pattern order divided by 12 (fp32).
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
              1.0)
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
INV_127 = 7.874015718698502e-3  # int8_vectorwise_dequant's factor, an fp32 multiply
ZERO_CODE = 128


def quant_map(quant_type: str) -> np.ndarray:
    """``get_4bit_type(quant_type)`` as bitsandbytes computes it (what checkpoints store as ``quant_map``)."""
    values = np.asarray(NF4_VALUES if quant_type == "nf4" else FP4_VALUES, dtype=np.float32)
    return values / np.abs(values).max()


@dataclass(frozen=True)
class Nested:
    """Double quantization of the absmax: uint8 codes, the 256-entry map, one fp32 scale per block, the offset."""

    codes: np.ndarray
    table: np.ndarray
    scales: np.ndarray
    offset: float
    blocksize: int


def absmax_grid(rows: int, cols: int, block: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(absmax grid, group_shape) of blocks of ``block`` weights along the flattened [rows, cols] tensor: blocks
    within rows when ``block`` divides ``cols``, whole rows when ``cols`` divides ``block``; None when blocks end
    mid-row (no parameter grid expresses that)."""
    if cols % block == 0:
        return (rows, cols // block), (1, block)
    if block % cols == 0:
        per = block // cols
        return (-(-rows // per), 1), (per, cols)
    return None


def block_layout(rows: int, cols: int, block: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(shape the codes are laid out in, absmax grid, group_shape): [rows, cols] when the blocks are tiles of it, else
    the flattened weight as [n / w, w] (``w = gcd(n, block)``, even so rows are whole bytes; blocks are then whole
    rows) or [1, n], which a ``reshape`` lays out as [rows, cols]."""
    found = absmax_grid(rows, cols, block)
    if found is not None:
        return (rows, cols), *found
    n = rows * cols
    width = math.gcd(n, block)
    if width % 2:  # an odd count of weights: one row, whose trailing nibble is padding
        return (1, n), (1, -(-n // block)), (1, block)
    found = absmax_grid(n // width, width, block)
    assert found is not None  # width divides block
    return (n // width, width), *found


def fourbit_record(name: str, shape: tuple[int, int], dtype: str, quant_type: str, blocksize: int,
                   packed: np.ndarray, absmax: np.ndarray | Nested, info: dict) -> QuantizedTensor:
    (rows, cols), (arows, acols), group = block_layout(*shape, blocksize)
    b = RecordBuilder(name, shape, dtype)
    flat = np.asarray(packed).reshape(-1)
    if cols % 2 == 0:  # each row is whole bytes: swap the nibbles into the packed order (first code low)
        row_bytes = ((flat & 0x0F) << 4) | (flat >> 4)
        codes = b.node("packed", 1, tensor=b.store("codes", row_bytes.reshape(rows, cols // 2)), bits=4,
                       shape=[rows, cols])
    else:
        pairs = np.stack([flat >> 4, flat & 0x0F], axis=1).reshape(-1)[: rows * cols]
        codes = b.packed("codes", pairs.reshape(rows, cols), 4)
    values = b.lut(codes, b.tensor(quant_type, quant_map(quant_type)))
    if isinstance(absmax, Nested):
        factor = _nested(b, absmax, arows, acols)
    else:
        factor = b.tensor("absmax", np.asarray(absmax).reshape(arows, acols))
    node = b.scale(values, factor, group)
    return b.finish(node if (rows, cols) == tuple(shape) else b.reshape(node), info)


def _nested(b: RecordBuilder, nested: Nested, rows: int, cols: int) -> Node:
    """``A = map[c] * s2[block] + offset`` over the absmax grid [rows, cols] (blocks of the flattened absmax)."""
    block = nested.blocksize
    scales = np.asarray(nested.scales)
    if block % cols == 0 or cols % block == 0:
        tile = (block // cols, cols) if block % cols == 0 else (1, block)
        s2 = b.tensor("absmax.scale", scales.reshape(-(-rows // tile[0]), -(-cols // tile[1])))
    else:
        tile = (1, 1)
        s2 = _block_scales(b, scales, rows, cols, block)
    codes = b.tensor("absmax.codes", np.asarray(nested.codes).reshape(rows, cols))
    inner = b.scale(b.lut(codes, b.tensor("absmax.map", np.asarray(nested.table))), s2, tile)
    ones = b.tensor("absmax.ones", np.ones((rows, 1), dtype=np.int8))
    offset = b.tensor("absmax.offset", np.full((1, cols), nested.offset, dtype=np.float32))
    return b.sum([inner, b.lowrank(ones, offset)])


def _block_scales(b: RecordBuilder, scales: np.ndarray, rows: int, cols: int, block: int) -> Node:
    """The s2 of each absmax where blocks end mid-row: ``lut(relative block index, each row tile's s2 copies)``,
    as plugins/nf4.py's ``_block_scales``."""
    per = max(1, block // cols)
    tiles = -(-rows // per)
    index = (np.arange(rows * cols) // block).reshape(rows, cols)
    first = index[::per, 0]
    relative = index - np.repeat(first, per)[:rows, None]
    width = max(1, math.ceil(math.log2(int(relative.max()) + 1)))
    taken = first[:, None] + np.arange(1 << width)
    table = np.where(taken < scales.size, scales[np.minimum(taken, scales.size - 1)], 0).astype(np.float32)
    return b.lut(b.packed("absmax.block", relative.astype(np.int32), width),
                 b.tensor("absmax.scale", table.reshape(tiles, 1, 1 << width)), group_shape=(per, cols))


def int8_record(name: str, dtype: str, cb: np.ndarray, scb: np.ndarray, info: dict) -> QuantizedTensor:
    rows, cols = cb.shape
    b = RecordBuilder(name, (rows, cols), dtype)
    codes = b.packed("codes", (np.asarray(cb).view(np.uint8) ^ 0x80), 8)  # two's complement + 128, mod 256
    inner = b.affine(codes, scale=b.tensor("scale", np.asarray(scb).reshape(rows, 1)), zero=float(ZERO_CODE), bits=8,
                     group_shape=(1, cols))
    factor = b.tensor("inv127", np.full((1, 1), INV_127, dtype=np.float32))
    return b.finish(b.scale(inner, factor, (rows, cols)), info)
