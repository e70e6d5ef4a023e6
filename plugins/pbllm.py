"""PB-LLM (Shang et al. 2023), its post-training form GPTQ-PB: a small share of salient weights kept at 8 bits, the
rest binarized, with GPTQ error feedback.

Follows hahnyuan/PB-LLM ``gptq_pb/gptq.py`` (``LowHighGPT.fasterquant``) with the paper's settings (``xnor`` low
quantizer, ``--high_bit 8``, ``--salient_metric hessian``):

- dead inputs zeroed, relative damping, ``U = chol(H^-1)`` upper (GPTQ);
- per group of columns (default the whole row, as the reference's ``--groupsize -1``), the salient weights are the
  ``salient_fraction`` largest of ``w² / U_jj²`` over the group's columns of all rows (``|w|`` with
  ``salient_metric=magnitude``); the mask is fixed before the column loop;
- the binarized weights of a row (per group) take two levels ``mean ± scale``: ``mean`` the row's mean of the weight
  with the salient positions zeroed, ``scale`` the mean of ``|that − mean|`` (the reference's ``xnor`` calibrate,
  zeros included as it does); a weight becomes ``mean + scale`` if ``w ≥ mean`` else ``mean − scale``;
- salient weights: 8-bit asymmetric min-max per row, fitted on the whole original row (``HighQuantizer(8,
  perchannel=True, sym=False)``);
- GPTQ's column loop (lazy blocks of 128) quantizes each column with both quantizers and keeps the salient one where
  the mask says so.

Storage: ``sum(affine v2 (1-bit plane, scale = 2 scale F16, zero = 0.5, offset = mean F16, group [1, g]),
sparse_csr(salient positions, F16 corrections))``: the plane gives ``mean ± scale`` everywhere, and the sparse term
adds, at each salient position, the fp16 difference between the 8-bit value and the plane's value there (the error
feedback sees the value so stored). Bits from bytes: 1 + 32 bits per salient weight (fp16 value, 16-bit column index)
+ the row pointers and statistics; the paper's "1.7 bits at 10% salient" counts 8 bits per salient weight and no
index, so the same bits here hold fewer salient weights (``salient_fraction`` ≈ 0.02 for 1.7 bits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.plugin import LayerInput, Method, MethodConfig, ParameterError, hookimpl, param

from ._common import MethodResult, QuantizesThroughRun, effective_group, record_builder, sparse_outliers, weight_matrix
from ._gptq_core import check_hessian, column_blocks, error_feedback, prepare_hessian
from ._quantizers import dequantize, fp16_exact, gptq_codes, gptq_params, largest_share, to_fp16, to_uint8

HIGH_BITS = 8  # PB-LLM's --high_bit 8


@dataclass(frozen=True)
class PBLLMConfig(MethodConfig):
    """pbllm's parameters: the salient share and metric, the binarization groups, the error feedback."""

    method = "pbllm"
    salient_fraction: float = param(0.02, "share of weights kept at 8 bits (1 - the reference's low_frac); each "
                                    "costs 32 bits in the file (fp16 value + column index)", min=0.0, max=0.5)
    salient_metric: str = param("hessian", "how salient weights are chosen: w^2 / U_jj^2 (hessian) or |w| "
                                "(magnitude)", choices=("hessian", "magnitude"))
    group_size: int = param(-1, "input columns sharing one binarization mean/scale and one salient quantile; -1 or "
                            "0 = the whole row (reference default); a multiple of block_size otherwise",
                            min=-1, max=1 << 20)
    damp: float = param(0.01, "relative damping (percdamp)", min=0.0, max=10.0)
    block_size: int = param(128, "columns per lazy batch update (speed only)", min=1, max=1 << 16)

    def check(self) -> None:
        if self.group_size > 0 and self.group_size % self.block_size:
            raise ParameterError(f"method 'pbllm' parameter 'group_size': {self.group_size} is not a multiple of "
                                 f"block_size {self.block_size} (the reference's assertion); choose a multiple, "
                                 "or -1 for whole rows")


class PBLLM(QuantizesThroughRun, Method):
    config = PBLLMConfig
    description = ("PB-LLM (GPTQ-PB): the most salient weights (w^2 / U_jj^2) kept at 8 bits per row, the rest "
                   "binarized to mean ± scale per row (or group), GPTQ error feedback over both; stored as a 1-bit "
                   "affine plane plus fp16 sparse corrections.")
    calibration = frozenset({"hessian"})

    def run(self, layer: LayerInput, config: PBLLMConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        rows, cols = w.shape
        group = effective_group(config.group_size, cols)
        h = check_hessian(layer.hessian, cols, layer.name)
        high_scale, high_zero = gptq_params(w, HIGH_BITS, sym=False)  # on the original W, as calibrate() runs first
        prep = prepare_hessian(h, percdamp=config.damp, use_act_order=False, layer=layer.name)
        w[:, prep.dead] = 0.0

        n_groups = -(-cols // group)
        salient = torch.zeros(rows, cols, dtype=torch.bool)
        scale2 = torch.empty(rows, n_groups)  # the plane's stored scale, 2 * scale
        mean = torch.empty(rows, n_groups)
        diag = torch.diagonal(prep.u)
        for j in range(n_groups):
            part = slice(j * group, min((j + 1) * group, cols))
            wg = w[:, part]
            score = wg.abs() if config.salient_metric == "magnitude" else wg.square() / diag[part].square()
            salient[:, part] = largest_share(score, config.salient_fraction)
            low = wg * ~salient[:, part]
            m = low.mean(dim=1)
            mean[:, j] = fp16_exact(m)
            scale2[:, j] = fp16_exact(2.0 * (low - m.unsqueeze(1)).abs().mean(dim=1))

        wt = w.T.contiguous()
        plane_t = torch.empty(cols, rows, dtype=torch.uint8)
        corr_t = torch.zeros(cols, rows)

        def quantize_column(j: int, col: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            m, s2 = mean[:, j // group], scale2[:, j // group]
            bit = (col >= m).to(torch.float32)
            low = ((bit - 0.5) * s2) + m  # affine version 2's decode: ((q - zero) * scale) + offset
            high = dequantize(gptq_codes(col, high_scale, high_zero, HIGH_BITS), high_scale, high_zero)
            keep = salient[:, j]
            corr = torch.where(keep, fp16_exact(high - low), 0.0)
            plane_t[j], corr_t[j] = bit.to(torch.uint8), corr
            return low + corr  # the sum codec: plane term, then the sparse term (0 off the mask)

        loss = error_feedback(wt, prep.u, column_blocks(cols, config.block_size), quantize_column)
        b = record_builder(layer)
        plane = b.affine(b.packed("plane", to_uint8(plane_t.T), 1), scale=b.tensor("scale", to_fp16(scale2)),
                         zero=0.5, bits=1, group_shape=(1, group), offset=b.tensor("mean", to_fp16(mean)))
        corr = corr_t.T
        node = plane if not salient.any() else b.sum([plane, sparse_outliers(b, salient, corr[salient], "salient")])
        info = {"method": self.name, "params": config.to_params(), "salient": int(salient.sum()),
                "damp_used": prep.damp, "dead_inputs": int(prep.dead.sum()), "proxy_loss": loss}
        return MethodResult(b.finish(node, info), wt.T.contiguous(), info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(PBLLM())
