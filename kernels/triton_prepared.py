"""A record prepared for the Triton kernels: the repacked plan moved to the device, with matmul and dequantize.

Fused terms run the Triton kernels; sparse outliers (CSR) and low-rank sidecars are cheap and use torch ops;
a permutation gathers x before the terms under it. Everything accumulates in fp32 and is cast to x's dtype once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qformat.kernel_api import PreparedWeight

from . import triton_ops as ops
from . import triton_plan as plan_mod

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _narrow(values: np.ndarray, device: str) -> torch.Tensor:
    """Small float parameters in the narrowest dtype that holds them exactly (kernels widen to fp32)."""
    t = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(-1)  # a copy: file arrays are read-only
    for dtype in (torch.float16, torch.bfloat16):
        narrow = t.to(dtype)
        if torch.equal(narrow.to(torch.float32), t):
            return narrow.to(device)
    return t.to(device)


def _fused_args(term: plan_mod.Fused, device: str) -> ops.FusedArgs:
    n, k = term.shape
    codes = torch.from_numpy(term.codes.words).to(device)
    scale = zero = offset = table = factor = codes  # placeholders for pointers a map does not read
    s_across = t_across = t_size = f_across = 1
    kw = term.codes.padded_cols // 32
    widest = 1 if term.codes.planar else 1 << (term.codes.bits.bit_length() - 1)
    consts: dict[str, Any] = dict(BITS=term.codes.bits, PLANAR=term.codes.planar, KW4=kw % 4 == 0, PER=32 // widest,
                                  OFFSET=term.codes.offset,
                                  MAP=ops.MAPS[term.kind], HAS_ZERO=False, HAS_OFFSET=False, GR=1, GC=1,
                                  TILED=False, TGR=1, TGC=1,
                                  HAS_FACTOR=False, FGR=1, FGC=1, VQ_M=1, VQ_D=1, VQ_VEC=False)
    if term.kind == "affine":
        scale, s_across = _narrow(term.scale.values, device), term.scale.values.shape[1]
        consts.update(GR=term.scale.group[0], GC=term.scale.group[1])
        if term.zero is not None:
            zero = _narrow(term.zero.values, device)
            consts.update(HAS_ZERO=True)
        if term.offset is not None:
            offset = _narrow(term.offset.values, device)
            consts.update(HAS_OFFSET=True)
    elif term.kind == "lut":
        table, t_size = _narrow(term.table, device), term.table.shape[-1]
        if term.table_group is not None:
            t_across = term.table.shape[1]
            consts.update(TILED=True, TGR=term.table_group[0], TGC=term.table_group[1])
    elif term.kind == "vq":
        m, entries, d = term.table.shape
        table, t_size = _narrow(term.table, device), entries
        consts.update(VQ_M=m, VQ_D=d, VQ_VEC=d <= 64 and d & (d - 1) == 0)
    if term.factor is not None:
        factor, f_across = _narrow(term.factor.values, device), term.factor.values.shape[1]
        consts.update(HAS_FACTOR=True, FGR=term.factor.group[0], FGC=term.factor.group[1])
    ints = (kw, s_across, t_across, t_size, f_across)
    return ops.FusedArgs(n, k, (codes, scale, zero, offset, table, factor), ints, consts)


class _Csr:
    """Outliers as (row, column, value) triples: a gather and an index_add per matmul (nnz is small)."""

    def __init__(self, node: plan_mod.Sparse, device: str) -> None:
        self.shape = node.shape
        rows = np.repeat(np.arange(node.shape[0], dtype=np.int32), np.diff(node.row_ptr))
        self.rows = torch.from_numpy(rows).to(device)
        self.cols = torch.from_numpy(node.col_idx.astype(np.int32)).to(device)
        self.values = _narrow(node.values, device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.rows, self.cols, self.values]


class _LowRank:
    def __init__(self, node: plan_mod.LowRank, device: str) -> None:
        self.a = torch.from_numpy(node.a).to(device)
        self.b = torch.from_numpy(node.b).to(device)


class _Permute:
    def __init__(self, node: plan_mod.Permute, device: str) -> None:
        self.perm = torch.from_numpy(node.perm).to(device)
        self.inner = _convert(node.inner, device)


def _convert(node: Any, device: str) -> Any:
    if isinstance(node, plan_mod.Fused):
        return _fused_args(node, device)
    if isinstance(node, plan_mod.Sum):
        return [_convert(t, device) for t in node.terms]
    if isinstance(node, plan_mod.Sparse):
        return _Csr(node, device)
    if isinstance(node, plan_mod.LowRank):
        return _LowRank(node, device)
    if isinstance(node, plan_mod.Permute):
        return _Permute(node, device)
    raise TypeError(f"unexpected plan node {type(node).__name__}")


class TritonWeight(PreparedWeight):
    def __init__(self, root: Any, shape: tuple[int, int], device: str) -> None:
        self.out_features, self.in_features = shape
        self.device = device
        self.root = _convert(root, device)
        # A fixed launch ({"BN", "BK", "SPLIT_K"}) instead of autotuning / the interpreter's large blocks: for tests
        # and benchmarks that must run one particular configuration.
        self.config: dict[str, int] | None = None
        # Batch-1 launch frozen after the first autotuned call (single fused term on a GPU): see ops.FrozenGemv.
        self._gemv: ops.FrozenGemv | None = None

    # -- matmul -------------------------------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the weight takes {self.in_features}")
        lead = x.shape[:-1]
        if self._gemv is not None and x.numel() == self.in_features and x.dtype in X_DTYPES:
            return self._gemv(x.reshape(1, self.in_features).contiguous()).reshape(*lead, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype not in X_DTYPES:
            x2 = x2.float()
        x2 = x2.contiguous()
        if x2.shape[0] > plan_mod.MAX_BATCH:
            y = x2.float() @ self.dequantize().T
        else:
            y = torch.zeros(x2.shape[0], self.out_features, dtype=torch.float32, device=x2.device)
            if x2.shape[0]:
                self._matmul(self.root, x2, y)
                if x2.shape[0] == 1:
                    self._freeze_gemv()
        return y.to(x.dtype if x.dtype.is_floating_point else torch.float32).reshape(*lead, self.out_features)

    def _freeze_gemv(self) -> None:
        """After the first autotuned batch-1 call on a GPU, bind the launch it chose (one fused term only)."""
        if self.config is not None or ops.INTERPRET or not ops.AUTOTUNE or not isinstance(self.root, ops.FusedArgs):
            return
        config = ops.tuned_gemv_config()
        if config is not None:
            self._gemv = ops.FrozenGemv(self.root, config)

    def _matmul(self, node: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        if isinstance(node, ops.FusedArgs):
            ops.matmul_into(node, x, y, self.config)
        elif isinstance(node, list):
            for term in node:
                self._matmul(term, x, y)
        elif isinstance(node, _Permute):
            self._matmul(node.inner, x.index_select(1, node.perm).contiguous(), y)
        elif isinstance(node, _Csr):
            y.index_add_(1, node.rows, x.index_select(1, node.cols).float() * node.values.float())
        elif isinstance(node, _LowRank):
            y += (x.float() @ node.b.T) @ node.a.T

    # -- dequantize ---------------------------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        return self._dequantize(self.root)

    def _dequantize(self, node: Any) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if isinstance(node, ops.FusedArgs):
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
            ops.dequantize(node, out, None if self.config is None else
                           {"BN": self.config["BN"], "BK": self.config["BK"]})
            return out
        if isinstance(node, list):  # left to right, like the reference
            out = self._dequantize(node[0])
            for term in node[1:]:
                out = out + self._dequantize(term)
            return out
        if isinstance(node, _Permute):
            inner = self._dequantize(node.inner)
            out = torch.empty_like(inner)
            out[:, node.perm] = inner
            return out
        if isinstance(node, _Csr):
            out = torch.zeros(shape, dtype=torch.float32, device=self.device)
            out[node.rows, node.cols] = node.values.float()
            return out
        if isinstance(node, _LowRank):
            return node.a @ node.b
        raise TypeError(f"unexpected node {type(node).__name__}")

    # -- accounting ---------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        seen: dict[int, int] = {}

        def visit(node: Any) -> None:
            tensors: list[torch.Tensor] = []
            if isinstance(node, ops.FusedArgs):
                tensors = list(node.tensors)
            elif isinstance(node, list):
                for term in node:
                    visit(term)
            elif isinstance(node, _Permute):
                tensors = [node.perm]
                visit(node.inner)
            elif isinstance(node, _Csr):
                tensors = node.tensors()
            elif isinstance(node, _LowRank):
                tensors = [node.a, node.b]
            for t in tensors:
                seen[t.data_ptr()] = t.numel() * t.element_size()

        visit(self.root)
        return sum(seen.values())
