"""The Numba part of the rotate-numba kernel: x' = s * H_b (signs * x), blockwise, by a fast Walsh-Hadamard
transform (Sylvester order, the H_b of spec/hadamard.md). Imported at the first matmul: compiling takes a second."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, nogil=True, cache=False)
def _rotate_rows(x: np.ndarray, signs: np.ndarray, block: int, scale: np.float32, out: np.ndarray) -> None:
    rows, cols = x.shape
    for r in numba.prange(rows):
        for c in range(cols):
            out[r, c] = x[r, c] * signs[c]
        for start in range(0, cols, block):
            half = 1
            while half < block:  # H_2n = [[H_n, H_n], [H_n, -H_n]]: butterflies of growing span
                for lo in range(start, start + block, 2 * half):
                    for j in range(lo, lo + half):
                        a = out[r, j]
                        b = out[r, j + half]
                        out[r, j] = a + b
                        out[r, j + half] = a - b
                half *= 2
        for c in range(cols):
            out[r, c] *= scale


def rotate_inputs(x: np.ndarray, signs: np.ndarray, block: int, scale: np.float32) -> np.ndarray:
    """x [N, C] fp32 -> s * H_b (signs * x) per block of ``block`` columns, fp32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _rotate_rows(x, np.ascontiguousarray(signs, dtype=np.float32), block, np.float32(scale), out)
    return out
