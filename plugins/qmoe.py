"""QMoE ternary (Frantar & Alistarh 2023): per-row levels {xmin, 0, xmax} with GPTQ error feedback.

Follows IST-DASLab/qmoe ``quant.py`` (``Quantizer(bits=1.5)``) and ``gptq.py`` (``batch_gptq``):

- per row, fitted once on the original weight: ``xmin = min(W_row, 0)``, ``xmax = max(W_row, 0)``; a row of zeros gets
  (-1, +1);
- a weight becomes ``xmax`` if ``w > xmax / 2``, ``xmin`` if ``w < xmin / 2``, else 0 (strict comparisons);
- GPTQ's column loop with relative damping ``percdamp`` (QMoE default 0.1), lazy blocks of 128, no groups.

The levels are stored in BF16, as QMoE's ``ter_minmax``; they are rounded before the loop so the error feedback sees the
stored values. Storage (spec/composition.md "QMoE ternary"): ``lut(packed 2-bit codes, per-row table [R, 1, 4] =
(xmin, 0, xmax, 0))`` with ``group_shape [1, C]``: 2 bits per weight plus 64 bits per row. With ``stream=true`` the
codes are QMoE's dictionary-coded stream instead (``ternary_dict`` codec, ``qformat.format.ternary_dict.encode``): ``lut(ternary_dict,
table [R, 1, 3] = (0, xmin, xmax))``, 16-bit codewords of up to 14 pairs of weights, bits per weight from the bytes
(≈ 0.74 at QMoE's 88.5% zeros; more than 2 when far fewer weights are zero, as in small dense models).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import torch

from qformat.format import ternary_dict
from qformat.plugin import LayerInput, Method, MethodConfig, hookimpl, param

from ._common import MethodResult, QuantizesThroughRun, record_builder, weight_matrix
from ._gptq_core import check_hessian, column_blocks, error_feedback, prepare_hessian

CODE_MIN, CODE_ZERO, CODE_MAX = 0, 1, 2  # codes into the per-row table (xmin, 0, xmax, unused)
STREAM_SYMBOL = (1, 0, 2)  # code -> QMoE's stream symbol (0 zero, 1 low, 2 high) for stream=true


def ternary_levels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QMoE's ``find_params`` for ternary: (xmin, xmax) per row, 0 forced into the range, BF16-rounded, as fp32 [R]."""
    zero = torch.zeros(w.shape[0])
    xmin = torch.minimum(w.min(dim=1).values, zero)
    xmax = torch.maximum(w.max(dim=1).values, zero)
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1.0, 1.0
    return xmin.bfloat16().float(), xmax.bfloat16().float()


def ternary_codes(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor) -> torch.Tensor:
    """QMoE's ``quantize`` with ``maxq < 0``, as codes: xmax where x > xmax / 2, xmin where x < xmin / 2, else zero."""
    codes = torch.full(x.shape, CODE_ZERO, dtype=torch.int64)
    codes[x > xmax / 2] = CODE_MAX
    codes[x < xmin / 2] = CODE_MIN
    return codes


@dataclass(frozen=True)
class QMoEConfig(MethodConfig):
    """qmoe's parameters: the error feedback's."""

    method = "qmoe"
    damp: float = param(0.1, "relative damping (percdamp, QMoE default 0.1): damp * mean(diag H) added to diag H",
                        min=0.0, max=10.0)
    block_size: int = param(128, "columns per lazy batch update (speed only)", min=1, max=1 << 16)
    act_order: bool = param(False, "quantize columns in order of decreasing Hessian diagonal (levels are per row, "
                            "so the file does not change shape)")
    stream: bool = param(False, "store the codes as QMoE's dictionary-coded stream (ternary_dict codec: 16-bit "
                         "codewords of up to 28 weights; ~0.74 bits/weight at 88.5% zeros, over 2 bits below ~65%)")


class QMoE(QuantizesThroughRun, Method):
    config = QMoEConfig
    description = ("QMoE ternary: per-row levels {min(W_row, 0), 0, max(W_row, 0)} (BF16), a weight goes to a level "
                   "past half of it, GPTQ error feedback (percdamp 0.1); stored as 2-bit codes into a per-row table.")
    calibration = frozenset({"hessian"})

    def run(self, layer: LayerInput, config: QMoEConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        rows, cols = w.shape
        h = check_hessian(layer.hessian, cols, layer.name)
        xmin, xmax = ternary_levels(w)  # fitted on the original W, before dead inputs are zeroed (as GPTQ does)
        prep = prepare_hessian(h, percdamp=config.damp, use_act_order=config.act_order, layer=layer.name)
        w[:, prep.dead] = 0.0
        perm = prep.perm
        wt = (w[:, perm] if perm is not None else w).T.contiguous()
        codes_t = torch.empty(cols, rows, dtype=torch.int64)
        levels = torch.stack([xmin, torch.zeros(rows), xmax])  # [3, R]: code -> value per row

        def quantize_column(j: int, col: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            q = ternary_codes(col, xmin, xmax)
            codes_t[j] = q
            return levels.gather(0, q.unsqueeze(0)).squeeze(0)

        loss = error_feedback(wt, prep.u, column_blocks(cols, config.block_size), quantize_column)
        codes, deq = codes_t.T, wt.T
        if perm is not None:
            inverse = torch.argsort(perm)
            codes, deq = codes[:, inverse], deq[:, inverse]

        b = record_builder(layer)
        table = torch.stack([xmin, torch.zeros(rows), xmax, torch.zeros(rows)], dim=1).reshape(rows, 1, 4)
        if config.stream:  # QMoE's symbols: 0 zero, 1 low, 2 high; the table in that order
            symbols = torch.tensor(STREAM_SYMBOL)[codes].numpy()
            words, row_ptr = ternary_dict.encode(symbols)
            codes_node = b.node("ternary_dict", 1, tensor=b.store("codewords", words), row_ptr=b.store("row_ptr", row_ptr),
                                shape=[rows, cols], dictionary="qmoe")
            table = torch.stack([torch.zeros(rows), xmin, xmax], dim=1).reshape(rows, 1, 3)
        else:
            codes_node = b.packed("codes", codes.to(torch.uint8).numpy(), 2)
        levels_bf16 = table.bfloat16().view(torch.int16).numpy().view(ml_dtypes.bfloat16)  # exact: already BF16
        node = b.lut(codes_node, b.tensor("levels", levels_bf16), (1, cols))
        info = {"method": self.name, "params": config.to_params(), "damp_used": prep.damp,
                "dead_inputs": int(prep.dead.sum()), "proxy_loss": loss,
                "zero_fraction": float((codes == CODE_ZERO).float().mean())}
        return MethodResult(b.finish(node, info), deq.contiguous(), info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(QMoE())
