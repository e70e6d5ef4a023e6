"""Scalar min-max quantizers shared by the built-in methods (recipes of GPTQ's `quant.py` and SpQR's `quant_groups.py`).

Two rules make a file decode to exactly what a method assumed while quantizing:
- every statistic that is stored in fp16 is rounded to fp16 *before* codes are computed from it;
- dequantization is written the way the format's affine decoder computes it: ``(q - zero) * scale`` in fp32.
"""

from __future__ import annotations

import numpy as np
import torch

FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): a stored scale never rounds to 0
FP16_MAX = 65504.0
SPQR_EPS = 1e-9  # SpQR divides by scale.clamp_min(1e-9)


def fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 (saturating), returned as fp32 so later arithmetic is the decoder's fp32."""
    return x.clamp(-FP16_MAX, FP16_MAX).half().float()


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """A positive scale as stored: fp16, never 0."""
    return fp16_exact(scale.clamp(FP16_TINY, FP16_MAX))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float) -> torch.Tensor:
    """The affine decoder's formula, bit for bit: (q - zero) * scale in fp32."""
    return (codes - zero) * scale


# -- GPTQ / RTN quantizer (quant.py): zero forced into [xmin, xmax], integer zero ---------------------------------

def gptq_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-exact) and zero per row of x [..., n], over the last dimension.

    Asymmetric: range [min(x, 0), max(x, 0)], zero = round(-xmin / scale) in [0, maxq].
    Symmetric: range +-max|x| (a row with no negative value keeps xmin = 0, as the reference does), zero (maxq+1)/2.
    """
    maxq = (1 << bits) - 1
    xmin = x.amin(-1).clamp(max=0.0)
    xmax = x.amax(-1).clamp(min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = fp16_scale((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def gptq_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero, 0, maxq) (as floats holding integers)."""
    return gptq_round(x / scale, zero, bits)


def gptq_round(scaled: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """In place: ``scaled`` (x / scale) becomes clamp(round(scaled) + zero, 0, maxq); returns it."""
    return scaled.round_().add_(zero).clamp_(0, (1 << bits) - 1)


def largest_share(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the round(fraction * numel) largest ``scores`` (ties at the threshold are all kept): the outliers of
    squeeze (|w|) and aqlm (w² H_cc)."""
    count = round(fraction * scores.numel())
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores.reshape(-1), scores.numel() - count + 1).values
    return scores >= threshold


def grouped(x: torch.Tensor, group: int) -> list[torch.Tensor]:
    """Views of x [R, C] split into column groups of ``group`` (the last one may be shorter)."""
    return list(torch.split(x, group, dim=1))


# -- SpQR quantizer (quant_groups.py): plain min-max, float zero, quantized statistics ------------------------------

def minmax_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SpQR's first-level fit: scale = (xmax - xmin) / maxq, zero = -xmin / scale, unrounded; no forced 0 in range."""
    maxq = (1 << bits) - 1
    flat = xmin == xmax
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    return scale, -xmin / scale


def spqr_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(x / max(scale, eps) + zero), 0, maxq)."""
    return torch.round(x / scale.clamp_min(SPQR_EPS) + zero).clamp(0, (1 << bits) - 1)


class QuantizedStats:
    """A statistic vector [R] quantized asymmetrically to ``bits`` over groups of ``group`` consecutive rows.

    Each row group has its own fp16 scale and fp16 (float) zero; ``values`` is the dequantized fp32 vector, exactly what
    the nested affine node decodes to.
    """

    def __init__(self, v: torch.Tensor, bits: int, group: int) -> None:
        rows = v.shape[0]
        n_groups = -(-rows // group)
        pad = n_groups * group - rows
        # Padding with a copy of the last value changes no group's min or max.
        tiles = torch.cat([v, v[-1:].expand(pad)]).view(n_groups, group) if pad else v.view(n_groups, group)
        xmin, xmax = tiles.amin(1), tiles.amax(1)
        flat = xmin == xmax
        xmin = torch.where(flat, -1.0, xmin)
        xmax = torch.where(flat, 1.0, xmax)
        self.scale = fp16_scale((xmax - xmin) / ((1 << bits) - 1))
        self.zero = fp16_exact(-xmin / self.scale)
        codes = torch.round(tiles / self.scale[:, None] + self.zero[:, None]).clamp(0, (1 << bits) - 1)
        self.codes = codes.reshape(-1)[:rows]
        self.values = dequantize(codes, self.scale[:, None], self.zero[:, None]).reshape(-1)[:rows]


def to_uint8(codes: torch.Tensor) -> np.ndarray:
    return codes.to(torch.uint8).numpy()


def to_fp16(values: torch.Tensor) -> np.ndarray:
    return values.half().numpy()
