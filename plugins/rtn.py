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
from ._quantizers import dequantize, expand_columns, gptq_codes, gptq_params, grouped


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
        cols = w.shape[1]
        group = effective_group(config.group_size, cols)
        stats = [gptq_params(part, bits, sym) for part in grouped(w, group)]
        scale = torch.stack([s for s, _ in stats], dim=1)
        zero = torch.stack([z for _, z in stats], dim=1)
        scale_full, zero_full = expand_columns(scale, group, cols), expand_columns(zero, group, cols)
        codes = gptq_codes(w, scale_full, zero_full, bits)
        deq = dequantize(codes, scale_full, zero_full)
        b = record_builder(layer)
        info = {"method": self.name, "params": config.to_params()}
        qt = b.finish(affine_record(b, codes, scale, zero, bits, group, sym), info)
        return MethodResult(qt, deq, info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(RTN())
