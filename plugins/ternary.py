"""BitNet b1.58 ternary weights (Ma et al. 2024), absmean scaling, applied after training.

Follows transformers' ``integrations/bitnet.py`` ``WeightQuant.forward`` in fp32: ``s = 1 / mean|W|.clamp(1e-5)``,
``t = round(W * s).clamp(-1, 1)``, dequantized ``t / s``. Per tensor by default (as BitNet), or per output row.

Storage (spec/composition.md "BitNet b1.58"): ``scale(ternary t, factor)`` with the factor ``1 / s`` as F32, one value
(``group_shape [R, C]``) or one per row (``[1, C]``): ``t * fp32(1 / s)`` equals the reference's ``t / s`` bit for bit,
since t is -1, 0 or +1 (except the sign of zero: the reference gives -0.0 for small negative weights, a trit +0). 1.6 bits per weight (five trits a byte) plus the factor.

BitNet is trained for this grid (quantization-aware); applied post hoc to a model that was not, quality collapses,
as its authors say. The method is here to write such files and to measure exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qformat.plugin import LayerInput, Method, MethodConfig, hookimpl, param

from ._common import MethodResult, QuantizesThroughRun, record_builder, weight_matrix

ABSMEAN_FLOOR = 1e-5  # WeightQuant: weight.abs().mean().clamp_(min=1e-5)


def absmean_ternary(w: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in {-1, 0, 1} as fp32 [R, C], the factor 1 / s as fp32 [R, 1] or [1, 1]), in WeightQuant's fp32 arithmetic."""
    mean = w.abs().mean(dim=1, keepdim=True) if per_row else w.abs().mean().reshape(1, 1)
    s = 1.0 / mean.clamp(min=ABSMEAN_FLOOR)
    t = (w * s).round().clamp(-1, 1) + 0.0  # + 0.0: a trit has no -0 (the reference keeps round's -0.0)
    return t, 1.0 / s


@dataclass(frozen=True)
class TernaryConfig(MethodConfig):
    """ternary's parameters: the scale's granularity."""

    method = "ternary"
    per_row: bool = param(False, "one absmean scale per output row instead of one per tensor (BitNet: per tensor)")


class Ternary(QuantizesThroughRun, Method):
    config = TernaryConfig
    description = ("BitNet b1.58 absmean ternary: t = round(W / mean|W|) clamped to {-1, 0, 1}, one fp32 scale per "
                   "tensor (or per row), identical to transformers' WeightQuant; 1.6 bits per weight. Trained-for "
                   "grid: applied post hoc it loses most of a model's quality.")

    def run(self, layer: LayerInput, config: TernaryConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        rows, cols = w.shape
        t, factor = absmean_ternary(w, config.per_row)
        b = record_builder(layer)
        trits = b.ternary("trits", t.to(torch.int8).numpy())
        node = b.scale(trits, b.tensor("scale", factor.numpy().astype(np.float32)),
                       (1, cols) if config.per_row else (rows, cols))
        zeros = float((t == 0).float().mean())
        info = {"method": self.name, "params": config.to_params(), "zero_fraction": zeros}
        return MethodResult(b.finish(node, info), t * factor, info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(Ternary())
