"""LQ-LoRA (Guo et al. 2023): a weight as a NormalFloat-quantized matrix plus a rank-r correction, ``W ≈ Q + L1 L2``.

Follows the reference (``lq_utils.lowrank_quantized_sparse_decomposition``, ``quantization_utils``):

1. ``Q = 0``; for up to ``iterations`` steps: ``L1, L2 = SVD_r(W − Q)`` (``torch.svd_lowrank`` with ``rank +
   oversampling`` columns, split as ``U√S``, ``√S Vᵀ``), ``Q = NF-b(W − L1 L2)``, error ``‖W − (L1 L2 + Q)‖_F``;
2. stop at the first step whose error does not fall below the previous one, and keep the best iterate;
3. NF-b: blockwise absmax codes into the 2^b-entry NormalFloat table (b = 3 or 4), the absmax itself double
   quantized (8-bit dynamic-map codes per 256 blocks, fp32 scale, mean offset): LQ-LoRA's QuantConfig
   ``(b, b0=8, b1=fp32, B0=64, B1=256)``, i.e. ``b + 8/64 + 32/(64·256)`` bits plus the sidecar.

The quantizer is the nf4 plugin's (bitsandbytes ``quantize_4bit`` on CPU: ``quantize_4bit_blocks``, ``_double_quant``)
with the table swapped: NF4 is bitsandbytes' table, NF3 is built the same way (``create_normal_map(offset=0.9677083,
use_extra_value=True)`` with 2^(b−1) positive quantiles, 0 and 2^(b−1) − 1 negative ones, divided by the largest), as
LQ-LoRA's ``create_normal_map(offset, use_extra_value, num_bits)`` does.

Storage: ``sum(scale(lut(packed codes, table), absmax or its double-quant tree), lowrank(a, b))``, the base exactly as
the nf4 plugin writes it (roles ``codes``, ``nf3``/``nf4``, ``absmax…``), the factors under role ``lowrank`` in F16 or
8-bit (``qformat.sidecar.lowrank_node``). ``rank=0`` writes the NF base alone (no sum): the nf4 plugin's record.
Bits per weight: ``b + 8/64 + 32/(64·256)`` (plus the 256-entry map and offset row) ``+ sidecar_bits · r (R + C) / (R
C)``: 4.13 + 0.5 = 4.63 at 4096² with r = 64 (measured), but 4.23 + 5.33 at 384². ``info.lqlora``: ``rank``
(after clipping), ``iterations_run`` (steps computed, the last one discarded unless the limit ended the loop),
``error_history`` (each step's relative error ``‖ΔW‖_F / ‖W‖_F``, or ``√(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))`` when weighted,
6 digits).

Decisions and differences, stated:

- each step rounds L1, L2 to their stored form (F16, or 8-bit codes) *before* quantizing ``W − L1 L2``, so the Q of a
  step is the NF code of the residual of exactly the product the file holds, the error of a step is the error of the
  file, and the kept pair (L1 L2, Q) is consistent;
- the loop stops at the first step that does not improve (the reference stops when the error increases; with the
  exact SVD of ``weighted=true`` an unchanged error means a fixed point, which would otherwise repeat to the end);
- data-aware variant: the paper weights the SVD by the diagonal empirical Fisher ("two-sided" row/column weights
  ``√mean(F)``); qformat has no gradients at conversion time, so ``weighted=true`` uses the layer's activation Hessian
  ``H = 2/N Σ x xᵀ`` instead: step 1 becomes the full SVD minimising ``‖(W − Q − L1 L2) H^½‖_F`` (``fit_lowrank`` with
  the Hessian), the stopping error ``tr(ΔW H ΔWᵀ)``. The method always declares the Hessian (the pipeline calibrates
  even for ``weighted=false``, which ignores it);
- the randomized SVD is seeded with ``seed`` inside a forked RNG, so a layer's result does not depend on the global
  RNG state and the global state is left unchanged;
- the paper's mixed-precision ILP over (b, rank) configurations is the pipeline's size budget, for every method:
  ``qformat convert --target-bits 3.25 --candidate lqlora:bits=3,rank=16 --candidate lqlora:bits=4,rank=16 ...``
  (qformat.conversion.budget; exact knapsack on the measured bytes and output errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from qformat.format import RecordBuilder
from qformat.plugin import LayerInput, Method, MethodConfig, ParameterError, hookimpl, output_error, param
from qformat.sidecar import fit_lowrank, lowrank_node

from ._common import MethodResult, QuantizesThroughRun, record_builder, weight_matrix
from ._gptq_core import check_hessian
from .nf4 import NESTED_BLOCK, NF4, quantize_4bit_blocks

NF_OFFSET = 0.9677083  # bitsandbytes / LQ-LoRA create_normal_map default
LOWRANK_ROLE = "lowrank"
HISTORY_DIGITS = 6  # significant digits of info.lqlora.error_history (one relative error per step run)


@lru_cache(maxsize=4)
def normal_float_table(bits: int, offset: float = NF_OFFSET) -> torch.Tensor:
    """The 2^bits NormalFloat values, sorted, in [-1, 1]: bitsandbytes' ``create_normal_map(offset,
    use_extra_value=True)`` generalised to ``bits`` (2^(bits−1) positive normal quantiles between ``offset`` and 0.5,
    zero, 2^(bits−1) − 1 negative ones; divided by the largest in fp32). bits=4 is bitsandbytes' NF4 table bit for
    bit."""
    from scipy.stats import norm

    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1]).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, half)[:-1])).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return values / values.max()


@dataclass(frozen=True)
class LQLoRAConfig(MethodConfig):
    """lqlora's parameters: the NF quantizer, the low-rank part and the alternation."""

    method = "lqlora"
    bits: int = param(4, "NormalFloat bits per weight: 3 (NF3) or 4 (NF4)", choices=(3, 4))
    group_size: int = param(64, "weights per absmax block along rows (LQ-LoRA's B0); must divide the row width",
                            min=2, max=1 << 16)
    double_quant: bool = param(True, "store the absmax as 8-bit dynamic-map codes per 256 blocks with an fp32 scale "
                               "and the mean as offset (LQ-LoRA's b0=8, B1=256; bitsandbytes compress_statistics)")
    rank: int = param(64, "rank r of the low-rank part L1 L2 (LQ-LoRA README: 64); clipped to min(rows, columns); "
                      "0 = plain NF quantization", min=0, max=1 << 16)
    iterations: int = param(100, "most alternations (reference num_iterations); stops at the first that does not "
                            "lower the error", min=1, max=10000)
    sidecar_bits: int = param(16, "storage of L1, L2: 16 (F16) or 8 (8-bit codes with an F16 scale per row)",
                              choices=(8, 16))
    weighted: bool = param(False, "data-aware: fit L1 L2 by the activation-Hessian-weighted SVD and stop on the "
                           "output error tr(dW H dW^T) (the paper's Fisher weighting, with H in place of F)")
    oversampling: int = param(10, "extra columns of the randomized SVD (torch.svd_lowrank q = rank + oversampling)",
                              min=0, max=4096)
    seed: int = param(0, "seed of the randomized SVD's random projections", min=0, max=2 ** 31 - 1)


@dataclass
class _Step:
    """One iterate: the NF codes of W − L1 L2 and the factors, with both parts as the file decodes them."""

    codes: torch.Tensor
    absmax: torch.Tensor  # fp32 [R, G], exact (the codes are computed against it)
    a: torch.Tensor
    b: torch.Tensor
    base: torch.Tensor  # decoded NF part
    product: torch.Tensor  # decoded low-rank part
    error: float


class LQLoRA(QuantizesThroughRun, Method):
    config = LQLoRAConfig
    description = ("LQ-LoRA: W ≈ Q + L1 L2 by alternating a rank-r (randomized) SVD of W − Q with blockwise NF3/NF4 "
                   "quantization of W − L1 L2 (double-quantized absmax), stopping when the error stops falling; "
                   "stored as sum(nf base as nf4 writes it, lowrank(F16 or 8-bit)). weighted=true fits and stops on "
                   "the activation-Hessian output error (the paper's Fisher weighting, with H).")
    calibration = frozenset({"hessian"})

    def check_shapes(self, config: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            cols = int(np.prod(shape[1:]))
            if cols % config.group_size:
                raise ParameterError(f"method 'lqlora' parameter 'group_size': {config.group_size} does not divide "
                                     f"the row width {cols} of {name} (use a block that divides {cols})")

    def run(self, layer: LayerInput, config: LQLoRAConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        rows, cols = w.shape
        g = config.group_size
        self.check_shapes(config, {layer.name: (rows, cols)})
        rank = min(config.rank, rows, cols)
        hessian = check_hessian(layer.hessian, cols, layer.name).double() if config.weighted else None
        table = normal_float_table(config.bits)
        table_role = f"nf{config.bits}"

        def error_of(approx: torch.Tensor) -> float:
            return output_error((w - approx).double(), hessian)

        reference = error_of(torch.zeros_like(w))  # ‖W‖² (or tr(W H Wᵀ)): the history is relative, square-rooted

        def nf_step(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, product: torch.Tensor) -> _Step:
            codes, absmax = quantize_4bit_blocks(target, g, table)
            absmax = absmax.view(rows, cols // g)
            base = self._nf_decode(codes, absmax, table, g, config.double_quant, layer)
            return _Step(codes, absmax, a, b, base, product, error_of(base + product))  # the sum codec's order

        history: list[float] = []
        if rank == 0:
            empty = torch.zeros(rows, 0), torch.zeros(0, cols)
            best = nf_step(w, *empty, torch.zeros_like(w))
            history.append(best.error)
        else:
            best = None
            q = torch.zeros_like(w)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                for _ in range(config.iterations):
                    a, b = self._fit(w - q, rank, config.oversampling, hessian)
                    _, product = lowrank_node(RecordBuilder(layer.name, (rows, cols)), a, b, config.sidecar_bits)
                    step = nf_step(w - product, a, b, product)
                    history.append(step.error)
                    if best is not None and not step.error < best.error:
                        break
                    best, q = step, step.base

        builder = record_builder(layer)
        node, deq = self._nf_node(builder, best, table, table_role, g, config.double_quant)
        if rank:
            low, product = lowrank_node(builder, best.a, best.b, config.sidecar_bits, role=LOWRANK_ROLE)
            node, deq = builder.sum([node, low]), deq + product
        info: dict[str, Any] = {
            "method": self.name, "params": config.to_params(), "blocksize": g, "double_quant": config.double_quant,
            "table": table_role,
            "lqlora": {"iterations_run": len(history), "rank": rank, "weighted": config.weighted,
                       "error_history": [float(f"{(e / reference) ** 0.5:.{HISTORY_DIGITS}g}") if reference
                                         else 0.0 for e in history]}}
        if config.double_quant:
            info["nested_blocksize"] = NESTED_BLOCK
        info["bits_per_weight"] = sum(t.nbytes for t in builder.tensors.values()) * 8 / (rows * cols)
        return MethodResult(builder.finish(node, info), deq, info)

    @staticmethod
    def _fit(residual: torch.Tensor, rank: int, oversampling: int, hessian: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 [R, r], L2 [r, C] of the residual: the randomized SVD (U√S, √S Vᵀ) or, with a Hessian, the weighted
        full SVD of ``qformat.sidecar.fit_lowrank``."""
        if hessian is not None:
            return fit_lowrank(residual, rank, hessian)
        q = min(rank + oversampling, *residual.shape)
        u, s, v = torch.svd_lowrank(residual, q=q)
        root = s[:rank].sqrt()
        return (u[:, :rank] * root).contiguous(), (root[:, None] * v[:, :rank].T).contiguous()

    @staticmethod
    def _nf_decode(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, g: int, double_quant: bool,
                   layer: LayerInput) -> torch.Tensor:
        """The NF part as the file decodes it (the absmax through the double-quant tree when asked)."""
        if double_quant:
            stored, _ = NF4._double_quant(RecordBuilder(layer.name, tuple(codes.shape)), absmax)
        else:
            stored = absmax
        return table[codes] * stored.repeat_interleave(g, dim=1)

    @staticmethod
    def _nf_node(builder: RecordBuilder, step: _Step, table: torch.Tensor, table_role: str, g: int,
                 double_quant: bool) -> tuple[dict, torch.Tensor]:
        """The nf4 plugin's record of the step's codes and absmax, and its decode (fp32)."""
        bits = int(table.numel()).bit_length() - 1
        values = builder.lut(builder.packed("codes", step.codes.to(torch.uint8).numpy(), bits),
                             builder.tensor(table_role, table.numpy()))
        if double_quant:
            stored, factor = NF4._double_quant(builder, step.absmax)
        else:
            stored, factor = step.absmax, builder.tensor("absmax", step.absmax.numpy())
        return builder.scale(values, factor, (1, g)), table[step.codes] * stored.repeat_interleave(g, dim=1)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(LQLoRA())
