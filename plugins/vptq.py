"""VPTQ (Liu et al. 2024, microsoft/VPTQ): vector post-training quantization along output features.

Follows the ``algorithm`` branch of microsoft/VPTQ (``vptq/vptq.py``, ``vptq/quantizer.py``), see
:mod:`._vptq_core`:
- vectors of ``vector_len`` (v) consecutive output rows of one input column (the reference's transposed mode);
- one main codebook of ``codebook_size`` (k) entries from k-means weighted by the Hessian diagonal (``kmeans_mode
  hessian``), started from k distinct vectors drawn with ``seed``;
- GPTQ-style processing of the input columns in blocks of ``block_size`` with the upper Cholesky factor of the damped
  inverse Hessian: each column's vectors take their nearest centroid, the error is fed back onto later columns;
- optional residual codebook (``residual_codebook_size`` > 0): k-means on the error the first pass left, then the
  GPTQ pass again with main and residual codes (VPTQ's ``num_res_centroids``);
- optional per-input-column norm (``norm``): W is divided by its columns' RMS before quantization (the Hessian is
  scaled to match, ``S H S``, so the objective is unchanged) and the record multiplies it back.

Storage (spec/components.md ``vq`` version 2, spec/composition.md VPTQ):
``vq(packed codes [R / v, C] (b = ceil(log2 k) bits), codebooks F16 [1, 2^b, v], vector_shape [v, 1])`` (a k that
is not a power of two is padded with zero entries: packed codes' bound is 2^b); with a residual
codebook ``sum(vq_main, vq_residual)``; with ``norm`` all of it under ``scale(..., factor F16 [1, C], group [R, 1])``.
Bits per weight come from the stored bytes, codebooks and scales included: v8 k256 ≈ 1 + 32768 / (R·C) bits.

Differences from the reference, on purpose: no outlier codebook (the reference's ``npercent`` columns with their
own codebook) and no ``enable_perm``; the norm is a scale only (the reference stores per-column ``weight_scale`` and
``weight_bias``, min-max; a bias has no place in a ``scale`` node); k-means is Lloyd's algorithm in float64 sums on CPU
(the reference calls cuML's KMeans); the residual k-means uses the column weights of the main one (the reference passes
the per-element weights); codebooks are fp16, rounded before any code is chosen, so the record decodes bit for bit to
the weight the method reports. Records of ``vq`` version 2 run on the Numba kernels (a per-column histogram of
codes, or direct v-vector reads); the Triton plan refuses them, so on GPU they run on the reference path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.plugin import LayerInput, Method, MethodConfig, ParameterError, hookimpl, param

from ._common import MethodResult, QuantizesThroughRun, record_builder, weight_matrix
from ._gptq_core import check_hessian
from ._quantizers import fp16_exact, to_fp16
from ._vptq_core import vptq

VECTOR_LENGTHS = (4, 6, 8, 12, 16)
MAX_ENTRIES = 1 << 16  # 16-bit codes: the packed codec's widest


@dataclass(frozen=True)
class VPTQConfig(MethodConfig):
    """vptq's parameters: vector length, codebook sizes and the GPTQ pass."""

    method = "vptq"
    vector_len: int = param(8, "output rows per vector v (VPTQ vector_lens); must divide every quantized layer's "
                            "output width", choices=VECTOR_LENGTHS)
    codebook_size: int = param(256, "entries k of the main codebook (VPTQ num_centroids); codes take ceil(log2 k) "
                               "bits, so v8 k256 is 1 bit/weight plus the k x v fp16 codebook", min=2,
                               max=MAX_ENTRIES)
    residual_codebook_size: int = param(0, "entries of the residual codebook (VPTQ num_res_centroids); 0 = none",
                                        min=0, max=MAX_ENTRIES)
    norm: bool = param(False, "divide each input column by its RMS before quantizing, stored as a per-column scale "
                       "(VPTQ enable_norm, scale only)")
    kmeans_iters: int = param(20, "k-means (Lloyd) iterations at most, per codebook", min=1, max=1000)
    block_size: int = param(128, "input columns per GPTQ block (lazy batch updates)", min=1, max=1 << 20)
    damp: float = param(0.01, "relative Hessian damping (GPTQ percdamp)", min=0.0, max=1.0)
    seed: int = param(0, "seed of the k-means starting points", min=0, max=(1 << 31) - 1)

    def check(self) -> None:
        if self.residual_codebook_size == 1:
            raise ParameterError("method 'vptq' parameter 'residual_codebook_size': 1 entry adds a constant, not a "
                                 "codebook; use 0 (none) or at least 2")


def vector_len_error(name: str, rows: int, v: int) -> str:
    fits = [x for x in VECTOR_LENGTHS if rows % x == 0]
    hint = f"choose vector_len in {fits}" if fits else f"no vector_len in {list(VECTOR_LENGTHS)} divides it"
    return (f"method 'vptq' parameter 'vector_len': {name} has {rows} output rows, not a multiple of {v}; {hint} "
            "or leave the layer out")


def codebook_error(name: str, key: str, k: int, vectors: int) -> str:
    return (f"method 'vptq' parameter {key!r}: {k} entries but {name} has only {vectors} vectors; choose "
            f"{key} <= {vectors}")


def code_bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


class VPTQ(QuantizesThroughRun, Method):
    config = VPTQConfig
    description = ("VPTQ: vectors of v output rows per input column, Hessian-weighted k-means codebook, GPTQ-style "
                   "assignment with error feedback, optional residual codebook and per-column norm (vq version 2)")
    calibration = frozenset({"hessian"})

    def check_shapes(self, config: VPTQConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            rows, cols = int(shape[0]), 1
            for d in shape[1:]:
                cols *= int(d)
            self._check_layer(config, name, rows, cols)

    @staticmethod
    def _check_layer(config: VPTQConfig, name: str, rows: int, cols: int) -> None:
        v = config.vector_len
        if rows % v:
            raise ParameterError(vector_len_error(name, rows, v))
        vectors = rows // v * cols
        for key in ("codebook_size", "residual_codebook_size"):
            k = getattr(config, key)
            if k > vectors:
                raise ParameterError(codebook_error(name, key, k, vectors))

    def run(self, layer: LayerInput, config: VPTQConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        rows, cols = w.shape
        self._check_layer(config, layer.name, rows, cols)
        h = check_hessian(layer.hessian, cols, layer.name)
        v = config.vector_len
        scale = None
        if config.norm:
            rms = w.square().mean(0).sqrt()
            scale = fp16_exact(torch.where(rms > 0, rms, torch.ones_like(rms)))
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an fp16 underflow
            w = w / scale
            h = h * scale[:, None] * scale[None, :]
        result = vptq(w, h, v=v, k=config.codebook_size, k_res=config.residual_codebook_size,
                      iters=config.kmeans_iters, block_size=config.block_size, damp=config.damp, seed=config.seed,
                      layer=layer.name)
        deq = result.dequantized
        if scale is not None:
            deq = deq * scale  # fp32, after the sum: the record's scale(sum(...)) order

        b = record_builder(layer)

        def vq_node(role: str, codes: torch.Tensor, books: torch.Tensor) -> dict:
            bits = code_bits(books.shape[0])  # the codebook padded with zeros to 2^bits entries, as lut tables are
            padded = torch.zeros(1 << bits, v)
            padded[:books.shape[0]] = books
            return b.vq(b.packed(f"{role}codes", codes.numpy(), bits), b.tensor(f"{role}codebooks",
                        to_fp16(padded[None])), vector_shape=(v, 1))

        node = main = vq_node("", result.codes, result.books)
        if result.res_books is not None:
            assert result.res_codes is not None
            node = b.sum([main, vq_node("res.", result.res_codes, result.res_books)])
        if scale is not None:
            node = b.scale(node, b.tensor("norm", to_fp16(scale[None])), group_shape=(rows, 1))
        numel = rows * cols
        diag = torch.diagonal(torch.as_tensor(layer.hessian, dtype=torch.float32)).clamp_min(0.0)
        w0 = weight_matrix(layer)
        weighted = float((diag * (w0 - deq).square()).sum() / (diag * w0.square()).sum().clamp_min(1e-30))
        info = {"method": self.name, "params": config.to_params(), "vector_shape": [v, 1],
                "kmeans_iterations": result.kmeans_iterations, "proxy_loss": result.proxy_loss,
                "weighted_relative_error": weighted,
                "bits_per_weight": sum(a.nbytes for a in b.tensors.values()) * 8 / numel}
        return MethodResult(b.finish(node, info), deq, info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(VPTQ())
