"""Decode-and-multiply straight from QMoE's dictionary-coded ternary stream (``ternary_dict`` under a ``lut``).

Records of the form ``lut(ternary_dict, table, group [1, C] with a table [R, 1, K] | a 1-D table)`` (``qmoe
stream=true``) are kept as their codewords (~0.7-1.7 bits per weight) instead of being expanded: per row, the kernel
walks its codewords, each a run of up to 28 weights, adds x at the run's low and high weights (per-codeword lists
precomputed once from the dictionary), skips the zeros, and returns ``t0 (Σx − a1 − a2) + t1 a1 + t2 a2`` (QMoE's
CUDA kernel decodes every weight with one warp per row). Rows run in parallel.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
from numba import prange

from qformat.format import QuantizedTensor, ternary_dict
from qformat.kernel_api import PreparedWeight

from .numba_plan import stream_form  # noqa: F401  (re-exported: what this module runs)


@functools.lru_cache(maxsize=1)
def nonzero_lists() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per codeword, the offsets (within its run of up to 28 weights) of its low and of its high weights, as two CSR
    lists (ptr int32 [65537], offsets uint8), and its run length in weights (uint8 [65536]): the kernel then touches
    only the nonzero weights (11.5% under QMoE's statistics) and skips zero runs in one step."""
    symbols, lengths = ternary_dict.dictionary()
    weights = np.zeros((len(lengths), 2 * ternary_dict.MAX_PAIRS), dtype=np.uint8)
    weights[:, 0::2] = symbols % 3
    weights[:, 1::2] = symbols // 3
    span = np.arange(weights.shape[1])[None, :] < (2 * lengths.astype(np.int64))[:, None]
    out = []
    for level in (1, 2):
        hit = (weights == level) & span
        ptr = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(hit.sum(axis=1), out=ptr[1:])
        out += [ptr, np.nonzero(hit)[1].astype(np.uint8)]
    return out[0], out[1], out[2], out[3], (2 * lengths).astype(np.uint8)


@numba.njit(parallel=True, cache=True)
def stream_matmul(words, row_ptr, low_ptr, low_off, high_ptr, high_off, run, table, x, y):  # pragma: no cover
    """y[b, r] = t0 (Σx − a1 − a2) + t1 a1 + t2 a2 with a_s the sum of x over row r's weights of symbol s (every
    weight has exactly one symbol; pad weights are symbol 0 and never read)."""
    batch, cols = x.shape
    rows = row_ptr.shape[0] - 1
    total = np.empty(batch, dtype=np.float32)
    for b in range(batch):
        total[b] = x[b].sum()
    for r in prange(rows):
        for b in range(batch):
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            col = 0
            for k in range(row_ptr[r], row_ptr[r + 1]):
                w = words[k]
                for t in range(low_ptr[w], low_ptr[w + 1]):
                    a1 += x[b, col + low_off[t]]
                for t in range(high_ptr[w], high_ptr[w + 1]):
                    a2 += x[b, col + high_off[t]]
                col += run[w]
            y[b, r] = table[r, 0] * (total[b] - a1 - a2) + table[r, 1] * a1 + table[r, 2] * a2


class StreamPrepared(PreparedWeight):
    """A ``ternary_dict`` record for :func:`stream_matmul`: the codewords as stored, the dictionary, the levels."""

    def __init__(self, qt: QuantizedTensor) -> None:
        node = qt.record["weight"]
        codes = node["codes"]
        self.out_features, self.in_features = codes["shape"]
        self._qt = qt
        qt.decode()  # every data check the reference decoder makes (row pointers, pair counts, pad symbols)
        self.words = np.ascontiguousarray(qt.tensors[codes["tensor"]], dtype=np.uint16)
        self.row_ptr = np.ascontiguousarray(qt.tensors[codes["row_ptr"]], dtype=np.int64)
        table = np.asarray(qt.tensors[node["table"]["tensor"]], dtype=np.float32)
        table = np.broadcast_to(table.reshape(-1, table.shape[-1])[:, :3], (self.out_features, 3))
        self.table = np.ascontiguousarray(table)
        self.lists = nonzero_lists()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous().numpy()
        y = np.empty((x2.shape[0], self.out_features), dtype=np.float32)
        stream_matmul(self.words, self.row_ptr, *self.lists, self.table, x2, y)
        return torch.from_numpy(y).reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(self._qt.decode())

    def nbytes(self) -> int:
        return int(self.words.nbytes + self.row_ptr.nbytes + self.table.nbytes)
