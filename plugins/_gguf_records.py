"""One GGUF quantized tensor -> one record whose reference decode is gguf-py's ``dequantize``, bit for bit.

The trees (``d``/``m``/``dmin``: the blocks' fp16 scales, stored as F16 tensors as they are; ``sc``/``mn``: the
K-quants' integer sub-block scales and mins; ``q``: the codes; every product in gguf-py's grouping):

======== =========================================================================================================
Q4_0     ``affine(q:4, zero 8, scale d, [1,32])``                              ``d * (q - 8)``
Q4_1     ``affine(q:4, scale d, offset m, [1,32])`` (affine v2)                ``(d * q) + m``
Q5_0     ``affine(q:5, zero 16, scale d, [1,32])``                             ``d * (q - 16)``
Q5_1     ``affine(q:5, scale d, offset m, [1,32])`` (affine v2)                ``(d * q) + m``
Q8_0     ``affine(q+128:8, zero 128, scale d, [1,32])``                        ``x * d``, int8 x
Q2_K     ``affine(q:2, scale scale(sc:4, d, [1,16]), offset scale(mn:4, -dmin, [1,16]), [1,16])``
                                                                              ``(d * sc) * q - (dmin * mn)``
Q3_K     ``affine(q:3, zero 4, scale affine(sc:6, zero 32, scale d, [1,16]), [1,16])``
                                                                              ``(d * (sc - 32)) * (q - 4)``
Q4_K     ``affine(q:4, scale scale(sc:6, d, [1,8]), offset scale(mn:6, -dmin, [1,8]), [1,32])``
                                                                              ``(d * sc) * q - (dmin * mn)``
Q5_K     as Q4_K with ``q:5``
Q6_K     ``affine(q:6, zero 32, scale affine(sc+128:8, zero 128, scale d, [1,16]), [1,16])``
                                                                              ``(d * sc) * (q - 32)``, int8 sc
IQ4_NL   ``scale(lut(q:4, kvalues), d, [1,32])``                               ``d * kvalues[q]``
IQ4_XS   ``scale(lut(q:4, kvalues), affine(sc:6, zero 32, scale d, [1,8]), [1,32])``
                                                                              ``(d * (sc - 32)) * kvalues[q]``
TQ1_0    ``scale(ternary(t), d, [1,256])``                                     ``d * t``, t in {-1, 0, 1}
TQ2_0    ``affine(q:2, zero 1, scale d, [1,256])``                             ``d * (q - 1)``
======== =========================================================================================================

``-dmin`` is stored negated (exact in F16), so the offset decodes to ``float32(mn) * (-dmin) = -(dmin * mn)`` and
``x + (-(dmin * mn))`` is IEEE-identical to gguf-py's ``x - dmin * mn``. TQ1_0's five trits per byte use ggml's
base-3 fixed point (``ceil(v * 256 / 243)``, first value in the highest digit); the format's ``ternary`` codec stores
the same trits as an exact base-3 number (first value in the lowest digit), so they are re-encoded, 5 per byte.
IQ4_XS's 6-bit ``sc`` takes its low 4 bits from ``scales_l``, its high 2 from ``scales_h``; its products are exact
in fp32 (fp16 ``d``: 11 significant bits, ``|sc - 32| <= 32``, ``|kvalues| <= 127``), the tree keeps gguf-py's grouping
all the same.
"""

from __future__ import annotations

import numpy as np

from qformat.plugin import QuantizedTensor, RecordBuilder

from . import _gguf_blocks as blocks

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_ROWS_PER_CHUNK = 1 << 20  # codes packed per step: bounds the uint64 work array


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """The format's ``packed`` layout (spec/components.md § packed, LSB first) of uint8 codes ``[R, C]``, bits <= 8.

    Same bytes as ``qformat.format.bitpack.pack_codes``, without its bit matrix (8 codes -> ``bits`` bytes at once).
    """
    rows, cols = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    groups = -(-cols // 8)
    row_bytes = (cols * bits + 7) // 8
    out = np.empty((rows, groups * bits), dtype=np.uint8)
    step = max(1, _ROWS_PER_CHUNK // max(1, cols))
    for start in range(0, rows, step):
        part = codes[start:start + step]
        if cols % 8:
            part = np.pad(part, ((0, 0), (0, groups * 8 - cols)))
        part = part.reshape(part.shape[0], groups, 8).astype(np.uint64)
        word = np.zeros(part.shape[:2], dtype=np.uint64)
        for i in range(8):
            word |= part[..., i] << np.uint64(bits * i)
        out[start:start + step] = word.astype("<u8").view(np.uint8).reshape(-1, groups, 8)[..., :bits].reshape(
            part.shape[0], -1)
    return np.ascontiguousarray(out[:, :row_bytes])


class _Tree:
    """A RecordBuilder with the few leaves GGUF needs."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.b = RecordBuilder(name, shape, dtype)

    def packed(self, role: str, codes: np.ndarray, bits: int) -> dict:
        return self.b.node("packed", 1, tensor=self.b.store(role, pack_rows(codes, bits)), bits=bits,
                           shape=list(codes.shape))

    def f16(self, role: str, values: np.ndarray) -> dict:
        return self.b.tensor(role, np.ascontiguousarray(values, dtype=np.float16))


def _affine_d(t: _Tree, f: dict, bits: int, zero: int | None, group: int, offset: str | None = None) -> dict:
    """``affine(q, zero, scale d[, offset m])`` with one fp16 ``d`` (and ``m``) per block of ``group``."""
    return t.b.affine(t.packed("codes", f["codes"], bits), scale=t.f16("scale", f["d"]), zero=zero, bits=bits,
                      group_shape=(1, group), offset=t.f16("min", f[offset]) if offset else None)


def _k_sub(t: _Tree, f: dict, bits: int, sub: int, sub_bits: int) -> dict:
    """Q2_K/Q4_K/Q5_K: ``(d * sc) * q - (dmin * mn)`` with ``sub``-element sub-blocks in 256-element super-blocks."""
    per = blocks.QK_K // sub
    scale = t.b.scale(t.packed("sub_scale.codes", f["sc"], sub_bits), t.f16("sub_scale.scale", f["d"]), (1, per))
    offset = t.b.scale(t.packed("sub_min.codes", f["mn"], sub_bits), t.f16("sub_min.neg_scale", -f["dmin"]),
                       (1, per))
    return t.b.affine(t.packed("codes", f["codes"], bits), scale=scale, bits=bits, group_shape=(1, sub),
                      offset=offset)


def _k_signed(t: _Tree, f: dict, bits: int, zero: int, sub_bits: int, sub_zero: int) -> dict:
    """Q3_K/Q6_K: ``(d * (sc - sub_zero)) * (q - zero)`` with 16-element sub-blocks."""
    scale = t.b.affine(t.packed("sub_scale.codes", f["sc"], sub_bits), scale=t.f16("sub_scale.scale", f["d"]),
                       zero=sub_zero, bits=sub_bits, group_shape=(1, 16))
    return t.b.affine(t.packed("codes", f["codes"], bits), scale=scale, zero=zero, bits=bits, group_shape=(1, 16))


def _iq4_nl(t: _Tree, f: dict) -> dict:
    table = t.b.tensor("table", np.array(IQ4_NL_VALUES, dtype=np.float16))
    return t.b.scale(t.b.lut(t.packed("codes", f["codes"], 4), table), t.f16("scale", f["d"]), (1, 32))


def _iq4_xs(t: _Tree, f: dict) -> dict:
    """``(d * (sc - 32)) * kvalues[q]``: gguf-py's ``dl = d * float32(sc - 32)``, then ``dl * kvalues[q]``."""
    table = t.b.tensor("table", np.array(IQ4_NL_VALUES, dtype=np.float16))
    scale = t.b.affine(t.packed("sub_scale.codes", f["sc"], 6), scale=t.f16("sub_scale.scale", f["d"]), zero=32,
                       bits=6, group_shape=(1, blocks.QK_K // 32))
    return t.b.scale(t.b.lut(t.packed("codes", f["codes"], 4), table), scale, (1, 32))


def _tq1_0(t: _Tree, f: dict) -> dict:
    return t.b.scale(t.b.ternary("trits", f["trits"]), t.f16("scale", f["d"]), (1, blocks.QK_K))


TREES = {
    "Q4_0": lambda t, f: _affine_d(t, f, 4, 8, 32),
    "Q4_1": lambda t, f: _affine_d(t, f, 4, None, 32, offset="m"),
    "Q5_0": lambda t, f: _affine_d(t, f, 5, 16, 32),
    "Q5_1": lambda t, f: _affine_d(t, f, 5, None, 32, offset="m"),
    "Q8_0": lambda t, f: _affine_d(t, f, 8, 128, 32),
    "Q2_K": lambda t, f: _k_sub(t, f, 2, 16, 4),
    "Q3_K": lambda t, f: _k_signed(t, f, 3, 4, 6, 32),
    "Q4_K": lambda t, f: _k_sub(t, f, 4, 32, 6),
    "Q5_K": lambda t, f: _k_sub(t, f, 5, 32, 6),
    "Q6_K": lambda t, f: _k_signed(t, f, 6, 32, 8, 128),
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
    "TQ1_0": _tq1_0,
    "TQ2_0": lambda t, f: _affine_d(t, f, 2, 1, blocks.QK_K),
}
SUPPORTED = tuple(TREES)


def build_record(name: str, type_name: str, raw: np.ndarray, shape: tuple[int, int], type_size: int,
                 dtype: str = "F32") -> QuantizedTensor:
    """The record of one GGUF tensor: ``raw`` its blocks as uint8 ``[R, row_bytes]`` (rows already in the
    transformers order), ``shape`` its ``[R, C]``."""
    fields = blocks.unpack(type_name, raw, type_size)
    tree = _Tree(name, shape, dtype)
    return tree.b.finish(TREES[type_name](tree, fields), info={"method": "import", "format": "gguf",
                                                                "gguf_type": type_name})
