"""BCQ (binary-coding quantization, as LUT-GEMM runs it): each group of ``g`` input columns is ``Σ_i α_i b_i`` with
q sign planes ``b_i ∈ {−1, +1}`` and q fp16 scales α per group (``_bcq_core``: greedy fit, alternating rounds).

Storage, one term per plane, largest α first (spec/composition.md "BCQ"): ``sum(affine(plane_i, scale = 2 α_i,
zero = 0.5, bits 1, group [1, g]), ...)``, so plane i decodes to ``(b − 0.5) · 2α_i = ±α_i`` exactly: q bits per weight
plus 16 q / g. A prefix of the terms is the BCQ code with fewer planes (any-precision loading keeps the first P).

``uniform=true`` writes min-max asymmetric RTN codes (``bits``, ``group_size``, GPTQ's quantizer) in BCQ form instead
(LUT-GEMM's ``convert_bcq_format``): bit i of the code becomes a plane with ``α_i = s · 2^(i − 1)``, most significant
bit first, and the first term carries the fp16 offset ``Σ α_i − s · z`` (affine version 2), so
``w = Σ α_i b_i + offset = (q − z) · s`` up to the offset's fp16 rounding; a prefix of P planes decodes to the middle
of the codes that share those bits, as a ``bitplanes`` code read with ``use_planes=P`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.errors import ConversionError
from qformat.plugin import LayerInput, Method, MethodConfig, hookimpl, param

from . import _bcq_core as core
from ._common import MethodResult, QuantizesThroughRun, effective_group, record_builder, weight_matrix
from ._quantizers import FP16_MAX, fp16_exact, to_fp16, to_uint8
from .rtn import rtn_quantize

ALPHA_MAX = FP16_MAX / 2  # the stored scale is 2α, an fp16 value


@dataclass(frozen=True)
class BCQConfig(MethodConfig):
    """bcq's parameters: planes, group, refinement, or the exact form of a uniform code."""

    method = "bcq"
    bits: int = param(3, "sign planes q per weight (bits per weight before the scales)", min=1, max=8)
    group_size: int = param(128, "input columns sharing one set of q scales; -1 or 0 = one group per row (the last "
                            "group may be shorter)", min=-1, max=1 << 20)
    rounds: int = param(15, "alternating rounds after the greedy fit (LUT-GEMM default 15; 0 = greedy only); they "
                        "stop early once no sign changes", min=0, max=1000)
    uniform: bool = param(False, "instead of fitting α: min-max asymmetric RTN codes of `bits` bits written exactly "
                          "as BCQ planes (α_i = s 2^(i-1)) plus one fp16 offset per group")


class BCQ(QuantizesThroughRun, Method):
    config = BCQConfig
    description = ("Binary-coding quantization (LUT-GEMM): per group of input columns, W ≈ Σ α_i b_i over q sign "
                   "planes, greedy fit then alternating least-squares α / nearest-sum re-assignment; each plane a "
                   "1-bit affine term (α in fp16), largest first, so fewer planes load as a coarser code. "
                   "uniform=true writes RTN codes exactly in this form (plus an fp16 offset).")

    def run(self, layer: LayerInput, config: BCQConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        rows, cols = w.shape
        group = effective_group(config.group_size, cols)
        if config.uniform:
            scales, bits, offset, info = self._uniform(w, config.bits, group, layer.name)
        else:
            scales, bits, info = self._fit(w, config.bits, group, config.rounds)
            offset = None
        b = record_builder(layer)
        terms, deq = [], None
        for i in range(config.bits):
            scale = scales[:, :, i]
            first_offset = offset if i == 0 else None
            node = b.affine(b.packed(f"plane{i}", to_uint8(bits[i]), 1), scale=b.tensor(f"alpha{i}", to_fp16(scale)),
                            zero=0.5, bits=1, group_shape=(1, group),
                            offset=None if first_offset is None else b.tensor("offset", to_fp16(first_offset)))
            terms.append(node)
            term = (bits[i].float() - 0.5) * _expand(scale, group, cols)
            if first_offset is not None:
                term = term + _expand(first_offset, group, cols)
            deq = term if deq is None else deq + term  # the sum codec's order: left to right in fp32
        node = terms[0] if len(terms) == 1 else b.sum(terms)
        info = {"method": self.name, "params": config.to_params(), **info}
        return MethodResult(b.finish(node, info), deq, info)

    @staticmethod
    def _fit(w: torch.Tensor, q: int, group: int, rounds: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(stored scales 2α [R, G, q], fp16-exact; sign bits [q, R, C] as 0/1; info) of the BCQ fit of every group."""
        rows, cols = w.shape
        alphas, signs, rounds_run = [], [], []
        for c0, width, count in _group_spans(cols, group):
            x = w[:, c0:c0 + width * count].reshape(-1, width)
            alpha, s, done = core.fit(x, q, rounds)
            alpha = fp16_exact(alpha.clamp(max=ALPHA_MAX))
            if rounds:
                s = core.nearest_signs(x, alpha)  # nearest sums for the stored α (fp16)
            alphas.append(alpha.reshape(rows, -1, q))
            signs.append(s.reshape(rows, -1, q))
            rounds_run.append(done)
        scales = 2.0 * torch.cat(alphas, dim=1)  # exact: α is fp16 and at most ALPHA_MAX
        bits = (torch.cat(signs, dim=1) > 0).to(torch.uint8).permute(2, 0, 1)  # [q, R, C]
        return scales, bits, {"rounds_run": max(rounds_run)}

    @staticmethod
    def _uniform(w: torch.Tensor, q: int, group: int, name: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """RTN codes (GPTQ's asymmetric min-max quantizer per group) as planes: (stored scales 2α_i = s 2^(q-1-i)
        [R, G, q], bits [q, R, C], offset [R, G], info)."""
        codes, _, scale, zero = rtn_quantize(w, q, False, group)
        codes = codes.long()
        powers = [2 ** (q - 1 - i) for i in range(q)]  # plane i holds bit q-1-i (most significant first)
        scales = torch.stack([scale * p for p in powers], dim=-1)  # s is fp16: exact unless past the fp16 range
        if not torch.equal(fp16_exact(scales), scales):
            raise ConversionError(f"layer {name!r}: bcq uniform=true: a group scale times 2^{q - 1} exceeds fp16 "
                                  f"(max |w| {float(w.abs().max()):g}); use uniform=false or fewer bits")
        bits = torch.stack([(codes >> (q - 1 - i)) & 1 for i in range(q)]).to(torch.uint8)
        offset = scale * ((2 ** q - 1) / 2) - scale * zero  # Σ α_i − s z, with Σ α_i = s (2^q − 1) / 2
        return scales, bits, fp16_exact(offset), {}


def _group_spans(cols: int, group: int) -> list[tuple[int, int, int]]:
    """(first column, width, groups) of the full groups taken together, then of the short last group if any."""
    spans = [(0, group, cols // group)] if cols >= group else []
    if cols % group:
        spans.append((cols - cols % group, cols % group, 1))
    return spans


def _expand(per_group: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """[R, G] per-group values repeated over their columns: [R, C]."""
    return per_group.repeat_interleave(group, dim=1)[:, :cols]


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(BCQ())
