"""Load-time repacking of canonical code layouts (packed, bit-planes, ternary, integer tensors) into sliced words.

The target layout is described in ``numba_gemv``: words [R, T, 16] uint32, column c in lane c % 16 of tile
(c // 16) // cpw at bit offset ((c // 16) % cpw) * bits. Each function streams rows straight from the canonical bytes
(no full-size temporaries), ORs codes into zeroed ``words`` and returns the largest code seen (for range checks).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .numba_gemv import LANES, codes_per_word, padded_cols


def empty_words(rows: int, cols: int, bits: int) -> np.ndarray:
    tiles = padded_cols(cols, bits) // (LANES * codes_per_word(bits))
    return np.zeros((rows, tiles, LANES), dtype=np.uint32)


@njit(cache=True, inline="always")
def _place(words, r, c, code, bits, cpw):  # pragma: no cover - compiled
    s = c >> 4
    t = s // cpw
    words[r, t, c & 15] |= np.uint32(code) << np.uint32((s - t * cpw) * bits)


@njit(parallel=True, cache=True)
def words_from_packed(src, src_bits, cols, bits, words):  # pragma: no cover - compiled
    """src: uint8 [R, ceil(cols*src_bits/8)], each row an LSB-first stream of src_bits-wide codes."""
    rows, nbytes = src.shape
    cpw = 32 // bits
    mask = (1 << src_bits) - 1
    top = np.zeros(rows, dtype=np.int64)
    for r in prange(rows):
        best = 0
        for c in range(cols):
            pos = c * src_bits
            byte = pos >> 3
            chunk = np.int64(src[r, byte])
            if byte + 1 < nbytes:
                chunk |= np.int64(src[r, byte + 1]) << 8
            if byte + 2 < nbytes:
                chunk |= np.int64(src[r, byte + 2]) << 16
            code = (chunk >> (pos & 7)) & mask
            best = max(best, code)
            _place(words, r, c, code, bits, cpw)
        top[r] = best
    return top.max() if rows else 0


@njit(parallel=True, cache=True)
def words_from_bitplanes(planes, cols, bits, words):  # pragma: no cover - compiled
    """planes: uint8 [P, R, ceil(cols/8)], plane 0 the most significant bit."""
    n_planes, rows, _ = planes.shape
    cpw = 32 // bits
    top = np.zeros(rows, dtype=np.int64)
    for r in prange(rows):
        best = 0
        for c in range(cols):
            code = 0
            for p in range(n_planes):
                code = (code << 1) | ((planes[p, r, c >> 3] >> (c & 7)) & 1)
            best = max(best, code)
            _place(words, r, c, code, bits, cpw)
        top[r] = best
    return top.max() if rows else 0


@njit(parallel=True, cache=True)
def words_from_ternary(src, cols, words):  # pragma: no cover - compiled
    """src: uint8 [R, ceil(cols/5)], byte = sum_i (v_i + 1) 3**i; stores v + 1 as 2-bit codes.

    Returns 0 when every byte is < 243 and every pad digit is zero (the spec's validity rule), else 1.
    """
    rows, nbytes = src.shape
    bad = np.zeros(rows, dtype=np.int64)
    for r in prange(rows):
        for i in range(nbytes):
            byte = np.int64(src[r, i])
            if byte >= 243:
                bad[r] = 1
            for j in range(5):
                digit = byte % 3
                byte //= 3
                c = i * 5 + j
                if c < cols:
                    _place(words, r, c, digit, 2, 16)
                elif digit != 0:
                    bad[r] = 1
    return bad.max() if rows else 0


@njit(parallel=True, cache=True)
def words_from_ints(codes, bits, words):  # pragma: no cover - compiled
    """codes: integer [R, C] already in [0, 2**bits); returns (min, max) for the caller's range check."""
    rows, cols = codes.shape
    cpw = 32 // bits
    lo = np.zeros(rows, dtype=np.int64)
    hi = np.zeros(rows, dtype=np.int64)
    for r in prange(rows):
        a = np.int64(0)
        b = np.int64(0)
        for c in range(cols):
            code = np.int64(codes[r, c])
            a = min(a, code)
            b = max(b, code)
            if code >= 0 and code < (1 << bits):
                _place(words, r, c, code, bits, cpw)
        lo[r] = a
        hi[r] = b
    return (lo.min(), hi.max()) if rows else (0, 0)
