"""SqueezeLLM (Kim et al. 2023): per-row non-uniform scalar codebooks from sensitivity-weighted k-means, optionally
dense-and-sparse.

Follows SqueezeAILab/SqueezeLLM `quantization/nuq.py` and `squeezellm/outliers.py`:
- each output row gets its own 2^bits-entry codebook: a 1-D k-means of the row's weights with sample weights = the
  sensitivity of each weight, weights that are exactly 0 (and removed outliers) weighted 0, all-ones weights for a row
  whose sensitivities sum to 0; at most 50 Lloyd iterations (the reference's sklearn ``max_iter``);
- sensitivity: the reference uses the Fisher information (squared gradients) per weight; here it is the diagonal of
  the layer's calibration Hessian ``H_jj = 2/N sum x_j^2`` (the same second-order proxy GPTQ-family methods use), so a
  weight's error counts as ``H_jj (w - w^)^2``;
- dense-and-sparse: the ``outlier_fraction`` of weights with the largest magnitude (the reference's symmetric
  magnitude threshold, set per layer by a share instead of an interquartile range) leave the k-means and are stored as
  fp16 corrections in a ``sparse_csr`` term, ``sum(lut, sparse_csr)``.
  The reference's extra "sensitive values" (top Fisher entries) are not extracted: a per-column Hessian diagonal
  ranks columns, not single weights.

Differences from the reference, on purpose: the k-means starts from the weighted quantiles of each row (deterministic,
no random seed) instead of sklearn's k-means++ with random_state 0, and runs for all rows at once (see
:mod:`._kmeans`).

``grid=power`` is a cheap NUPES-style alternative (Yvinec et al. 2023, power-exponent grids): per row the table is
``absmax * sign(u) |u|^a`` over 2^bits uniform u in [-1, 1], with the exponent a picked per row from a fixed grid by the
Hessian-weighted error (NUPES learns one exponent per layer by gradient descent; this is a grid search per row).

Storage: ``lut(packed codes, table F16 [R, 1, 2^bits], group_shape [1, C])``. Codes are the nearest entries of the
fp16-rounded table, so the record decodes exactly to the weight the method reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.errors import ConversionError
from qformat.plugin import LayerInput, Method, MethodConfig, hookimpl, param

from ._common import MethodResult, QuantizesThroughRun, record_builder, sparse_outliers, weight_matrix
from ._kmeans import kmeans_rows, nearest_codes
from ._quantizers import fp16_exact, largest_share, to_fp16, to_uint8

POWER_EXPONENTS = tuple(0.5 + 0.1 * i for i in range(16))  # 0.5 .. 2.0; 1.0 is the uniform symmetric grid


@dataclass(frozen=True)
class SqueezeConfig(MethodConfig):
    """squeeze's parameters: code width, dense-and-sparse share, codebook kind and k-means iterations."""

    method = "squeeze"
    bits: int = param(3, "bits per weight code (2^bits codebook entries per row)", min=2, max=8)
    outlier_fraction: float = param(0.0, "share of weights, largest magnitude first, kept in fp16 in a sparse term "
                                    "(SqueezeLLM's dense-and-sparse 0.45% = 0.0045; 0 = dense only)", min=0.0, max=0.1)
    grid: str = param("kmeans", "kmeans: sensitivity-weighted k-means per row (SqueezeLLM); power: NUPES-style "
                      "power-exponent grid per row", choices=("kmeans", "power"))
    max_iter: int = param(50, "k-means (Lloyd) iterations at most", min=1, max=1000)


def hessian_diagonal(hessian: Any, cols: int, layer: str) -> torch.Tensor:
    if hessian is None:
        raise ConversionError(f"layer {layer!r}: squeeze weights k-means by the Hessian diagonal (calibration "
                              "'hessian') and got none")
    h = torch.as_tensor(hessian).detach().to(dtype=torch.float32, device="cpu")
    if h.shape != (cols, cols):
        raise ConversionError(f"layer {layer!r}: Hessian has shape {list(h.shape)}, expected [{cols}, {cols}]")
    diag = torch.diagonal(h).clone()
    if not torch.isfinite(diag).all():
        raise ConversionError(f"layer {layer!r}: the Hessian diagonal holds NaN or Inf (calibration overflowed?)")
    return diag.clamp_min(0.0)


def power_tables(w: torch.Tensor, weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row, the fp16 table absmax * sign(u)|u|^a (u uniform in [-1, 1]) whose nearest-entry rounding has the least
    weighted squared error, over the exponents in POWER_EXPONENTS -> [R, 2^bits] (fp32 holding fp16 values)."""
    u = torch.linspace(-1.0, 1.0, 1 << bits, dtype=torch.float64)
    absmax = (w.abs() * (weight > 0)).amax(1, keepdim=True).double()
    absmax = torch.where(absmax > 0, absmax, w.abs().amax(1, keepdim=True).double().clamp_min(1e-8))
    best_table, best_error = None, None
    for a in POWER_EXPONENTS:
        table = fp16_exact((absmax * torch.sign(u) * u.abs().pow(a)).float())
        error = (weight * (w - table.gather(1, nearest_codes(w, table))).square()).sum(1)
        if best_table is None:
            best_table, best_error = table, error
        else:
            better = error < best_error
            best_table = torch.where(better[:, None], table, best_table)
            best_error = torch.where(better, error, best_error)
    assert best_table is not None
    return best_table


class SqueezeLLM(QuantizesThroughRun, Method):
    config = SqueezeConfig
    description = ("SqueezeLLM: a 2^bits-entry fp16 codebook per output row from Hessian-diagonal-weighted k-means "
                   "(lut codec), optionally dense-and-sparse (largest-magnitude outliers in fp16 CSR) or a NUPES-style "
                   "power-exponent grid.")
    calibration = frozenset({"hessian"})


    def run(self, layer: LayerInput, config: SqueezeConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        bits = config.bits
        w = weight_matrix(layer)
        rows, cols = w.shape
        diag = hessian_diagonal(layer.hessian, cols, layer.name)
        outliers = largest_share(w.abs(), config.outlier_fraction)
        weight = diag.expand(rows, cols) * ((w != 0) & ~outliers)
        weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))  # as the reference
        iterations = 0
        if config.grid == "kmeans":
            centres, iterations = kmeans_rows(w, weight, 1 << bits, config.max_iter)
            table = fp16_exact(centres.float())  # rounding is monotone: the table stays sorted
        else:
            table = power_tables(w, weight, bits)
        codes = nearest_codes(w, table)
        dense = table.gather(1, codes)
        correction = torch.where(outliers, fp16_exact(w - dense), 0.0)
        deq = dense + correction  # what sum(lut, sparse_csr) decodes to: one fp32 addition

        b = record_builder(layer)
        terms = [b.lut(b.packed("codes", to_uint8(codes), bits), b.tensor("table", to_fp16(table[:, None, :])),
                       group_shape=(1, cols))]
        n_outliers = int(outliers.sum())
        if n_outliers:
            terms.append(sparse_outliers(b, outliers, correction[outliers]))
        numel = rows * cols
        weighted_error = float((diag * (w - deq).square()).sum() / (diag * w.square()).sum().clamp_min(1e-30))
        info = {"method": self.name, "params": config.to_params(), "outliers": n_outliers,
                "outlier_share": n_outliers / numel, "kmeans_iterations": iterations,
                "weighted_relative_error": weighted_error,
                "bits_per_weight": sum(a.nbytes for a in b.tensors.values()) * 8 / numel}
        return MethodResult(b.finish(b.sum(terms), info), deq, info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(SqueezeLLM())
