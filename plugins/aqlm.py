"""AQLM (Egiazarian et al. 2024): additive quantization of language models, the per-layer stage.

Follows Vahe1994/AQLM (`src/aq.py`, `src/kmeans.py`, `src/beam_search_xtx.py`), see :mod:`._aqlm_core`:
- ``codebooks`` (M) codebooks of 2^``codebook_bits`` (B) entries, each entry an ``in_group_size`` (g)-wide slice of a
  row; one scale per output row (the reference's ``scale_nbits=0``: the row's L2 norm to start, then trained);
- initialisation by residual k-means on the weight divided by its row scales (M fits, each on what the previous left);
- then epochs of ``steps_per_epoch`` Adam steps (betas (0, 0.95), amsgrad, as the reference) on codebooks and scales
  with codes fixed, followed by a beam search over codes (outer loop input groups, inner loop codebooks,
  ``beam_size`` hypotheses per row) minimising ``tr(ΔW H ΔWᵀ)`` with the calibration Hessian H (the reference's XTX),
  until an epoch improves the loss by less than ``relative_tolerance`` or after ``max_epochs``.

Configurations: 2×8 g8 (the default, the small-model setting), 1×8, 4×8, 1×16 (AQLM's large-model setting: its
65536-entry codebook alone is ≈ 14 bits/weight on a 768-wide layer, so it only pays on big matrices).

Storage, exactly the AQLM importer's record (:mod:`.import_aqlm`), so a file decodes like AQLM's own:
``scale(vq(packed codes [R, C/g·M] (B bits), codebooks F16 [M, K, g]), scales F16 [R, 1], group_shape [1, C])``.
Codebooks and scales are rounded to fp16 (AQLM's ``codebook_value_nbits=16``) before every code assignment, so the
record decodes bit for bit to the weight the method optimised. Bits per weight are counted from the stored bytes
(codes + codebooks + scales).

Differences from the reference, on purpose: the default budget is small (epochs ≤ 8 of 20 Adam steps, 20 k-means
iterations instead of up to 100 epochs × 100 steps and 100 iterations) so a 135M model converts on 2 CPU cores; the
codebook order of the beam search is the natural one (the reference may shuffle it); the k-means starts from a seeded
generator of its own instead of torch's global RNG and fits on at most 128 points per centre (the reference's
``max_points_per_centroid``, off by default there), then assigns every vector; the beam search keeps ``(ΔW H)`` up to
date in lazy blocks of 128 columns instead of one [R, C] × [C, g] product per step (same codes, tested).

Outliers (``outlier_fraction``, off by default; not in the reference): the given share of weights with the largest
SpQR-style saliency ``w² · H_cc`` is kept in an fp16 ``sparse_csr`` term and zeroed before AQLM runs, so the record is
``sum(scale(vq(...)), sparse_csr)`` with the correction ``fp16(w − AQLM's weight)`` at those positions. Shared
codebooks with one scale per row cannot represent an input column that carries a large share of ``tr(W H Wᵀ)``
(MiniLM's FFN output projections: the beam search then moves the whole row to cancel its error, weight MSE twice the
weight's own); 0.1% of the weights fixes that layer (bench/QUALITY_NOTES.md).

Block fine-tuning (``finetune``, on by default; :meth:`AQLM.tune_block`, :mod:`._aqlm_tune`): once a block's
linears are quantized, codes fixed, its codebooks, scales and norm weights are tuned with Adam to the original
block's outputs on the calibration inputs (the reference's ``finetune`` stage, with a small step budget here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qformat.errors import ConversionError
from qformat.format import QuantizedTensor
from qformat.plugin import (
    BlockTuning,
    LayerInput,
    Method,
    MethodConfig,
    ParameterError,
    RecordBuilder,
    hookimpl,
    param,
)

from ._aqlm_core import AQLMResult, AQLMSettings, objective, quantize_layer, round_books, round_scales
from ._aqlm_tune import tune
from ._common import MethodResult, QuantizesThroughRun, record_builder, sparse_outliers, weight_matrix
from ._gptq_core import check_hessian
from ._quantizers import fp16_exact, largest_share, to_fp16

MAX_CODE_BITS = 16  # the packed codec's widest code


@dataclass(frozen=True)
class AQLMConfig(MethodConfig):
    """aqlm's parameters: the code layout (M×B, group size) and the optimisation budget."""

    method = "aqlm"
    codebooks: int = param(2, "number of additive codebooks M (AQLM num_codebooks)", min=1, max=8)
    codebook_bits: int = param(8, "bits per code B: each codebook has 2^B entries (AQLM nbits_per_codebook; the "
                               "packed codes hold at most 16 bits)", min=1, max=MAX_CODE_BITS)
    in_group_size: int = param(8, "input columns per code vector g (AQLM in_group_size); must divide every "
                               "quantized layer's input width", min=1, max=256)
    max_epochs: int = param(8, "epochs at most, each = Adam steps then a beam search over codes", min=1, max=10000)
    steps_per_epoch: int = param(20, "Adam steps on codebooks and scales per epoch (codes fixed)", min=1, max=100000)
    lr: float = param(1e-3, "Adam learning rate (betas (0, 0.95), amsgrad)", min=1e-8, max=1.0)
    beam_size: int = param(1, "hypotheses kept per row in the beam search over codes (1 = greedy); at most 2^B",
                           min=1, max=256)
    init_iters: int = param(20, "k-means (Lloyd) iterations per codebook in the residual k-means initialisation",
                            min=0, max=1000)
    relative_tolerance: float = param(0.01, "stop when an epoch lowers the loss by less than this share",
                                      min=0.0, max=1.0)
    seed: int = param(0, "seed of the k-means starting points", min=0, max=(1 << 63) - 1)
    finetune: bool = param(True, "after a block's linears are quantized, tune its codebooks, scales and norms to the "
                           "original block's outputs (codes fixed; AQLM's fine-tuning stage)")
    finetune_steps: int = param(20, "Adam steps of the block fine-tuning, one calibration micro-batch each",
                                min=1, max=100000)
    finetune_lr: float = param(1e-4, "Adam learning rate of the block fine-tuning (betas (0.9, 0.95))",
                               min=1e-8, max=1.0)
    finetune_norms: bool = param(True, "the block fine-tuning also tunes the block's norm weights")
    outlier_fraction: float = param(0.0, "share of weights kept in fp16 in a sparse term, largest w^2 H_cc first "
                                    "(SpQR's saliency), zeroed before AQLM runs; 0 = none (the reference)",
                                    min=0.0, max=0.1)

    def check(self) -> None:
        if self.beam_size > 1 << self.codebook_bits:
            raise ParameterError(f"method 'aqlm' parameter 'beam_size': {self.beam_size} exceeds the "
                                 f"{1 << self.codebook_bits} entries of a {self.codebook_bits}-bit codebook; choose "
                                 f"beam_size <= {1 << self.codebook_bits}")


def divisors_hint(cols: int, limit: int = 64) -> str:
    options = [d for d in range(1, min(cols, limit) + 1) if cols % d == 0]
    return ", ".join(str(d) for d in options)


def group_error(name: str, cols: int, group: int) -> str:
    return (f"method 'aqlm' parameter 'in_group_size': {name} has {cols} input columns, not a multiple of "
            f"{group}; choose one of {divisors_hint(cols)}")


def settings(config: AQLMConfig) -> AQLMSettings:
    return AQLMSettings(config.codebooks, config.codebook_bits, config.in_group_size, config.max_epochs,
                        config.steps_per_epoch, config.lr, config.beam_size, config.init_iters,
                        config.relative_tolerance, config.seed)


def aqlm_record(b: RecordBuilder, result: AQLMResult, bits: int, shape: tuple[int, int]) -> dict:
    """The AQLM importer's tree: scale(vq(packed codes, codebooks [M, K, g]), scales [R, 1], [1, C])."""
    rows, cols = shape
    codes = result.codes.reshape(rows, -1).numpy()  # [R, G·M]: codes[r, j·M + m], the vq layout
    codes = codes.astype(np.uint8 if bits <= 8 else np.uint16)
    inner = b.vq(b.packed("codes", codes, bits), b.tensor("codebooks", to_fp16(result.books)), shape)
    return b.scale(inner, b.tensor("scale", to_fp16(result.scales)), (1, cols))


class AQLM(QuantizesThroughRun, Method):
    config = AQLMConfig
    description = ("AQLM: M additive codebooks of 2^B fp16 vectors over input groups of g, per-row fp16 scales; "
                   "residual k-means init, then Adam on codebooks/scales (codes fixed) alternating with a beam "
                   "search over codes minimising the Hessian-weighted output error (vq codec, AQLM importer's "
                   "layout). Defaults 2x8 g8.")
    calibration = frozenset({"hessian"})

    def check_shapes(self, config: AQLMConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            cols = int(np.prod(shape[1:]))
            if cols % config.in_group_size:
                raise ParameterError(group_error(name, cols, config.in_group_size))

    def run(self, layer: LayerInput, config: AQLMConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        rows, cols = w.shape
        if cols % config.in_group_size:
            raise ParameterError(group_error(layer.name, cols, config.in_group_size))
        h = check_hessian(layer.hessian, cols, layer.name)
        if not torch.isfinite(w).all():
            raise ConversionError(f"layer {layer.name!r}: the weight holds NaN or Inf")
        with torch.no_grad():
            h = (h + h.T) * 0.5  # the gradient and the beam search assume a symmetric H
        # SpQR's saliency w² · H_cc
        outliers = largest_share(w.square() * torch.diagonal(h).clamp_min(0.0)[None, :], config.outlier_fraction)
        result = quantize_layer(torch.where(outliers, 0.0, w), h, settings(config))

        b = record_builder(layer)
        node = aqlm_record(b, result, config.codebook_bits, (rows, cols))
        deq = result.dequantized
        n_outliers = int(outliers.sum())
        if n_outliers:
            correction = torch.where(outliers, fp16_exact(w - deq), 0.0)
            node = b.sum([node, sparse_outliers(b, outliers, correction[outliers])])
            deq = deq + correction  # what sum(scale(vq), sparse_csr) decodes to: one fp32 addition
        reference = float(((w.double() @ h.double()) * w.double()).sum() / rows)
        loss = objective(w, deq, h) if n_outliers else result.loss
        info = {"method": self.name, "params": config.to_params(), "epochs": len(result.epochs),
                "init_loss": result.init_loss, "loss": loss,
                "relative_output_error": loss / reference if reference > 0 else 0.0,
                "outliers": n_outliers, "outlier_share": n_outliers / (rows * cols),
                "bits_per_weight": sum(a.nbytes for a in b.tensors.values()) * 8 / (rows * cols)}
        return MethodResult(b.finish(node, info), deq, info)


    def tune_block(self, block: BlockTuning, config: AQLMConfig) -> dict[str, QuantizedTensor] | None:
        """AQLM's fine-tuning of the block (:mod:`._aqlm_tune`): codes fixed; codebooks, scales (and norms) tuned
        to the original block's outputs, then rounded to fp16 and stored with the same codes."""
        if not config.finetune:
            return None

        def rebuild(qt: QuantizedTensor, codes: torch.Tensor, books: torch.Tensor,
                    scales: torch.Tensor, outliers: tuple[torch.Tensor, torch.Tensor] | None) -> QuantizedTensor:
            rows, cols = (int(n) for n in qt.record["shape"])
            kept = AQLMResult(codes, round_books(books), round_scales(scales), torch.empty(0), 0.0, 0.0)
            b = RecordBuilder(qt.name, (rows, cols), qt.record["dtype"])
            node = aqlm_record(b, kept, config.codebook_bits, (rows, cols))
            if outliers is not None:  # kept as they were: the tuning added them as a constant
                node = b.sum([node, sparse_outliers(b, *outliers)])
            info = {**(qt.record.get("info") or {}), "finetuned": {"steps": config.finetune_steps,
                                                                   "lr": config.finetune_lr,
                                                                   "norms": config.finetune_norms}}
            info["bits_per_weight"] = sum(a.nbytes for a in b.tensors.values()) * 8 / (rows * cols)
            return b.finish(node, info)

        return tune(block, config.finetune_steps, config.finetune_lr, config.finetune_norms, rebuild)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(AQLM())
