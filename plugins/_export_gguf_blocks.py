"""Pack the fields of a GGUF quantized tensor (codes, scales, mins) into its blocks, byte for byte: the inverse of
the GGUF importer's ``_gguf_blocks`` (element order of gguf-py's ``dequantize_blocks``, i.e. ggml's ``ggml-common.h``).

Every function takes fields laid out over the tensor's rows and returns uint8 ``[R, nb * type_size]``:

- ``q``: unsigned codes uint8 ``[R, C]`` as the block stores them (Q4_0's ``x + 8``, Q3_K's ``low | high << 2``
  where a set high bit means "no -4", Q6_K's ``x + 32``, TQ2_0's ``t + 1``); Q8_0 takes ``x`` int8 instead;
- ``d``/``m``/``dmin``: float16 ``[R, nb]`` (one per block or super-block; written as their bits);
- ``sc``/``mn``: the K-quants' and IQ4_XS's sub-block scales and mins, uint8 ``[R, nb * k]`` (Q6_K's ``sc`` is
  int8);
- TQ1_0's ``t``: int8 ``[R, C]`` in {-1, 0, 1}, re-encoded in ggml's base-3 fixed point
  (``ceil(v * 256 / 243)``, first trit in the highest digit), as gguf-py's ``quantize`` writes it.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_NIBBLE = (0, 4)
_CRUMB = (0, 2, 4, 6)
_BIT = tuple(range(8))
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "IQ4_NL": 32, "Q2_K": QK_K, "Q3_K": QK_K,
         "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K, "IQ4_XS": QK_K, "TQ1_0": QK_K, "TQ2_0": QK_K}


def _rows(values: np.ndarray, blocks: int) -> np.ndarray:
    """``[R, nb * n]`` -> ``[R, nb, n]``."""
    values = np.ascontiguousarray(values)
    return values.reshape(values.shape[0], blocks, -1)


def _f16(values: np.ndarray) -> np.ndarray:
    """float16 ``[R, nb]`` -> its bytes ``[R, nb, 2]``."""
    half = np.ascontiguousarray(values, dtype=np.float16)
    return half.view(np.uint8).reshape(*half.shape, 2)


def _join(values: np.ndarray, shifts: tuple[int, ...], width: int) -> np.ndarray:
    """Inverse of the importer's ``_split``: values ``[R, nb, n * len(shifts)]`` (per chunk of ``width`` bytes, each
    shift in turn over the chunk's bytes) -> bytes ``[R, nb, n]``."""
    r, nb, total = values.shape
    v = values.astype(np.uint8).reshape(r, nb, total // (len(shifts) * width), len(shifts), width)
    out = np.zeros((r, nb, v.shape[2], width), dtype=np.uint8)
    for i, shift in enumerate(shifts):
        out |= (v[:, :, :, i, :] << np.uint8(shift)).astype(np.uint8)
    return out.reshape(r, nb, -1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """32-element blocks -> 16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble."""
    return _join(q & np.uint8(0x0F), _NIBBLE, q.shape[-1] // 2)


def _bits(q: np.ndarray) -> np.ndarray:
    """One bit per element, little-endian bit order."""
    return np.packbits(q.astype(np.uint8) & np.uint8(1), axis=-1, bitorder="little")


def _blocks(parts: list[np.ndarray]) -> np.ndarray:
    out = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(out.reshape(out.shape[0], -1))


def q4_0(d, q):
    nb = d.shape[1]
    return _blocks([_f16(d), _nibbles(_rows(q, nb))])


def q4_1(d, m, q):
    nb = d.shape[1]
    return _blocks([_f16(d), _f16(m), _nibbles(_rows(q, nb))])


def q5_0(d, q):
    nb = d.shape[1]
    q = _rows(q, nb)
    return _blocks([_f16(d), _bits(q >> np.uint8(4)), _nibbles(q)])


def q5_1(d, m, q):
    nb = d.shape[1]
    q = _rows(q, nb)
    return _blocks([_f16(d), _f16(m), _bits(q >> np.uint8(4)), _nibbles(q)])


def q8_0(d, x):
    nb = d.shape[1]
    return _blocks([_f16(d), _rows(np.asarray(x, dtype=np.int8), nb).view(np.uint8)])


def q2_k(d, dmin, sc, mn, q):
    nb = d.shape[1]
    scales = (_rows(sc, nb) & np.uint8(0x0F)) | (_rows(mn, nb) << np.uint8(4))
    return _blocks([scales.astype(np.uint8), _join(_rows(q, nb), _CRUMB, 32), _f16(d), _f16(dmin)])


def q3_k(d, sc, q):
    nb = d.shape[1]
    q = _rows(q, nb)
    sc = _rows(sc, nb)
    hmask = _join(q >> np.uint8(2), _BIT, 32)
    qs = _join(q & np.uint8(3), _CRUMB, 32)
    scales = np.concatenate([_join(sc & np.uint8(0x0F), _NIBBLE, 8), _join(sc >> np.uint8(4), _CRUMB, 4)], axis=-1)
    return _blocks([hmask, qs, scales, _f16(d)])


def _scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit sub-scales and sub-mins -> the 12 scale bytes of a Q4_K/Q5_K block (inverse of ``get_scale_min``)."""
    d = sc[..., 0:4] | ((sc[..., 4:8] >> np.uint8(4)) << np.uint8(6))
    m = mn[..., 0:4] | ((mn[..., 4:8] >> np.uint8(4)) << np.uint8(6))
    md = (sc[..., 4:8] & np.uint8(0x0F)) | ((mn[..., 4:8] & np.uint8(0x0F)) << np.uint8(4))
    return np.concatenate([d, m, md], axis=-1).astype(np.uint8)


def q4_k(d, dmin, sc, mn, q):
    nb = d.shape[1]
    return _blocks([_f16(d), _f16(dmin), _scale_min_k4(_rows(sc, nb), _rows(mn, nb)),
                    _join(_rows(q, nb) & np.uint8(0x0F), _NIBBLE, 32)])


def q5_k(d, dmin, sc, mn, q):
    nb = d.shape[1]
    q = _rows(q, nb)
    return _blocks([_f16(d), _f16(dmin), _scale_min_k4(_rows(sc, nb), _rows(mn, nb)),
                    _join(q >> np.uint8(4), _BIT, 32), _join(q & np.uint8(0x0F), _NIBBLE, 32)])


def q6_k(d, sc, q):
    nb = d.shape[1]
    q = _rows(q, nb)
    ql = _join(q & np.uint8(0x0F), _NIBBLE, 64)
    qh = _join(q >> np.uint8(4), _CRUMB, 32)
    return _blocks([ql, qh, _rows(np.asarray(sc, dtype=np.int8), nb).view(np.uint8), _f16(d)])


def iq4_nl(d, q):
    return q4_0(d, q)


def iq4_xs(d, sc, q):
    """``d``, then the sub-scales' high 2 bits (a little-endian uint16, bits 2i and 2i + 1 for sub-block i) and
    low 4 bits (two per byte, low nibble first), then 8 sub-blocks of 32 codes in 16 bytes each."""
    nb = d.shape[1]
    sc = _rows(sc, nb)
    high = _join(sc >> np.uint8(4), _CRUMB, 1)
    low = _join(sc & np.uint8(0x0F), _NIBBLE, 1)
    return _blocks([_f16(d), high, low, _join(_rows(q, nb) & np.uint8(0x0F), _NIBBLE, 16)])


_POW5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)
_POW4 = np.array([81, 27, 9, 3], dtype=np.uint16)


def _trit_bytes(t: np.ndarray, count: int, powers: np.ndarray) -> np.ndarray:
    """``[R, nb, count * k]`` digits in {0, 1, 2} (digit j of byte i at ``j * count + i``) -> ``count`` bytes."""
    r, nb, _ = t.shape
    v = (t.reshape(r, nb, len(powers), count).astype(np.uint16) * powers.reshape(1, 1, -1, 1)).sum(axis=2)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def tq1_0(d, t):
    nb = d.shape[1]
    digits = (_rows(np.asarray(t, dtype=np.int8), nb) + np.int8(1)).astype(np.uint8)
    return _blocks([_trit_bytes(digits[..., 0:160], 32, _POW5), _trit_bytes(digits[..., 160:240], 16, _POW5),
                    _trit_bytes(digits[..., 240:256], 4, _POW4), _f16(d)])


def tq2_0(d, q):
    nb = d.shape[1]
    return _blocks([_join(_rows(q, nb), _CRUMB, 32), _f16(d)])


PACK = {"Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q8_0": q8_0, "Q2_K": q2_k, "Q3_K": q3_k,
        "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k, "IQ4_NL": iq4_nl, "IQ4_XS": iq4_xs, "TQ1_0": tq1_0,
        "TQ2_0": tq2_0}


def pack(type_name: str, fields: dict[str, np.ndarray]) -> np.ndarray:
    """The blocks of ``type_name`` holding ``fields`` (see the module docstring), uint8 ``[R, row_bytes]``."""
    return PACK[type_name](**fields)
