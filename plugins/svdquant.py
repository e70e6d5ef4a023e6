"""SVDQuant (Li et al. 2024), following mit-han-lab/deepcompressor (`calib/lowrank.py` QuantLowRankCalibrator,
`nn/patch/lowrank.py`, `examples/diffusion/configs/svdquant/__default__.yaml` and `int4.yaml`), weight-only.

Two parts, registered here:

- the ``smooth`` block transform (:mod:`._smooth_transform`): SmoothQuant-style per-channel scales
  s = max|x|^alpha / max|W|^(1-alpha), folded into the preceding norm / linear, a ColumnScale where nothing precedes
  (usable alone: ``--transform smooth --method rtn``);
- the ``svdquant`` method (declares ``transforms = ("smooth",)``): a rank-r low-rank branch L absorbs what is hard to
  quantize and the residual is quantized with rtn's group quantizer. Iterated as the reference does:
  L = top-r SVD(W − Q_prev) (Q_prev = 0 first), Q = quantize(W − L); each candidate is scored by the output error
  tr(ΔW H ΔWᵀ), ΔW = W − (Q + L), H the layer's calibration Hessian; the best is kept, and the loop stops at the first
  candidate that does not improve on it (the reference's early_stop, num_iters 100).

The reference's weights are ``sint4`` with group 64 and no scale dtype (symmetric, no zero point); here that is rtn's
symmetric quantizer (GPTQ's: range ±max|w|, zero 8, fp16 scale = 2·max|w|/15) at 4 bits, groups of 64: the closest
quantizer qformat stores, not the reference's [-8, 7] grid (scale max|w|/7) exactly. The reference scores with the
activations quantized as well (W4A4) and ties continue its loop; this method is weight-only and stops at a tie.

Storage: ``sum(affine(packed codes, fp16 scale [R, G], zero), lowrank(a, b))`` in one record (roles codes, scale,
[zero], sidecar.a, sidecar.b), the low-rank factors in F16 (``sidecar_bits=8``: 8-bit rows with F16 scales,
:func:`qformat.sidecar.lowrank_node`). Rank 0 is plain RTN: the affine record alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qformat.plugin import (
    BlockInput,
    BlockResult,
    LayerInput,
    Method,
    MethodConfig,
    ParameterError,
    RecordBuilder,
    Transform,
    TransformConfig,
    hookimpl,
    output_error,
    param,
)
from qformat.sidecar import fit_lowrank, lowrank_node

from ._common import MethodResult, QuantizesThroughRun, affine_record, effective_group, record_builder, weight_matrix
from ._smooth_transform import smooth_block
from .rtn import rtn_quantize

GROUP_HELP = ("input columns sharing one scale; -1 or 0 = one group per row (need not divide the row: the last group "
              "may be shorter)")
SYM_HELP = ("symmetric range ±max|w| with the fixed zero (maxq+1)/2 (SVDQuant's sint4 has no zero point); false: "
            "[min, max] with a bits-wide integer zero")
ALPHA_HELP = "migration strength: s = max|x|^alpha / max|W|^(1-alpha) (used when n_grid = 0)"
GRID_HELP = ("0: alpha fixed; n > 0: search deepcompressor's beta=-2 grid of 2n-1 (alpha, beta) candidates (no scaling "
             "included) by the pair's output error with the weights quantized (bits, group_size, sym)")


@dataclass(frozen=True)
class SmoothConfig(TransformConfig):
    """The smoothing transform's parameters; bits, group_size, sym, alpha and n_grid default to a method's of the same
    name (svdquant's: 4, 64, true)."""

    transform = "smooth"
    alpha: float = param(0.5, ALPHA_HELP, min=0.0, max=1.0)
    n_grid: int = param(0, GRID_HELP, min=0, max=1000)
    bits: int = param(4, "bits of the quantizer the grid search scores with", min=2, max=8)
    group_size: int = param(64, GROUP_HELP, min=-1, max=1 << 20)
    sym: bool = param(True, "the grid search's quantizer: " + SYM_HELP)
    fold: bool = param(True, "fold the scales into the preceding norm / linear where the block layout allows; false: "
                       "every selected linear gets a ColumnScale input transform (deepcompressor's "
                       "fuse_when_possible=false)")


class SmoothTransform(Transform):
    config = SmoothConfig
    description = ("SmoothQuant-style smoothing (SVDQuant's): per norm/linear -> linears pair, s = max|x|^alpha / "
                   "max|W|^(1-alpha) per input channel (alpha fixed, or searched on a grid by the quantized output "
                   "error), folded into the norm or previous linear's rows and the linears' columns; a selected linear "
                   "without such a pair (o_proj under GQA) gets a ColumnScale.")

    def apply(self, block: BlockInput, config: SmoothConfig) -> BlockResult:
        block.layout  # noqa: B018  # raises SkipBlock for a layout it does not know, before anything changes
        transforms, units = smooth_block(block, config.alpha, config.n_grid, config.bits, config.group_size,
                                         config.sym, config.fold)
        return BlockResult(dict(transforms), {"units": units})


@dataclass(frozen=True)
class SVDQuantConfig(MethodConfig):
    """svdquant's parameters: the quantizer's (bits, group_size, sym), the low-rank branch's (rank, iterations,
    weighted_svd, sidecar_bits); alpha and n_grid go to the smooth transform (always run first)."""

    method = "svdquant"
    bits: int = param(4, "bits per weight code of the residual", min=2, max=8)
    group_size: int = param(64, GROUP_HELP, min=-1, max=1 << 20)
    sym: bool = param(True, SYM_HELP)
    rank: int = param(32, "rank of the low-rank branch (0: plain RTN)", min=0, max=1 << 16)
    iterations: int = param(100, "most candidates (L, Q) tried; stops earlier at the first non-improvement", min=1,
                            max=10000)
    weighted_svd: bool = param(False, "fit L by the activation-weighted SVD (minimise ‖(E − L) H^½‖) instead of the "
                               "plain SVD of the reference")
    sidecar_bits: int = param(16, "storage of the low-rank factors: 16 (F16) or 8 (8-bit rows, F16 row scales)",
                              choices=(8, 16))
    alpha: float = param(0.5, "smooth transform: " + ALPHA_HELP, min=0.0, max=1.0)
    n_grid: int = param(0, "smooth transform: " + GRID_HELP, min=0, max=1000)


@dataclass
class _Candidate:
    a: torch.Tensor
    b: torch.Tensor
    low: torch.Tensor
    codes: torch.Tensor
    deq: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    error: float


def svdquant_iterate(w: torch.Tensor, hessian: torch.Tensor | None, bits: int, group: int, sym: bool, rank: int,
                     iterations: int, weighted: bool, sidecar_bits: int, name: str = "w"
                     ) -> tuple[_Candidate, list[float]]:
    """The best (L, Q) candidate and the output error of every candidate tried (the last one did not improve unless
    ``iterations`` ran out or rank is 0). L is the low-rank product as stored (F16 or 8-bit factors)."""
    rows, cols = w.shape
    q_prev = torch.zeros_like(w)
    best: _Candidate | None = None
    history: list[float] = []
    for _ in range(iterations):
        a, b = fit_lowrank(w - q_prev, rank, hessian if weighted else None)
        if a.shape[1]:
            _, low = lowrank_node(RecordBuilder(name, (rows, cols), "F32"), a, b, sidecar_bits)  # scratch builder
        else:
            low = torch.zeros_like(w)
        codes, deq, scale, zero = rtn_quantize(w - low, bits, sym, group)
        error = output_error(w - (deq + low), hessian)
        history.append(error)
        if best is not None and not error < best.error:
            break
        best = _Candidate(a, b, low, codes, deq, scale, zero, error)
        if not a.shape[1]:
            break  # rank 0: nothing to alternate
        q_prev = deq
    assert best is not None
    return best, history


class SVDQuant(QuantizesThroughRun, Method):
    config = SVDQuantConfig
    description = ("SVDQuant (weight-only): the smooth transform, then per linear a rank-32 low-rank branch (F16) and "
                   "the residual in rtn's symmetric 4-bit groups of 64, alternated L = SVD_r(W - Q), Q = RTN(W - L) "
                   "while the output error tr(dW H dW^T) falls; stored sum(affine, lowrank).")
    calibration = frozenset({"hessian"})
    transforms = ("smooth",)

    def run(self, layer: LayerInput, config: SVDQuantConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        group = effective_group(config.group_size, w.shape[1])
        hessian = None if layer.hessian is None else torch.as_tensor(layer.hessian, dtype=torch.float32).cpu()
        if config.weighted_svd and hessian is None:
            raise ParameterError(f"method 'svdquant' parameter 'weighted_svd': {layer.name} has no calibration "
                                 "Hessian (calibrate, or set weighted_svd=false)")
        best, history = svdquant_iterate(w, hessian, config.bits, group, config.sym, config.rank, config.iterations,
                                         config.weighted_svd, config.sidecar_bits, layer.name)
        b = record_builder(layer)
        base = affine_record(b, best.codes, best.scale, best.zero, config.bits, group, config.sym)
        rank = int(best.a.shape[1])
        if rank:
            node, _ = lowrank_node(b, best.a, best.b, config.sidecar_bits)
            base = b.sum([base, node])
        info = {"method": self.name, "params": config.to_params(),
                "svdquant": {"rank": rank, "iterations_run": len(history), "output_error_history": history,
                             "output_error": best.error, "hessian": hessian is not None}}
        qt = b.finish(base, info)
        # What the file decodes to, exactly (the product of the factors is the decoder's own).
        dequantized = torch.from_numpy(np.asarray(qt.decode(), dtype=np.float32).reshape(w.shape).copy())
        return MethodResult(qt, dequantized, info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(SVDQuant())


@hookimpl
def qformat_register_transforms(register: Any) -> None:
    register(SmoothTransform())
