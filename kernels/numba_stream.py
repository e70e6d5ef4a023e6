"""Decode-and-multiply straight from QMoE's dictionary-coded ternary stream (``ternary_dict`` under a ``lut``).

Records of the form ``lut(ternary_dict, table, group [1, C] with a table [R, 1, K] | a 1-D table)`` (``qmoe
stream=true``) are kept as their codewords (~0.7-1.7 bits per weight) instead of being expanded: per row, the kernel
walks its codewords, each a run of up to 14 pairs of ternary symbols, sums x into one accumulator per symbol, and
returns ``Σ_s table[r, s] · acc_s`` (QMoE's CUDA kernel does the same with one warp per row). Rows run in parallel.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from qformat.format import QuantizedTensor, ternary_dict
from qformat.kernel_api import PreparedWeight

from .numba_plan import stream_form  # noqa: F401  (re-exported: what this module runs)


@numba.njit(parallel=True, cache=True)
def stream_matmul(words, row_ptr, symbols, lengths, table, x, y):  # pragma: no cover - compiled
    """y[b, r] = Σ_s table[r, s] Σ_{c: symbol s} x[b, c]; symbols [65536, 14] pair symbols, lengths [65536]."""
    batch, cols = x.shape
    rows = row_ptr.shape[0] - 1
    for r in prange(rows):
        for b in range(batch):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            col = 0
            for k in range(row_ptr[r], row_ptr[r + 1]):
                w = words[k]
                for j in range(lengths[w]):
                    p = symbols[w, j]
                    first = p % 3
                    second = p // 3
                    v = x[b, col]
                    if first == 1:
                        a1 += v
                    elif first == 2:
                        a2 += v
                    else:
                        a0 += v
                    if col + 1 < cols:
                        v = x[b, col + 1]
                        if second == 1:
                            a1 += v
                        elif second == 2:
                            a2 += v
                        else:
                            a0 += v
                    col += 2
            y[b, r] = table[r, 0] * a0 + table[r, 1] * a1 + table[r, 2] * a2


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
        self.symbols, self.lengths = ternary_dict.dictionary()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous().numpy()
        y = np.empty((x2.shape[0], self.out_features), dtype=np.float32)
        stream_matmul(self.words, self.row_ptr, self.symbols, self.lengths, self.table, x2, y)
        return torch.from_numpy(y).reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(self._qt.decode())

    def nbytes(self) -> int:
        return int(self.words.nbytes + self.row_ptr.nbytes + self.table.nbytes)
