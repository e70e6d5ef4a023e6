"""HQQ's half-quadratic zero-point solver (mobiusml/hqq `hqq/core/optimize.py`), on a matrix of groups.

The solver works on a 2-D matrix whose groups lie along ``axis`` (HQQ's convention: axis 1 = each row is a group,
axis 0 = each column is a group) with HQQ's inverse scale ``s`` (``w ~ (q - z) / s``), fixed, and a float zero ``z``:

- ``reference`` arithmetic is HQQ's own on CPU (fp32): codes ``round(w * s + z)``, ``w_r = (q - z) / s``;
- ``stored`` arithmetic is the file's: ``S = fp16(1 / s)`` is the stored scale, ``z`` is rounded to fp16 after every
  update, codes are ``round(w / S + z)`` and ``w_r = (q - z) * S`` exactly as the affine decoder computes it, so the
  dequantized weight the solver settles on is what a reader decodes, bit for bit.

``legacy`` is ``optimize_weights_proximal_legacy`` (HQQ's default): beta is never multiplied by kappa, and the loop
stops at the first iteration whose mean |w - w_r| does not improve on the best so far, returning the zero that this
failing iteration already updated (the reference returns it, so this does too). ``slow`` is
``optimize_weights_proximal_v2`` as ``optimize_weights_proximal_slow`` configures it: beta *= kappa after every
update, no early stop.

Ragged tiles (a dimension the group does not divide) are padded with copies of a real value and masked out of every
mean; without padding the means are plain ``torch.mean`` as in the reference, so reference arithmetic on an unpadded
matrix is bit-identical to HQQ's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._quantizers import fp16_exact

SCALE_CLAMP = 2e4  # HQQ clamps the inverse scale so its inverse survives half precision
FLAT_RANGE = 1e-4  # a group whose max - min is at most this gets inverse scale 1.0


@dataclass
class SolverOptions:
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    solver: str = "legacy"  # or "slow"


@dataclass
class HQQFit:
    """The solver's result on a group matrix: codes, inverse scale s, zero z (fp32 tensors broadcasting over the
    matrix), the stored scale S = fp16(1 / s) (stored arithmetic only), the dequantized matrix and the iterations run."""

    codes: torch.Tensor
    inv_scale: torch.Tensor
    zero: torch.Tensor
    scale: torch.Tensor | None
    dequantized: torch.Tensor
    iterations: int


def shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """The generalised soft-threshold of the lp (p <= 1) proximal step: sign(x) * relu(|x| - |x|^(p-1) / beta)."""
    a = x.abs()
    if lp_norm == 1:
        return (a - 1.0 / beta).clamp_min(0.0) * torch.sign(x)
    return (a - (1.0 / beta) * a.pow(lp_norm - 1)).clamp_min(0.0) * torch.sign(x)


def init_params(w: torch.Tensor, bits: int, axis: int, round_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's min-max start (Quantizer.quantize): s = maxq / (max - min) (1.0 for a flat group, at most 2e4),
    z = -min * s, rounded when round_zero."""
    maxq = round(2**bits - 1)
    wmin = w.min(axis=axis, keepdim=True)[0]
    wmax = w.max(axis=axis, keepdim=True)[0]
    denom = wmax - wmin
    s = maxq / denom
    s = torch.where(denom.abs() <= FLAT_RANGE, torch.full_like(s, 1.0), s).clamp(max=SCALE_CLAMP)
    z = -wmin * s
    return s, torch.round(z) if round_zero else z


def _mean(x: torch.Tensor, axis: int | None, mask: torch.Tensor | None, count: torch.Tensor | float | None) -> torch.Tensor:
    if mask is None:
        return x.mean() if axis is None else x.mean(axis=axis, keepdim=True)
    if axis is None:
        return (x * mask).sum() / count
    return (x * mask).sum(axis=axis, keepdim=True) / count


def solve(w: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor, bits: int, axis: int, opts: SolverOptions,
          stored: bool, mask: torch.Tensor | None = None, optimize: bool = True) -> HQQFit:
    """Optimise the zero of every group of ``w`` (fp32 [.., ..], groups along ``axis``) for fixed ``inv_scale``.

    ``mask`` (1 = real weight, 0 = padding) restricts every mean to real weights. ``optimize=False`` keeps the start
    (HQQ's optimize=False: plain rounding with the min-max parameters).
    """
    maxq = round(2**bits - 1)
    scale = fp16_exact(1.0 / inv_scale) if stored else None
    z = fp16_exact(zero) if stored else zero
    group_count = mask.sum(axis=axis, keepdim=True) if mask is not None else None
    total = mask.sum() if mask is not None else None

    def quantize(z: torch.Tensor) -> torch.Tensor:
        t = w / scale + z if stored else w * inv_scale + z
        return torch.round(t).clamp_(0, maxq)

    def dequantize(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (q - z) * scale if stored else (q - z) / inv_scale

    def update(q: torch.Tensor, w_r: torch.Tensor, beta: float) -> torch.Tensor:
        w_e = shrink_lp(w - w_r, beta, opts.lp_norm)
        target = q - ((w - w_e) / scale if stored else (w - w_e) * inv_scale)
        new = _mean(target, axis, mask, group_count)
        return fp16_exact(new) if stored else new

    beta, done = opts.beta, 0
    if optimize and opts.solver == "legacy":
        best = torch.tensor(torch.inf, dtype=torch.float32)
        for _ in range(opts.iters):
            q = quantize(z)
            w_r = dequantize(q, z)
            z = update(q, w_r, beta)
            done += 1
            error = _mean((w - w_r).abs(), None, mask, total).float()
            if error < best:
                best = error
            else:
                break
    elif optimize:
        for _ in range(opts.iters):
            q = quantize(z)
            z = update(q, dequantize(q, z), beta)
            beta *= opts.kappa
            done += 1
    q = quantize(z)
    return HQQFit(q, inv_scale, z, scale, dequantize(q, z), done)
