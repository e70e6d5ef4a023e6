"""AWQ's arithmetic (mit-han-lab/llm-awq, `awq/quantize/quantizer.py`, `auto_scale.py`, `auto_clip.py`), on CPU tensors.

- :func:`pseudo_quantize` is `pseudo_quantize_tensor(zero_point=True)`: asymmetric per group over [min, max] (no forced
  zero in range), scale = (max - min).clamp(1e-5) / maxq, zero = clamp(-round(min / scale), 0, maxq). The searches use it
  as the reference does, in fp32 with an unrounded scale; :func:`quantize_stored` is the same quantizer with the scale
  rounded to fp16 first, so the file decodes to exactly what the method assumed.
- :func:`search_scale` is `_search_module_scale`: s = x_max^ratio (clamped to 1e-4), s /= sqrt(max s * min s), score the
  output error with weights Q(W s) / s, keep the first best ratio of the grid.
- :func:`clip_errors_tokens` / :func:`clip_errors_hessian` are `auto_clip_layer`'s error, per (row, group, shrink step),
  from tokens or from the Hessian H = 2/N sum x x^T: mean_t (x_g . dw_g)^2 = dw_g^T (H_gg / 2) dw_g, the same number
  without the tokens. :func:`best_clip` picks the reference's max_val = amax * (1 - i / n_grid), i < max_shrink * n_grid.

Unlike the reference (which asserts that the group divides the row), a width the group does not divide gets a shorter
last group, as qformat's other methods do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._quantizers import fp16_scale

SCALE_FLOOR = 1e-5  # the reference's (max - min).clamp(min=1e-5)
RATIO_FLOOR = 1e-4  # the reference's x_max.pow(ratio).clamp(min=1e-4)


def column_groups(cols: int, group: int) -> list[tuple[int, int]]:
    """(start, end) of each group of input columns; the last may be shorter; a group <= 0 is the whole row."""
    group = cols if group <= 0 else group
    return [(start, min(start + group, cols)) for start in range(0, cols, group)]


def _tiles(w: torch.Tensor, group: int) -> list[tuple[int, torch.Tensor]]:
    """w [..., C] as at most two views [..., n, size] (the full groups, then a shorter last one) with their offsets;
    a group <= 0 is the whole row."""
    cols = w.shape[-1]
    group = cols if group <= 0 else min(group, cols)
    full = cols - cols % group
    parts = []
    if full:
        parts.append((0, w[..., :full].reshape(*w.shape[:-1], full // group, group)))
    if full < cols:
        parts.append((full, w[..., full:].unsqueeze(-2)))
    return parts


def awq_params(w: torch.Tensor, bits: int, stored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero over the last dimension of w; ``stored`` rounds the scale to fp16 before the zero is computed."""
    maxq = (1 << bits) - 1
    max_val, min_val = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    scale = (max_val - min_val).clamp(min=SCALE_FLOOR) / maxq
    if stored:
        scale = fp16_scale(scale)
    zero = (-torch.round(min_val / scale)).clamp(0, maxq)
    return scale, zero


def _fake_quant(w: torch.Tensor, bits: int, stored: bool) -> torch.Tensor:
    scale, zero = awq_params(w, bits, stored)
    return (torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1) - zero) * scale


def pseudo_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Q(w): the reference's quantize-dequantize per group of ``group`` columns of the last dimension (fp32)."""
    out = torch.empty_like(w)
    for start, tile in _tiles(w, group):
        out[..., start:start + tile.shape[-2] * tile.shape[-1]] = _fake_quant(tile, bits, False).flatten(-2)
    return out


def quantize_stored(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """AWQ's quantizer as stored: (codes [R, C], fp16-exact scale [R, G], integer zero [R, G], dequantized [R, C]),
    dequantized the way the affine decoder does, (q - zero) * scale in fp32."""
    maxq = (1 << bits) - 1
    codes, deq = torch.empty_like(w), torch.empty_like(w)
    scales, zeros = [], []
    for start, tile in _tiles(w, group):
        scale, zero = awq_params(tile, bits, True)
        q = torch.clamp(torch.round(tile / scale) + zero, 0, maxq)
        end = start + tile.shape[-2] * tile.shape[-1]
        codes[:, start:end] = q.flatten(-2)
        deq[:, start:end] = ((q - zero) * scale).flatten(-2)
        scales.append(scale.squeeze(-1))
        zeros.append(zero.squeeze(-1))
    return codes, torch.cat(scales, 1), torch.cat(zeros, 1), deq


# -- scale search ------------------------------------------------------------------------------------------------

def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """x_max: mean |x| per input channel over all tokens (the reference's get_act_scale)."""
    return x.abs().reshape(-1, x.shape[-1]).mean(0)


def candidate_scales(x_max: torch.Tensor, ratio: float) -> torch.Tensor:
    s = x_max.pow(ratio).clamp(min=RATIO_FLOOR)
    return s / (s.max() * s.min()).sqrt()


def search_scale(x_max: torch.Tensor, weights: Sequence[torch.Tensor],
                 output_error: Callable[[list[torch.Tensor]], float], bits: int, group: int,
                 n_grid: int = 20) -> tuple[torch.Tensor, float, list[float]]:
    """The best per-input-channel scale s for the linears ``weights`` (all [*, C]) and its ratio, with the error of
    every ratio of the grid. ``output_error(trial weights)`` is the MSE of the inspected output with those weights
    in place of the originals; the trial weights are Q(W s) / s. The first (smallest) ratio of equal errors is kept."""
    best_error, best_ratio, best = float("inf"), -1.0, None
    history = []
    for step in range(n_grid):
        ratio = step / n_grid
        s = candidate_scales(x_max, ratio)
        error = output_error([pseudo_quantize(w * s, bits, group) / s for w in weights])
        history.append(error)
        if error < best_error:
            best_error, best_ratio, best = error, ratio, s
    if best is None:  # every error was NaN or inf: the reference raises too
        raise ArithmeticError(f"AWQ scale search found no finite output error (errors {history})")
    return best, best_ratio, history


# -- clip search -------------------------------------------------------------------------------------------------

def _clip_steps(n_grid: int, max_shrink: float) -> int:
    return int(max_shrink * n_grid)


def _clipped_dw(w: torch.Tensor, bits: int, n_grid: int, max_shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For one group w [R, g]: the max_val of each shrink step [S, R, 1] and dw = Q(clamp(w)) - w [S, R, g]."""
    amax = w.abs().amax(-1, keepdim=True)
    shrink = 1 - torch.arange(_clip_steps(n_grid, max_shrink), dtype=w.dtype) / n_grid
    max_val = amax.unsqueeze(0) * shrink.view(-1, 1, 1)
    clipped = torch.clamp(w.unsqueeze(0), -max_val, max_val)
    return max_val, _fake_quant(clipped, bits, False) - w.unsqueeze(0)


def clip_errors_tokens(w: torch.Tensor, x: torch.Tensor, bits: int, group: int, n_grid: int = 20,
                       max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_val [S, R, G], error [S, R, G]): the reference's per-group output MSE over the tokens x [N, C]."""
    max_vals, errors = [], []
    for start, end in column_groups(w.shape[1], group):
        max_val, dw = _clipped_dw(w[:, start:end], bits, n_grid, max_shrink)
        out = torch.einsum("nc,src->srn", x[:, start:end], dw)  # output change per token
        max_vals.append(max_val)
        errors.append(out.square().mean(-1, keepdim=True))
    return torch.cat(max_vals, -1), torch.cat(errors, -1)


def clip_errors_hessian(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, n_grid: int = 20,
                        max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (max_val, error) as :func:`clip_errors_tokens`, from H = 2/N sum x x^T instead of the tokens:
    mean_t (x_t . dw)^2 = dw^T (H_gg / 2) dw for each group's diagonal block H_gg."""
    max_vals, errors = [], []
    for start, end in column_groups(w.shape[1], group):
        max_val, dw = _clipped_dw(w[:, start:end], bits, n_grid, max_shrink)
        h = hessian[start:end, start:end] / 2
        max_vals.append(max_val)
        errors.append(torch.einsum("src,cd,srd->sr", dw, h, dw).unsqueeze(-1))
    return torch.cat(max_vals, -1), torch.cat(errors, -1)


def best_clip(max_val: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """max_val [R, G] of the first shrink step with the least error (the reference's strict `err < min_errs`)."""
    step = torch.argmin(error, dim=0, keepdim=True)  # argmin returns the first minimum
    return torch.gather(max_val, 0, step).squeeze(0)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group: int) -> torch.Tensor:
    """w clamped per (row, group) to [-max_val, max_val]."""
    out = w.clone()
    for j, (start, end) in enumerate(column_groups(w.shape[1], group)):
        bound = max_val[:, j:j + 1]
        out[:, start:end] = torch.clamp(w[:, start:end], -bound, bound)
    return out
