"""Record trees for imported weights, the same shapes the built-in methods write (numpy only, no torch):

- integer codes: ``affine(packed codes, scale, zero)`` (``plugins/_common.py``), under ``permute`` for act-order;
- FP8: ``scale(lut(U8 codes, E4M3 table), factor)`` (``plugins/minifloat.py`` ``_fp8``);
- FP4 blocks (MXFP4, NVFP4): ``scale(lut(packed E2M1 codes, E2M1 table), lut(U8 scale codes, F32 table), [1, g])``.

The stored integers and floats go in unchanged (integers re-laid into the ``packed`` layout, floats in their dtype).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from qformat.plugin import RecordBuilder

# FP4 E2M1 value of codes 0..15 (code = sign·8 + exponent·2 + mantissa; code 8 is -0.0): F16 holds them exactly.
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                dtype=np.float16)
E4M3_NAN_CODES = (0x7F, 0xFF)
E8M0_NAN_CODE = 0xFF


def e4m3_values() -> np.ndarray:
    """fp32 value of every E4M3 byte; the NaN codes 0x7F/0xFF as 0 (spec: lut tables)."""
    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    values[list(E4M3_NAN_CODES)] = 0.0
    return values


def e8m0_values() -> np.ndarray:
    """F32[256]: code e -> 2^(e - 127) (2^-127 is an fp32 subnormal, exact); code 255 (NaN) as 0."""
    values = np.zeros(256, dtype=np.float32)
    values[:E8M0_NAN_CODE] = np.ldexp(np.float64(1.0), np.arange(E8M0_NAN_CODE) - 127)  # up to 2^127: no overflow
    return values


def zero_value(b: RecordBuilder, zeros: np.ndarray | None, bits: int) -> Any:
    """The affine ``zero`` of integer zero points [R, G]: a JSON constant when they are all one value (symmetric
    schemes), else packed codes of ``bits`` bits, or more where a value needs them (GPTQ v1's zero of 2^bits)."""
    if zeros is None:
        return None
    if zeros.size and np.all(zeros == zeros.flat[0]):
        return float(zeros.flat[0])
    width = max(bits, int(zeros.max()).bit_length() if zeros.size else 1)
    return b.packed("zero", zeros, width)


def affine_tree(b: RecordBuilder, codes: np.ndarray, bits: int, scale: np.ndarray, zeros: Any,
                group_shape: tuple[int, int], perm: np.ndarray | None = None) -> dict:
    """``affine(packed codes [R, C], scale tensor, zero)`` with ``group_shape``; under ``permute(…, perm)`` when the
    codes, scales and zeros are in permuted column order. ``zeros``: integer array [R, G], a number, or None."""
    if zeros is None or isinstance(zeros, np.ndarray):
        zero = zero_value(b, zeros, bits)
    else:
        zero = float(zeros)
    node = b.affine(b.packed("codes", codes, bits), scale=b.tensor("scale", np.ascontiguousarray(scale)), zero=zero,
                    bits=bits, group_shape=group_shape)
    return node if perm is None else b.permute(node, perm)


def fp8_tree(b: RecordBuilder, codes: np.ndarray, factor: np.ndarray, group_shape: tuple[int, int]) -> dict:
    """``scale(lut(U8 codes [R, C], E4M3 table F16[256]), factor, group_shape)``."""
    table = b.tensor("table", e4m3_values().astype(np.float16))  # every E4M3 value is exact in F16
    return b.scale(b.lut(b.tensor("codes", np.ascontiguousarray(codes)), table),
                   b.tensor("scale", np.ascontiguousarray(factor)), group_shape)


def fp4_block_tree(b: RecordBuilder, packed: np.ndarray, cols: int, scale_codes: np.ndarray, table: np.ndarray,
                   block: int) -> dict:
    """``scale(lut(packed E2M1 codes, E2M1), lut(U8 scale codes [R, C / block], table F32[256]), [1, block])``.

    ``packed``: two E2M1 codes per byte, the first in the low nibble, which is the ``packed`` 4-bit layout as is."""
    codes = {"codec": "packed", "version": 1, "tensor": b.store("codes", np.ascontiguousarray(packed)), "bits": 4,
             "shape": [int(packed.shape[0]), cols]}
    factor = b.lut(b.tensor("scale.codes", np.ascontiguousarray(scale_codes)), b.tensor("scale.table", table))
    return b.scale(b.lut(codes, b.tensor("fp4", E2M1)), factor, (1, block))
