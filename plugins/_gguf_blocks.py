"""Split a GGUF tensor's quantized blocks into the fields they store (codes, scales, mins), losslessly.

Every function takes the tensor's raw bytes as uint8 ``[R, nb, type_size]`` (``nb`` blocks per row, blocks running
along the row) and returns arrays laid out over the tensor's rows:

- ``codes``: uint8 ``[R, C]``, the unsigned integers the format packs (GGUF's signed values shifted by the constant
  the format's ``zero`` removes again: Q8_0's int8 ``x`` as ``x + 128``, Q6_K's sub-scales likewise);
- block scales/mins: float16 ``[R, nb]`` (the bytes as stored; ``view``, never a conversion);
- sub-block scales/mins of the K-quants and IQ4_XS: uint8 ``[R, nb * k]``;
- TQ1_0's ``trits``: int8 ``[R, C]`` in {-1, 0, +1}.

The element order inside a block is the one of gguf-py's ``dequantize_blocks`` (``gguf/quants.py``), which in turn
is ggml's (``ggml-common.h``); ``tests/test_import_gguf.py`` checks every type against gguf-py's dequantize.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_NIBBLE = np.array([0, 4], dtype=np.uint8)
_CRUMB = np.array([0, 2, 4, 6], dtype=np.uint8)
_BIT = np.arange(8, dtype=np.uint8)
_POW3_5 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
_POW3_4 = np.array([1, 3, 9, 27], dtype=np.uint8)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte ``start`` of every block, as float16 ``[R, nb]``."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0]


def _flat(blocks: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[R, nb, ...]`` -> ``[R, nb * ...]`` (one row of the tensor)."""
    return np.ascontiguousarray(values).reshape(blocks.shape[0], -1)


def _split(part: np.ndarray, shifts: np.ndarray, mask: int, width: int) -> np.ndarray:
    """Bytes ``[R, nb, n]`` read as ``n // width`` chunks of ``width`` bytes: for each chunk, each shift in turn
    takes ``(byte >> shift) & mask`` of the chunk's bytes. -> ``[R, nb, n * len(shifts)]``."""
    r, nb, n = part.shape
    chunks = part.reshape(r, nb, n // width, 1, width) >> shifts.reshape(1, 1, 1, -1, 1)
    return (chunks & np.uint8(mask)).reshape(r, nb, -1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """32-element blocks of 16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble."""
    return _split(qs, _NIBBLE, 0x0F, qs.shape[-1])


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Bit ``e`` of a little-endian bit field, for e < count: ``[R, nb, count]`` of 0/1."""
    return np.unpackbits(qh, axis=-1, count=count, bitorder="little")


def q4_0(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"d": _f16(b, 0), "codes": _flat(b, _nibbles(b[..., 2:18]))}


def q4_1(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"d": _f16(b, 0), "m": _f16(b, 2), "codes": _flat(b, _nibbles(b[..., 4:20]))}


def q5_0(b: np.ndarray) -> dict[str, np.ndarray]:
    codes = _nibbles(b[..., 6:22]) | (_high_bits(b[..., 2:6], 32) << np.uint8(4))
    return {"d": _f16(b, 0), "codes": _flat(b, codes)}


def q5_1(b: np.ndarray) -> dict[str, np.ndarray]:
    codes = _nibbles(b[..., 8:24]) | (_high_bits(b[..., 4:8], 32) << np.uint8(4))
    return {"d": _f16(b, 0), "m": _f16(b, 2), "codes": _flat(b, codes)}


def q8_0(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"d": _f16(b, 0), "codes": _flat(b, b[..., 2:34] ^ np.uint8(0x80))}  # int8 x -> x + 128


def q2_k(b: np.ndarray) -> dict[str, np.ndarray]:
    scales = b[..., 0:16]
    return {"sc": _flat(b, scales & np.uint8(0x0F)), "mn": _flat(b, scales >> np.uint8(4)),
            "codes": _flat(b, _split(b[..., 16:80], _CRUMB, 0x03, 32)), "d": _f16(b, 80), "dmin": _f16(b, 82)}


def q3_k(b: np.ndarray) -> dict[str, np.ndarray]:
    low = _split(b[..., 32:96], _CRUMB, 0x03, 32)
    high = _split(b[..., 0:32], _BIT, 0x01, 32)  # set bit: no -4 (gguf-py: "the offset is zero when the bit is 1")
    sc = b[..., 96:108]
    sc6 = _split(sc[..., 0:8], _NIBBLE, 0x0F, 8) | (_split(sc[..., 8:12], _CRUMB, 0x03, 4) << np.uint8(4))
    return {"codes": _flat(b, low | (high << np.uint8(2))), "sc": _flat(b, sc6), "d": _f16(b, 108)}


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit sub-scales and sub-mins of a Q4_K/Q5_K block's 12 scale bytes (gguf-py ``get_scale_min``)."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & np.uint8(0x3F), (md & np.uint8(0x0F)) | ((d >> np.uint8(2)) & np.uint8(0x30))], axis=-1)
    mn = np.concatenate([m & np.uint8(0x3F), (md >> np.uint8(4)) | ((m >> np.uint8(2)) & np.uint8(0x30))], axis=-1)
    return sc, mn


def q4_k(b: np.ndarray) -> dict[str, np.ndarray]:
    sc, mn = _scale_min_k4(b[..., 4:16])
    return {"d": _f16(b, 0), "dmin": _f16(b, 2), "sc": _flat(b, sc), "mn": _flat(b, mn),
            "codes": _flat(b, _split(b[..., 16:144], _NIBBLE, 0x0F, 32))}


def q5_k(b: np.ndarray) -> dict[str, np.ndarray]:
    sc, mn = _scale_min_k4(b[..., 4:16])
    codes = _split(b[..., 48:176], _NIBBLE, 0x0F, 32) | (_split(b[..., 16:48], _BIT, 0x01, 32) << np.uint8(4))
    return {"d": _f16(b, 0), "dmin": _f16(b, 2), "sc": _flat(b, sc), "mn": _flat(b, mn), "codes": _flat(b, codes)}


def q6_k(b: np.ndarray) -> dict[str, np.ndarray]:
    codes = _split(b[..., 0:128], _NIBBLE, 0x0F, 64) | (_split(b[..., 128:192], _CRUMB, 0x03, 32) << np.uint8(4))
    return {"codes": _flat(b, codes), "sc": _flat(b, b[..., 192:208] ^ np.uint8(0x80)), "d": _f16(b, 208)}


def iq4_nl(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"d": _f16(b, 0), "codes": _flat(b, _nibbles(b[..., 2:18]))}


def iq4_xs(b: np.ndarray) -> dict[str, np.ndarray]:
    """d (0:2), scales_h (2:4, little-endian uint16: bits 2i, 2i+1 are sub-block i's high bits), scales_l (4:8: low
    nibble of byte j for sub-block 2j, high for 2j + 1), then 8 sub-blocks of 32 codes in 16 bytes each."""
    low = _split(b[..., 4:8], _NIBBLE, 0x0F, 1)
    high = _split(b[..., 2:4], _CRUMB, 0x03, 1)
    return {"d": _f16(b, 0), "sc": _flat(b, low | (high << np.uint8(4))),
            "codes": _flat(b, _split(b[..., 8:136], _NIBBLE, 0x0F, 16))}


def _trits(part: np.ndarray, powers: np.ndarray) -> np.ndarray:
    """TQ1_0's base-3 fixed point: digit k of byte x is ``((x * 3^k mod 256) * 3) >> 8``, element k·n + j."""
    r, nb, n = part.shape
    shifted = part.reshape(r, nb, 1, n) * powers.reshape(1, 1, -1, 1)  # uint8: wraps mod 256, as in ggml
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.int8).reshape(r, nb, -1)


def tq1_0(b: np.ndarray) -> dict[str, np.ndarray]:
    digits = np.concatenate([_trits(b[..., 0:32], _POW3_5), _trits(b[..., 32:48], _POW3_5),
                             _trits(b[..., 48:52], _POW3_4)], axis=-1)
    return {"trits": _flat(b, digits - np.int8(1)), "d": _f16(b, 52)}


def tq2_0(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"codes": _flat(b, _split(b[..., 0:64], _CRUMB, 0x03, 32)), "d": _f16(b, 64)}


UNPACK = {"Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q8_0": q8_0, "Q2_K": q2_k, "Q3_K": q3_k,
          "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k, "IQ4_NL": iq4_nl, "IQ4_XS": iq4_xs, "TQ1_0": tq1_0,
          "TQ2_0": tq2_0}


def unpack(type_name: str, raw: np.ndarray, type_size: int) -> dict[str, np.ndarray]:
    """The fields of ``raw`` (uint8 ``[R, row_bytes]``) for GGUF type ``type_name``."""
    rows = raw.shape[0]
    return UNPACK[type_name](np.asarray(raw, dtype=np.uint8).reshape(rows, -1, type_size))
