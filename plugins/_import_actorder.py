"""Group index per input column (GPTQ's ``g_idx``, compressed-tensors' ``weight_g_idx``) -> how a record lays the
groups out: plain tiles, a ``permute`` that makes the groups contiguous, or one parameter per column."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qformat.errors import SourceError


@dataclass(frozen=True)
class Columns:
    """``kind``: "plain" (column c is in group c // group), "permute" (after the stable sort ``perm`` of ``g_idx``
    the groups are contiguous tiles of ``group`` columns, the last one possibly shorter) or "columns" (neither: the
    group of each column has to be spelled out)."""

    kind: str
    perm: np.ndarray | None = None


def column_groups(g_idx: np.ndarray | None, cols: int, group: int, groups: int, *, file: str,
                  tensor: str) -> Columns:
    if g_idx is None:
        return Columns("plain")
    if g_idx.shape != (cols,) or g_idx.dtype.kind not in "iu":
        raise SourceError(f"g_idx is {g_idx.dtype} {list(g_idx.shape)} where int [{cols}] is expected", file=file,
                          tensor=tensor, field="g_idx")
    g_idx = np.asarray(g_idx, dtype=np.int64)
    if cols and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise SourceError(f"g_idx holds group {int(g_idx.min() if g_idx.min() < 0 else g_idx.max())} of {groups}",
                          file=file, tensor=tensor, field="g_idx")
    tiles = np.arange(cols, dtype=np.int64) // group
    if np.array_equal(g_idx, tiles):
        return Columns("plain")
    perm = np.argsort(g_idx, kind="stable")
    if np.array_equal(g_idx[perm], tiles):
        return Columns("permute", perm)
    return Columns("columns")
