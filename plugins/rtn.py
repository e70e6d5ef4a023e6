"""RTN: round-to-nearest with GPTQ's min-max quantizer (the `--nearest` baseline), per row or per column group."""

from __future__ import annotations

from typing import Any

import torch

from qformat.format import QuantizedTensor
from qformat.hookspecs import hookimpl
from qformat.methods import LayerInput, Method

from ._common import BITS, GROUP_SIZE, SYM, MethodResult, affine_record, effective_group, record_builder, weight_matrix
from ._quantizers import dequantize, expand_columns, gptq_codes, gptq_params, grouped, json_params


class RTN(Method):
    name = "rtn"
    description = ("Round-to-nearest (GPTQ's quantizer, no calibration): per row or per group of input columns, "
                   "asymmetric (integer zero, stored packed) or symmetric; fp16 scales.")
    params = (BITS, GROUP_SIZE, SYM)
    calibration = frozenset()

    def quantize(self, layer: LayerInput, params: dict[str, Any]) -> QuantizedTensor:
        return self.run(layer, params).qt

    def run(self, layer: LayerInput, params: dict[str, Any]) -> MethodResult:
        params = self.validate_params(params)
        bits, sym = params["bits"], params["sym"]
        w = weight_matrix(layer)
        cols = w.shape[1]
        group = effective_group(params["group_size"], cols)
        stats = [gptq_params(part, bits, sym) for part in grouped(w, group)]
        scale = torch.stack([s for s, _ in stats], dim=1)
        zero = torch.stack([z for _, z in stats], dim=1)
        scale_full, zero_full = expand_columns(scale, group, cols), expand_columns(zero, group, cols)
        codes = gptq_codes(w, scale_full, zero_full, bits)
        deq = dequantize(codes, scale_full, zero_full)
        b = record_builder(layer)
        info = {"method": self.name, "params": json_params(params)}
        qt = b.finish(affine_record(b, codes, scale, zero, bits, group, sym), info)
        return MethodResult(qt, deq, info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(RTN)
