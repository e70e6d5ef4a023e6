"""SliM-LLM (Huang et al. 2024): salience-driven mixed bits per group of input columns, then GPTQ per group width.

Reference: Aaronhuang-778/SliM-LLM ``slim-llm/slim_gptq.py`` and ``utils/bitsearch.py`` (SBA, salience-determined
bit allocation). What this plugin does:

- Salience of a group of g input columns (``get_salience``): ``Σ_{rows, c in group} w[r, c]² / U[c, c]²`` with U
  the upper Cholesky factor of the damped H⁻¹ (GPTQ's, ``_gptq_core.prepare_hessian``), the OBS-style w² / [H⁻¹]²
  of the paper.
- SBA search (``block_search``): groups ranked by salience; for i pairs, the i least salient groups get
  ``bits − spread`` bits and the i most salient ``bits + spread``, the rest ``bits`` (the average stays ``bits``).
  Every i from 0 (uniform) to half the groups is scored. The reference quantizes each candidate min-max per group
  and scores the KL divergence of the layer's outputs on calibration inputs; this plugin scores the Hessian-weighted
  output error tr(ΔW H ΔWᵀ) (its calibration is the Hessian only), of the GPTQ result of each candidate by default
  (``search="gptq"``: on MiniLM the min-max ranking sometimes picks a split that GPTQ then does worse with than
  uniform), or of min-max per group as the reference (``search="rtn"``). The reference starts at i = 1; i = 0 is also a candidate
  here, so a layer where mixing does not help stays plain GPTQ. A shorter last group (C not a multiple of g) keeps
  ``bits``, so the column-weighted average is exactly ``bits``.
- GPTQ (``_gptq_core.error_feedback``, the same loop as the gptq plugin) with each group's min-max statistics fitted
  at its own width when the group starts (asymmetric, bits-wide integer zero, fp16 scale), columns in input order.
- SQC (salience-weighted quantizer calibration, the reference's clipping search over [0.9, 1.1]·range with a
  salience-weighted |Δ|^2.4) is not implemented: the statistics are GPTQ's min-max.

Storage (spec/composition.md, SliM-LLM): ``permute(concat([affine at the lowest width over its groups' columns, …,
affine at the highest width]), perm)``; each part in ascending column order with group_shape [1, g], codes packed,
fp16 scales, packed zeros. When every group has one width the record is the gptq plugin's plain affine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qformat.plugin import (
    LayerInput,
    Method,
    MethodConfig,
    ParameterError,
    RecordBuilder,
    hookimpl,
    output_error,
    param,
)

from ._common import MethodResult, QuantizesThroughRun, affine_record, effective_group, record_builder, weight_matrix
from ._gptq_core import check_hessian, column_blocks, error_feedback, prepare_hessian
from ._quantizers import dequantize, gptq_codes, gptq_params, to_fp16, to_uint8


@dataclass(frozen=True)
class SlimConfig(MethodConfig):
    method = "slim"
    bits: int = param(3, "average bits per weight code over the layer (groups get bits - spread, bits, bits + spread)",
                      min=2, max=7)
    group_size: int = param(128, "input columns per group: the unit of bit allocation and of scale/zero", min=1,
                            max=1 << 20)
    spread: int = param(1, "how far a group's width moves from bits (SliM-LLM: 1)", min=1, max=3)
    damp: float = param(0.01, "relative damping (percdamp): damp * mean(diag H) is added to diag H", min=0.0,
                        max=10.0)
    block_size: int = param(128, "columns per lazy batch update (speed only)", min=1, max=1 << 16)
    search: str = param("gptq", "how a split is scored: 'gptq' quantizes each candidate with GPTQ (exact, slower), "
                        "'rtn' with min-max per group as the reference's search does (then one GPTQ run)",
                        choices=("gptq", "rtn"))

    def check(self) -> None:
        if self.bits - self.spread < 1 or self.bits + self.spread > 8:
            raise ParameterError(f"method 'slim' parameter 'spread': widths {self.bits - self.spread}.."
                                 f"{self.bits + self.spread} must lie in 1..8 (bits {self.bits})")


def group_salience(w: torch.Tensor, u: torch.Tensor, group: int) -> torch.Tensor:
    """Σ w² / U_cc² per group of ``group`` input columns (SliM-LLM's salience; U = chol(H⁻¹) upper)."""
    per_column = (w.double().square() / torch.diag(u).double().square()[None, :]).sum(0)
    return torch.stack([part.sum() for part in torch.split(per_column, group)])


def allocation(salience: torch.Tensor, pairs: int, bits: int, spread: int, full: int) -> list[int]:
    """Group widths: of the first ``full`` groups (the full-width ones), the ``pairs`` least salient get
    ``bits - spread`` and the ``pairs`` most salient ``bits + spread``; every other group ``bits``."""
    widths = [bits] * salience.numel()
    order = torch.argsort(salience[:full], stable=True).tolist()
    for g in order[:pairs]:
        widths[g] = bits - spread
    for g in order[full - pairs:] if pairs else []:
        widths[g] = bits + spread
    return widths


def rtn_groups(w: torch.Tensor, group: int, widths: list[int]) -> torch.Tensor:
    """Every group min-max quantized (GPTQ's asymmetric quantizer) at its width, no error feedback."""
    out = torch.empty_like(w)
    for g, (part, b) in enumerate(zip(torch.split(w, group, dim=1), widths, strict=True)):
        s, z = gptq_params(part, b, False)
        out[:, g * group:g * group + part.shape[1]] = dequantize(gptq_codes(part, s[:, None], z[:, None], b),
                                                                 s[:, None], z[:, None])
    return out


def search_allocation(w: torch.Tensor, h: torch.Tensor, salience: torch.Tensor, bits: int, spread: int,
                      group: int, quantize: Any = None) -> tuple[list[int], int, list[float]]:
    """SBA: the number of +/- spread pairs (0 .. full groups // 2) whose quantization has the lowest Hessian-weighted
    output error; returns (widths, pairs, error per candidate). ``quantize(widths)`` gives a candidate's dequantized
    weight (default: min-max per group, the reference's ``block_quantize``)."""
    cols = w.shape[1]
    full = cols // group  # a shorter last group is left at ``bits``
    cache: dict[tuple[int, int], torch.Tensor] = {}  # (group, width) -> its quantized columns

    def minmax(widths: list[int]) -> torch.Tensor:
        out = torch.empty_like(w)
        for g, b in enumerate(widths):
            lo, hi = g * group, min(cols, (g + 1) * group)
            if (g, b) not in cache:
                cache[(g, b)] = rtn_groups(w[:, lo:hi], hi - lo, [b])
            out[:, lo:hi] = cache[(g, b)]
        return out

    quantize = quantize or minmax
    h64 = h.double()
    errors, best = [], 0
    for pairs in range(full // 2 + 1):
        widths = allocation(salience, pairs, bits, spread, full)
        errors.append(output_error(w - quantize(widths), h64))
        if errors[-1] < errors[best]:
            best = pairs
    return allocation(salience, best, bits, spread, full), best, errors


@dataclass
class GroupedGPTQ:
    """GPTQ's result with one width per group: codes [R, C], scales and zeros [R, G], the dequantized weight."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    deq: torch.Tensor
    loss: float


def gptq_widths(w: torch.Tensor, u: torch.Tensor, widths: list[int], group: int, block_size: int) -> GroupedGPTQ:
    """The gptq plugin's column loop (``_gptq_core.error_feedback``, groups fitted when they start, min-max
    asymmetric) with group g's statistics and codes at ``widths[g]`` bits; columns in input order."""
    rows, cols = w.shape
    scales, zeros = torch.empty(len(widths), rows), torch.empty(len(widths), rows)
    codes_t = torch.empty(cols, rows)
    current: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def start_group(j: int, part: torch.Tensor) -> None:
        b = widths[j // group]
        s, z = gptq_params(part.T, b, False)
        scales[j // group], zeros[j // group] = s, z
        current[:] = [(s, z, b)]

    def quantize_column(j: int, col: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        s, z, b = current[0]
        q = gptq_codes(col, s, z, b)
        codes_t[j] = q
        return dequantize(q, s, z)

    wt = w.T.contiguous()
    blocks = column_blocks(cols, block_size, group if group < cols else 0)
    loss = error_feedback(wt, u, blocks, quantize_column, start_group, group)
    return GroupedGPTQ(codes_t.T, scales.T, zeros.T, wt.T.contiguous(), loss)


class Slim(QuantizesThroughRun, Method):
    config = SlimConfig
    description = (
        "SliM-LLM (SBA): groups of input columns ranked by salience sum w^2 / U_cc^2 (U = chol(H^-1)); the split into "
        "bits-1 / bits / bits+1 groups at the same average minimising the Hessian-weighted output error of min-max "
        "quantization is searched, then GPTQ quantizes each group at its width. Stored as permute(concat(one affine "
        "per width over its groups' columns)); SQC (salience-weighted clipping) is not implemented.")
    calibration = frozenset({"hessian"})

    def run(self, layer: LayerInput, config: SlimConfig | Mapping[str, Any]) -> MethodResult:
        config = self.validate_params(config)
        bits, spread = config.bits, config.spread
        w = weight_matrix(layer)
        rows, cols = w.shape
        group = effective_group(config.group_size, cols)
        h = check_hessian(layer.hessian, cols, layer.name)
        prep = prepare_hessian(h, percdamp=config.damp, use_act_order=False, layer=layer.name)
        w[:, prep.dead] = 0.0  # h: its dead diagonal is now 1 (GPTQ's), the columns are zero

        salience = group_salience(w, prep.u, group)
        runs: dict[tuple[int, ...], GroupedGPTQ] = {}

        def gptq(widths: list[int]) -> GroupedGPTQ:
            key = tuple(widths)
            if key not in runs:
                runs[key] = gptq_widths(w, prep.u, widths, group, config.block_size)
            return runs[key]

        scorer = (lambda widths: gptq(widths).deq) if config.search == "gptq" else None
        widths, pairs, errors = search_allocation(w, h, salience, bits, spread, group, scorer)
        result = gptq(widths)
        codes, deq, loss = result.codes, result.deq, result.loss

        b = record_builder(layer)
        node = mixed_record(b, codes, result.scales, result.zeros, widths, group)
        column_bits = sum(wd * min(group, cols - g * group) for g, wd in enumerate(widths)) / cols
        info = {"method": self.name, "params": config.to_params(), "damp_used": prep.damp,
                "cholesky_retries": prep.retries, "dead_inputs": int(prep.dead.sum()), "proxy_loss": loss,
                "bits_per_weight": sum(a.nbytes for a in b.tensors.values()) * 8 / (rows * cols),
                "slim": {"group_bits": widths, "average_bits": column_bits, "pairs": pairs,
                         "search_errors": errors}}
        return MethodResult(b.finish(node, info), deq, info)


def mixed_record(b: RecordBuilder, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, widths: list[int],
                 group: int) -> dict:
    """permute(concat(affine per width, ascending)) over groups of ``group`` columns; a plain affine for one width.

    ``codes`` [R, C], ``scale``/``zero`` [R, G] in input order. Part k holds the columns of the groups of its width in
    ascending order, each group whole (a shorter last group is the last of its part), so group_shape [1, group]
    tiles every part; perm lists those columns part after part."""
    cols = codes.shape[1]
    present = sorted(set(widths))
    if len(present) == 1:
        return affine_record(b, codes, scale, zero, present[0], group, False)
    parts, order = [], []
    for width in present:
        groups = [g for g, wd in enumerate(widths) if wd == width]
        columns = torch.cat([torch.arange(g * group, min(cols, (g + 1) * group)) for g in groups])
        index = torch.tensor(groups)
        parts.append(b.affine(b.packed(f"b{width}.codes", to_uint8(codes[:, columns]), width), bits=width,
                              scale=b.tensor(f"b{width}.scale", to_fp16(scale[:, index])),
                              zero=b.packed(f"b{width}.zero", to_uint8(zero[:, index]), width),
                              group_shape=(1, group)))
        order.append(columns)
    perm = torch.cat(order).numpy()
    node = b.concat(parts)
    return node if np.array_equal(perm, np.arange(cols)) else b.permute(node, perm)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(Slim())
