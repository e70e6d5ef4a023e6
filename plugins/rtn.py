"""RTN: round-to-nearest with GPTQ's min-max quantizer (the `--nearest` baseline), per row or per column group."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.plugin import LayerInput, Method, hookimpl

from ._common import (
    MethodResult,
    MinMaxConfig,
    QuantizesThroughRun,
    affine_record,
    effective_group,
    record_builder,
    weight_matrix,
)
from ._quantizers import gptq_params, gptq_round


def rtn_quantize(w: torch.Tensor, bits: int, sym: bool, group: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, dequantized weight, scale [R, G], zero [R, G]) of GPTQ's min-max quantizer on groups of ``group``
    columns (codes as floats holding integers, scales fp16-exact).

    Group by group into preallocated outputs: a whole-matrix formula holds ~6 temporaries of the weight's size
    (measured +659 MiB peak for a 49152 x 576 output layer), this holds codes and the dequantized weight."""
    cols = w.shape[1]
    codes, deq = torch.empty_like(w), torch.empty_like(w)
    scales, zeros = [], []
    for lo in range(0, cols, group):
        part = w[:, lo:lo + group]
        scale, zero = gptq_params(part, bits, sym)
        scales.append(scale)
        zeros.append(zero)
        torch.div(part, scale[:, None], out=codes[:, lo:lo + group])
        gptq_round(codes[:, lo:lo + group], zero[:, None], bits)
        torch.sub(codes[:, lo:lo + group], zero[:, None], out=deq[:, lo:lo + group]).mul_(scale[:, None])
    return codes, deq, torch.stack(scales, dim=1), torch.stack(zeros, dim=1)


@dataclass(frozen=True)
class RTNConfig(MinMaxConfig):
    """rtn's parameters: those of GPTQ's min-max quantizer (bits, group_size, sym)."""

    method = "rtn"


class RTN(QuantizesThroughRun, Method):
    config = RTNConfig
    description = ("Round-to-nearest (GPTQ's quantizer, no calibration): per row or per group of input columns, "
                   "asymmetric (integer zero, stored packed) or symmetric; fp16 scales.")
    calibration = frozenset()


    def run(self, layer: LayerInput, config: RTNConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        bits, sym = config.bits, config.sym
        w = weight_matrix(layer)
        group = effective_group(config.group_size, w.shape[1])
        codes, deq, scale, zero = rtn_quantize(w, bits, sym, group)
        b = record_builder(layer)
        info = {"method": self.name, "params": config.to_params()}
        qt = b.finish(affine_record(b, codes, scale, zero, bits, group, sym, config.planes), info)
        return MethodResult(qt, deq, info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(RTN())
