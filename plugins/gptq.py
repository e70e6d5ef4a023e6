"""GPTQ (Frantar et al. 2022): Hessian-aware rounding with error feedback, following IST-DASLab/gptq `fasterquant`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.plugin import LayerInput, Method, ParameterError, hookimpl, param

from ._common import (
    MethodResult,
    MinMaxConfig,
    QuantizesThroughRun,
    affine_record,
    effective_group,
    record_builder,
    weight_matrix,
)
from ._gptq_core import check_hessian, column_blocks, error_feedback, prepare_hessian
from ._quantizers import dequantize, gptq_codes, gptq_params, grouped


@dataclass(frozen=True)
class GPTQConfig(MinMaxConfig):
    """gptq's parameters: the min-max quantizer's (bits, group_size, sym) and the error feedback's."""

    method = "gptq"
    damp: float = param(0.01, "relative damping (percdamp): damp * mean(diag H) is added to diag H", min=0.0,
                        max=10.0)
    block_size: int = param(128, "columns per lazy batch update (speed only)", min=1, max=1 << 16)
    act_order: bool = param(False, "quantize columns in order of decreasing Hessian diagonal")
    static_groups: bool = param(False, "fit every group's scale/zero up front on the original W (needs groups)")

    def check(self) -> None:
        if self.static_groups and self.group_size <= 0:
            raise ParameterError("method 'gptq' parameter 'static_groups': needs group_size > 0 (per-row parameters "
                                 "are always fitted up front)")


class GPTQ(QuantizesThroughRun, Method):
    config = GPTQConfig
    description = (
        "GPTQ: per-column rounding with Hessian error feedback (reference fasterquant: dead inputs zeroed, damping "
        "relative to mean diag H, U = chol(H^-1) upper, lazy block updates). Group scale/zero are fitted when a "
        "group starts, from the weights updated so far (blocks are cut at group starts so every fit sees all updates; "
        "identical to the reference for group_size 128 = block_size). Scales are rounded to fp16 before codes are "
        "computed, so the file decodes to exactly what the error feedback assumed. act_order with groups fits groups "
        "over the act-order (permuted) column order (GPTQ-R style, as the reference's dynamic groups do) and stores "
        "permute(affine(codes in that order)); "
        "with per-row parameters or static_groups (fitted up front on the unpermuted W, as the reference does) the "
        "processing order leaves no trace in the parameters, so the plain affine in input order is stored.")
    calibration = frozenset({"hessian"})


    def run(self, layer: LayerInput, config: GPTQConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        bits, sym = config.bits, config.sym
        w = weight_matrix(layer)
        rows, cols = w.shape
        group = effective_group(config.group_size, cols)
        per_row = group == cols
        static = config.static_groups and not per_row
        h = check_hessian(layer.hessian, cols, layer.name)

        row_params = gptq_params(w, bits, sym) if per_row else None  # the reference fits these before zeroing dead
        prep = prepare_hessian(h, percdamp=config.damp, use_act_order=config.act_order, layer=layer.name)
        w[:, prep.dead] = 0.0
        static_params = [gptq_params(part, bits, sym) for part in grouped(w, group)] if static else None
        perm = prep.perm
        wt = (w[:, perm] if perm is not None else w).T.contiguous()  # processing order, one row per input column

        n_groups = -(-cols // group)
        scales = torch.empty(n_groups, rows)  # per group, in the order groups are defined (see description)
        zeros = torch.empty(n_groups, rows)
        codes_t = torch.empty(cols, rows)
        current: list[tuple[torch.Tensor, torch.Tensor]] = [row_params] if per_row else []

        def start_group(j: int, part: torch.Tensor) -> None:
            s, z = gptq_params(part.T, bits, sym)
            scales[j // group], zeros[j // group] = s, z
            current[:] = [(s, z)]

        def quantize_column(j: int, col: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            if static_params is not None:
                s, z = static_params[(int(perm[j]) if perm is not None else j) // group]
            else:
                s, z = current[0]
            q = gptq_codes(col, s, z, bits)
            codes_t[j] = q
            return dequantize(q, s, z)

        dynamic = not per_row and not static
        blocks = column_blocks(cols, config.block_size, group if dynamic else 0)
        loss = error_feedback(wt, prep.u, blocks, quantize_column, start_group if dynamic else None, group)

        codes, deq = codes_t.T, wt.T
        if per_row:
            scale, zero = row_params[0][:, None], row_params[1][:, None]
        elif static:
            scale = torch.stack([s for s, _ in static_params], dim=1)
            zero = torch.stack([z for _, z in static_params], dim=1)
        else:
            scale, zero = scales.T, zeros.T
        permuted_layout = perm is not None and dynamic
        if perm is not None:
            inverse = torch.argsort(perm)
            deq = deq[:, inverse]
            if not permuted_layout:
                codes = codes[:, inverse]

        b = record_builder(layer)
        node = affine_record(b, codes, scale, zero, bits, group, sym, config.planes)
        if permuted_layout:
            node = b.permute(node, perm.numpy())
        info = {"method": self.name, "params": config.to_params(), "damp_used": prep.damp,
                "cholesky_retries": prep.retries, "dead_inputs": int(prep.dead.sum()), "proxy_loss": loss}
        return MethodResult(b.finish(node, info), deq.contiguous(), info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(GPTQ())
