"""The one CSR validator (spec/components.md#sparse_csr) shared by the reference decoder and the kernels.

Every check compares stored values directly, before any arithmetic on them: ``np.diff`` of a hostile I64 ``row_ptr``
such as ``[0, 2**63 - 1, -2, 1]`` wraps around to non-negative steps, and ``np.repeat`` with those steps writes past
its buffer (a segmentation fault, not an exception).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# fail(code, message, field) -> the exception to raise; field is "row_ptr" or "col_idx", relative to the CSR node.
Fail = Callable[[str, str, str], Exception]


def check_row_ptr(row_ptr: np.ndarray, nnz: int, fail: Fail) -> None:
    """``row_ptr`` starts at 0, never decreases, ends at ``nnz``; every entry lies in [0, nnz] (``bad_index``)."""
    ptr = np.asarray(row_ptr)
    if (ptr.ndim != 1 or ptr.shape[0] < 1 or ptr.dtype.kind not in "iu" or int(ptr[0]) != 0
            or int(ptr[-1]) != nnz or np.any(ptr[1:] < ptr[:-1]) or int(ptr.min()) < 0 or int(ptr.max()) > nnz):
        raise fail("bad_index", f"row_ptr must start at 0, never decrease, and end at nnz={nnz}", "row_ptr")


def rows_of(row_ptr: np.ndarray, first_row: int = 0) -> np.ndarray:
    """The row of every stored value, for a ``row_ptr`` slice that :func:`check_row_ptr` accepted (int64)."""
    ptr = np.asarray(row_ptr, dtype=np.int64)
    return np.repeat(np.arange(first_row, first_row + ptr.shape[0] - 1, dtype=np.int64), ptr[1:] - ptr[:-1])


def check_col_idx(col_idx: np.ndarray, row_of: np.ndarray, cols: int, fail: Fail) -> None:
    """Every column index in [0, cols) (``index_out_of_range``), strictly increasing within a row (``bad_index``)."""
    idx = np.asarray(col_idx)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= cols):
        raise fail("index_out_of_range", f"col_idx must lie in [0, {cols}), found [{int(idx.min())}, "
                   f"{int(idx.max())}]", "col_idx")
    if idx.size > 1 and np.any((row_of[1:] == row_of[:-1]) & (idx[1:] <= idx[:-1])):
        raise fail("bad_index", "col_idx must strictly increase within a row", "col_idx")


def validate_csr(row_ptr: np.ndarray, col_idx: np.ndarray, cols: int, fail: Fail) -> np.ndarray:
    """Run every CSR data check in the spec's order; return the row of every stored value (int64 [nnz])."""
    nnz = int(np.asarray(col_idx).shape[0])
    check_row_ptr(row_ptr, nnz, fail)
    row_of = rows_of(row_ptr)
    check_col_idx(col_idx, row_of, cols, fail)
    return row_of
