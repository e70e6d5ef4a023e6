"""SpQR (Dettmers et al. 2023): small groups with quantized statistics, unstructured fp16 outliers, GPTQ feedback.

Follows Vahe1994/SpQR `spqr_engine.py` / `quant_groups.py`. Storage:
``permute(sum(affine(codes, scale=affine(scale codes, fp16, fp16, [b2, 1]), zero=affine(...), [1, b1]),
sparse_csr(outliers)), perm)``. Outliers are stored as fp16 corrections on top of the dense term at their positions
(the dense code there is the code of a zero weight, as in the reference), so a reader's sum is what GPTQ assumed.
Without outliers the sum is just the affine term; without act_order there is no permute node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.plugin import LayerInput, Method, MethodConfig, hookimpl, param

from ._common import MethodResult, QuantizesThroughRun, record_builder, sparse_outliers, weight_matrix
from ._gptq_core import check_hessian, column_blocks, error_feedback, prepare_hessian
from ._quantizers import (
    QuantizedStats,
    dequantize,
    fp16_exact,
    minmax_from_range,
    spqr_codes,
    to_fp16,
    to_uint8,
)


def leave_one_out_reduction(group: torch.Tensor, u_diag: torch.Tensor, bits: int) -> torch.Tensor:
    """For each weight of group [R, g]: how much the group's Hessian-weighted squared error drops when that weight is
    left out of the min-max fit (and not quantized). Errors are scaled by 1 / U_jj. Returns [R, g]."""
    g = group.shape[1]
    left_out = torch.eye(g, dtype=torch.bool)
    x = group.unsqueeze(1).expand(-1, g, -1)  # [R, left-out weight k, column c]
    scale, zero = minmax_from_range(x.masked_fill(left_out, math.inf).amin(-1),
                                    x.masked_fill(left_out, -math.inf).amax(-1), bits)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    loo = ((dequantize(spqr_codes(x, scale, zero, bits), scale, zero) - x) / u_diag).square()
    loo = loo.masked_fill(left_out, 0.0).sum(-1)
    scale, zero = minmax_from_range(group.amin(1), group.amax(1), bits)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    base = ((dequantize(spqr_codes(group, scale, zero, bits), scale, zero) - group) / u_diag).square().sum(1, True)
    return base - loo


@dataclass(frozen=True)
class SpQRConfig(MethodConfig):
    """spqr's parameters: first-level groups, quantized statistics, outlier threshold and the error feedback's."""

    method = "spqr"
    bits: int = param(3, "bits per weight code", min=2, max=8)
    group_size: int = param(16, "beta1: input columns per first-level scale/zero", min=2, max=1 << 16)
    qq_scale_bits: int = param(3, "bits of the quantized first-level scales", min=1, max=8)
    qq_zero_bits: int = param(3, "bits of the quantized first-level zeros", min=1, max=8)
    qq_groupsize: int = param(16, "beta2: consecutive rows whose statistics share one fp16 scale and zero", min=1,
                              max=1 << 16)
    outlier_threshold: float = param(0.2, "tau, relative outlier threshold; inf disables outliers", min=0.0)
    damp: float = param(1.0, "relative damping (percdamp) of the Hessian diagonal", min=0.0, max=10.0)
    act_order: bool = param(True, "quantize columns in order of decreasing Hessian diagonal")
    block_size: int = param(128, "columns per lazy batch update (speed only)", min=1, max=1 << 16)


class SpQR(QuantizesThroughRun, Method):
    config = SpQRConfig
    description = (
        "SpQR: per-row min-max over groups of group_size input columns (no forced zero), whose scales and zeros are "
        "themselves quantized (qq_scale_bits / qq_zero_bits, fp16 scale and zero per qq_groupsize consecutive rows); "
        "weights whose leave-one-out error reduction or own Hessian-weighted error exceeds outlier_threshold x "
        "mean(Var(W_j) / U_jj^2) are kept as fp16 outliers (CSR); GPTQ error feedback in act-order.")
    calibration = frozenset({"hessian"})


    def run(self, layer: LayerInput, config: SpQRConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        bits, sbits, zbits, rgroup = config.bits, config.qq_scale_bits, config.qq_zero_bits, config.qq_groupsize
        w = weight_matrix(layer)
        rows, cols = w.shape
        group = min(config.group_size, cols)
        h = check_hessian(layer.hessian, cols, layer.name)
        prep = prepare_hessian(h, percdamp=config.damp, use_act_order=config.act_order, layer=layer.name,
                               spqr_order=True)
        perm = prep.perm
        if perm is not None:
            w = w[:, perm]
        w[:, prep.dead[perm] if perm is not None else prep.dead] = 0.0
        u_diag = torch.diag(prep.u)
        threshold = config.outlier_threshold * float((w.var(dim=0) / u_diag.square()).mean())
        detect = math.isfinite(threshold)
        wt = w.T.contiguous()

        n_groups = -(-cols // group)
        stats: list[tuple[QuantizedStats, QuantizedStats]] = []
        codes_t = torch.empty(cols, rows)
        outliers_t = torch.zeros(cols, rows, dtype=torch.bool)
        corrections_t = torch.zeros(cols, rows)

        def start_group(j: int, part: torch.Tensor) -> None:
            gw = part.T
            if detect:
                likely = leave_one_out_reduction(gw, u_diag[j:j + gw.shape[1]], bits) > threshold
                keep = (~likely).float()
                mean = (gw * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
                gw = gw * keep + mean * (1 - keep)
            scale, zero = minmax_from_range(gw.amin(1), gw.amax(1), bits)
            stats.append((QuantizedStats(scale, sbits, rgroup), QuantizedStats(zero, zbits, rgroup)))

        def quantize_column(j: int, col: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            scale, zero = stats[-1][0].values, stats[-1][1].values
            q = spqr_codes(col, scale, zero, bits)
            deq = dequantize(q, scale, zero)
            if detect:
                is_outlier = ((col - deq) / d).square() > threshold
                if bool(is_outlier.any()):
                    # The reference re-quantizes with outliers zeroed and keeps the outliers' exact values.
                    q = torch.where(is_outlier, spqr_codes(torch.zeros_like(col), scale, zero, bits), q)
                    base = dequantize(q, scale, zero)
                    correction = torch.where(is_outlier, fp16_exact(col - base), 0.0)
                    deq = base + correction  # what sum(affine, sparse_csr) decodes to
                    outliers_t[j], corrections_t[j] = is_outlier, correction
            codes_t[j] = q
            return deq

        blocks = column_blocks(cols, config.block_size, group)
        loss = error_feedback(wt, prep.u, blocks, quantize_column, start_group, group)
        assert len(stats) == n_groups

        b = record_builder(layer)

        def stats_node(role: str, parts: list[QuantizedStats], qbits: int) -> dict:
            codes = torch.stack([p.codes for p in parts], dim=1)
            scale = torch.stack([p.scale for p in parts], dim=1)
            zero = torch.stack([p.zero for p in parts], dim=1)
            return b.affine(b.packed(f"{role}.codes", to_uint8(codes), qbits),
                            scale=b.tensor(f"{role}.scale", to_fp16(scale)),
                            zero=b.tensor(f"{role}.zero", to_fp16(zero)), bits=qbits, group_shape=(rgroup, 1))

        dense = b.affine(b.packed("codes", to_uint8(codes_t.T), bits),
                         scale=stats_node("scale", [s for s, _ in stats], sbits),
                         zero=stats_node("zero", [z for _, z in stats], zbits), bits=bits, group_shape=(1, group))
        mask = outliers_t.T
        n_outliers = int(mask.sum())
        terms = [dense]
        if n_outliers:
            terms.append(sparse_outliers(b, mask, corrections_t.T[mask]))
        node = b.sum(terms)
        if perm is not None:
            node = b.permute(node, perm.numpy())

        deq = wt.T
        if perm is not None:
            deq = deq[:, torch.argsort(perm)]
        numel = rows * cols
        info = {"method": self.name, "params": config.to_params(), "outliers": n_outliers,
                "outlier_share": n_outliers / numel,
                "bits_per_weight": sum(a.nbytes for a in b.tensors.values()) * 8 / numel,
                "damp_used": prep.damp, "cholesky_retries": prep.retries, "dead_inputs": int(prep.dead.sum()),
                "proxy_loss": loss}
        return MethodResult(b.finish(node, info), deq.contiguous(), info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(SpQR())
