"""Decode-and-multiply straight from QMoE's dictionary-coded ternary stream (``ternary_dict`` under a ``lut``).

Records of the form ``lut(ternary_dict, table, group [1, C] with a table [R, 1, K] | a 1-D table)`` (``qmoe
stream=true``) are kept as their codewords (~0.7-1.7 bits per weight) instead of being expanded: per row, the kernel
walks its codewords, each a run of up to 28 weights, adds x at the run's low and high weights (one 8-byte record per
codeword, precomputed once from the dictionary), skips the zeros, and returns ``t0 (Σx − a1 − a2) + t1 a1 + t2 a2``
(QMoE's CUDA kernel decodes every weight with one warp per row). Rows run in parallel. Measured at 4096² on 2 threads:
8 ms, 0.15x fp32 (bench/GEMV_NOTES.md): branch-bound, a storage format more than a fast one on CPU.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
from numba import prange

from qformat.format import QuantizedTensor, check_record, ternary_dict
from qformat.kernel_api import PreparedWeight

from .numba_plan import stream_form  # noqa: F401  (re-exported: what this module runs)

DEBRUIJN = np.uint32(0x077CB531)  # de Bruijn multiply: the index of a 32-bit word's lowest set bit


@functools.lru_cache(maxsize=1)
def codeword_records() -> tuple[np.ndarray, np.ndarray]:
    """One uint64 per codeword: bits 0-27 mark its low weights, 28-55 its high weights (positions within its run of up
    to 28), 56-59 its length in pairs; and the de Bruijn table of lowest-set-bit positions. One 8-byte read per
    codeword, then only its nonzero weights are touched (11.5% under QMoE's statistics)."""
    symbols, lengths = ternary_dict.dictionary()
    weights = np.zeros((len(lengths), 2 * ternary_dict.MAX_PAIRS), dtype=np.uint64)
    weights[:, 0::2] = symbols % 3
    weights[:, 1::2] = symbols // 3
    position = np.uint64(1) << np.arange(2 * ternary_dict.MAX_PAIRS, dtype=np.uint64)
    low = ((weights == 1) * position).sum(axis=1, dtype=np.uint64)
    high = ((weights == 2) * position).sum(axis=1, dtype=np.uint64)
    packed = low | (high << np.uint64(28)) | (lengths.astype(np.uint64) << np.uint64(56))
    table = np.zeros(32, dtype=np.uint8)
    for j in range(32):  # the product wraps modulo 2^32, as the kernel's uint32 arithmetic does
        table[(((1 << j) * int(DEBRUIJN)) & 0xFFFFFFFF) >> 27] = j
    return packed, table


@numba.njit(parallel=True, cache=True)
def stream_matmul(words, row_ptr, records, debruijn, table, x, y):  # pragma: no cover - compiled
    """y[b, r] = t0 (Σx − a1 − a2) + t1 a1 + t2 a2 with a_s the sum of x over row r's weights of symbol s (every
    weight has exactly one symbol; pad weights are symbol 0 and never read)."""
    batch, cols = x.shape
    rows = row_ptr.shape[0] - 1
    total = np.empty(batch, dtype=np.float32)
    for b in range(batch):
        total[b] = x[b].sum()
    mask28 = np.uint64(0x0FFFFFFF)
    for r in prange(rows):
        for b in range(batch):
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            col = 0
            for k in range(row_ptr[r], row_ptr[r + 1]):
                rec = records[words[k]]
                m = np.uint32(rec & mask28)
                while m != 0:
                    lsb = m & (~m + np.uint32(1))
                    a1 += x[b, col + debruijn[np.uint32(lsb * np.uint32(0x077CB531)) >> np.uint32(27)]]
                    m ^= lsb
                m = np.uint32((rec >> np.uint64(28)) & mask28)
                while m != 0:
                    lsb = m & (~m + np.uint32(1))
                    a2 += x[b, col + debruijn[np.uint32(lsb * np.uint32(0x077CB531)) >> np.uint32(27)]]
                    m ^= lsb
                col += 2 * int(rec >> np.uint64(56))
            y[b, r] = table[r, 0] * (total[b] - a1 - a2) + table[r, 1] * a1 + table[r, 2] * a2


class StreamPrepared(PreparedWeight):
    """A ``ternary_dict`` record for :func:`stream_matmul`: the codewords as stored, the dictionary, the levels."""

    def __init__(self, qt: QuantizedTensor) -> None:
        node = qt.record["weight"]
        codes = node["codes"]
        self.out_features, self.in_features = codes["shape"]
        self._qt = qt
        # every data check the reference decoder makes (row pointers, pair counts, pad symbols), range by range
        check_record(qt.name, qt.record, qt.tensor_info, qt.tensors.__getitem__)
        self.words = np.ascontiguousarray(qt.tensors[codes["tensor"]], dtype=np.uint16)
        self.row_ptr = np.ascontiguousarray(qt.tensors[codes["row_ptr"]], dtype=np.int64)
        table = np.asarray(qt.tensors[node["table"]["tensor"]], dtype=np.float32)
        table = np.broadcast_to(table.reshape(-1, table.shape[-1])[:, :3], (self.out_features, 3))
        self.table = np.ascontiguousarray(table)
        self.records, self.debruijn = codeword_records()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous().numpy()
        y = np.empty((x2.shape[0], self.out_features), dtype=np.float32)
        stream_matmul(self.words, self.row_ptr, self.records, self.debruijn, self.table, x2, y)
        return torch.from_numpy(y).reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(self._qt.decode())

    def nbytes(self) -> int:
        return int(self.words.nbytes + self.row_ptr.nbytes + self.table.nbytes)
