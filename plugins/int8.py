"""LLM.int8() (Dettmers et al. 2022): row-wise absmax int8 weights, outlier input features kept in 16-bit.

Weights follow bitsandbytes: ``Int8Params`` casts the weight to fp16 and calls ``int8_vectorwise_quant``
(``backends/default/ops.py``): ``SCB = max|W_row|`` (of the fp16 weight, as fp32), ``CB = round(W · (127 / SCB))``.
Decoding is bitsandbytes' ``int8_vectorwise_dequant``, ``(CB · SCB) · 7.874015718698502e-3`` in fp32.

Outlier features: bitsandbytes finds them per batch at run time (any ``|x| >= threshold`` in an input column). A
weight-only file fixes them from calibration instead: input channels whose max |x| over the calibration tokens reaches
``threshold`` keep their weights in fp16, as the paper's mixed-precision decomposition does; the int8 codes of those
columns are the zero code (bitsandbytes also zeroes those columns on the int8 side).

Storage: ``sum(scale(affine(packed U8 codes = CB + 128, scale=SCB F16 [R, 1], zero=128, [1, C]), 1/127 F32 [1, 1]),
lowrank(fp16 weights of the k outlier columns [R, k], one-hot column selector [k, C] as 1-bit codes))``; without
outlier columns the sum is just its first term. SCB is an fp16 value (the max of fp16 weights), so F16 storage is
exact: 8 bits per weight plus 16 bits per row, plus 16 bits per weight of an outlier column (dense: a sparse_csr
of those columns cost 32, value and column index).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qformat.plugin import LayerInput, Method, MethodConfig, ParameterError, hookimpl, param

from ._common import MethodResult, QuantizesThroughRun, record_builder, weight_matrix
from ._quantizers import fp16_exact

INV_127 = 7.874015718698502e-3  # bitsandbytes int8_vectorwise_dequant's 1/127 (an fp32 constant there)
ZERO_CODE = 128  # unsigned storage of int8 codes: q + 128


def int8_rowwise(w16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes ``int8_vectorwise_quant`` (threshold 0) of fp16-valued weights held in fp32: (CB as int64 in
    [-127, 127], SCB fp32 [R]). A row of zeros has SCB 0 and codes 0 (bitsandbytes would divide by zero there)."""
    scb = w16.abs().amax(dim=1)
    cb = torch.round(w16 * (127.0 / scb.unsqueeze(-1)))
    cb = torch.where(scb.unsqueeze(-1) > 0, cb, 0.0)
    return cb.to(torch.int64), scb


@dataclass(frozen=True)
class Int8Config(MethodConfig):
    """int8's parameters: the outlier-feature threshold."""

    method = "int8"
    threshold: float = param(6.0, "outlier features: input channels with calibration max |x| >= threshold keep fp16 "
                             "weights (HF llm_int8_threshold); 0 = none", min=0.0)


class Int8(QuantizesThroughRun, Method):
    config = Int8Config
    description = ("LLM.int8(): per-row absmax int8 codes identical to bitsandbytes (int8_vectorwise_quant of the "
                   "fp16 weight, SCB per row), with the input channels whose calibration max |x| reaches threshold "
                   "kept as fp16 weights (sparse columns).")
    calibration = frozenset({"act_absmax"})


    def run(self, layer: LayerInput, config: Int8Config | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        rows, cols = w.shape
        outliers = self._outlier_columns(layer, config.threshold, cols)
        w16 = fp16_exact(w)  # bitsandbytes quantizes the fp16 weight (saturated here: an fp16 inf has no code)
        cb, scb = int8_rowwise(w16)
        cb[:, outliers] = 0
        dense = (cb.to(torch.float32) * scb.unsqueeze(-1)) * torch.tensor(INV_127, dtype=torch.float32)

        b = record_builder(layer)
        codes = b.packed("codes", (cb + ZERO_CODE).to(torch.uint8).numpy(), 8)
        int8_node = b.affine(codes, scale=b.tensor("scale", scb.half().unsqueeze(1).numpy()), zero=float(ZERO_CODE), bits=8,
                             group_shape=(1, cols))
        terms = [b.scale(int8_node, b.tensor("inv127", np.full((1, 1), INV_127, dtype=np.float32)), (rows, cols))]
        deq = dense
        n_outliers = int(outliers.sum())
        if n_outliers:
            columns = torch.nonzero(outliers).flatten()
            terms.append(self._outlier_term(b, w16[:, columns].numpy(), columns.numpy(), cols))
            kept = torch.zeros(rows, cols)
            kept[:, outliers] = w16[:, outliers]
            deq = dense + kept  # the sum codec: int8 part (0 in these columns) plus the outlier part (0 elsewhere)
        numel = rows * cols
        info = {"method": self.name, "params": config.to_params(), "outlier_columns": n_outliers,
                "outlier_share": n_outliers / cols,
                "bits_per_weight": sum(a.nbytes for a in b.tensors.values()) * 8 / numel}
        return MethodResult(b.finish(b.sum(terms), info), deq, info)

    @staticmethod
    def _outlier_term(b: Any, weights: np.ndarray, columns: np.ndarray, cols: int) -> Any:
        """The outlier columns' fp16 weights, dense: ``lowrank(a = W16[:, columns] [R, k], b = one-hot [k, C])``.
        Each output element is one product ``a · 1.0`` plus exact zeros, so the decode is exact in any summation
        order; 16 bits per outlier weight (CSR needed 32: an fp16 value and a U16 column index) plus k·C one-hot bits.
        """
        onehot = np.zeros((columns.size, cols), dtype=np.uint8)
        onehot[np.arange(columns.size), columns] = 1
        selector = b.affine(b.packed("outlier_columns", onehot, 1), scale=1.0, bits=1, group_shape=(columns.size, cols))
        return b.lowrank(b.tensor("outliers", weights.astype(np.float16)), selector)

    @staticmethod
    def _outlier_columns(layer: LayerInput, threshold: float, cols: int) -> torch.Tensor:
        """Boolean [C]: input channels whose calibration max |x| reaches the threshold (none when it is 0)."""
        if threshold == 0:
            return torch.zeros(cols, dtype=torch.bool)
        if layer.act_absmax is None:
            raise ParameterError(f"method 'int8' parameter 'threshold': {threshold} needs the calibration statistic "
                                 f"act_absmax for {layer.name}, which was not given (threshold=0 needs none)")
        absmax = torch.as_tensor(layer.act_absmax).detach().to(dtype=torch.float32, device="cpu").reshape(-1)
        if absmax.numel() != cols:
            raise ParameterError(f"method 'int8': act_absmax of {layer.name} has {absmax.numel()} channels, the "
                                 f"weight {cols} input columns")
        return absmax >= threshold


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(Int8())
