"""The ``smooth`` block transform: SmoothQuant-style per-input-channel scales (SVDQuant's smoothing step).

Following mit-han-lab/deepcompressor `calib/smooth.py` (`get_smooth_scale`, `SmoothCalibrator`) with the AbsMax /
AbsMax spans of `configs/svdquant/__default__.yaml`: for the linears fed by one norm or linear (a scale pair of
:mod:`qformat.block_layout`),

    s_j = max_t |x_tj| ^ alpha / max_i |W_ij| ^ beta        (W: the pair's linears stacked, beta = 1 - alpha)

and the linears compute ``(x / s) @ (W · diag(s))ᵀ``: 1/s is folded into the norm (or the previous linear's rows) and s
into the linears' columns, function-preserving. A selected linear no pair feeds (o_proj under grouped-query attention,
where v's rows repeat over heads) gets a :class:`ColumnScale` input transform instead, so the file stays exact.

``n_grid = 0`` (default) uses ``alpha`` as given. ``n_grid = n > 0`` searches deepcompressor's ``beta = -2`` grid:
(alpha, beta) in {(0, 0)} ∪ {(i/n, 0)} ∪ {(i/n, 1 - i/n)}, i = 1..n-1, keeping the first candidate with the lowest
output error of the pair's selected linears, Σ tr(ΔW H ΔWᵀ) with ΔW = Q(W · diag(s)) / s − W, Q the method's group
quantizer (rtn's, ``bits``/``group_size``/``sym``) and H = Σ x xᵀ over the calibration tokens: candidate (0, 0) is no
scaling, so the search never does worse than no smoothing on that measure. deepcompressor scores with activations
quantized as well (W4A4); this is weight-only, so only the weight error counts.

Unlike the reference, s is normalised by sqrt(max s · min s) (as AWQ does): group quantization is unchanged by a
constant factor, and the folded norm weights stay near their original magnitude (an F16/BF16 norm would otherwise
over- or underflow). Entries that are zero or not finite (a dead channel) get s = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qformat.plugin import BlockInput, ColumnScale, ScalePair, scale_columns

from ._common import effective_group
from .rtn import rtn_quantize


@dataclass
class _Unit:
    """Linears sharing one input and one scale: a layout pair (folded) or a lone linear (ColumnScale)."""

    linears: tuple[str, ...]
    pair: ScalePair | None
    absmax: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    tokens: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """deepcompressor's get_smooth_scale (x_max^alpha / w_max^beta; (0, 0) is all ones), with zero or non-finite
    entries set to 1, normalised by sqrt(max · min)."""
    x_max, w_max = x_max.to(torch.float64), w_max.to(torch.float64)
    if alpha == 0 and beta == 0:
        return torch.ones_like(x_max, dtype=torch.float32)
    s = x_max.pow(alpha) if alpha > 0 else torch.ones_like(x_max)
    if beta > 0:
        s = s / w_max.pow(beta)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    s = s / (s.max() * s.min()).sqrt()
    return s.to(torch.float32)


def grid(alpha: float, n_grid: int) -> list[tuple[float, float]]:
    """The (alpha, beta) candidates: the fixed (alpha, 1 - alpha), or deepcompressor's beta = -2 grid."""
    if n_grid <= 0:
        return [(alpha, 1.0 - alpha)]
    choices = [i / n_grid for i in range(1, n_grid)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in choices] + [(a, 1.0 - a) for a in choices]


def output_error(weights: list[torch.Tensor], s: torch.Tensor, gram: torch.Tensor, bits: int, group: int,
                 sym: bool) -> float:
    """Σ tr(ΔW H ΔWᵀ), ΔW = Q(W · diag(s)) / s − W, over the given weights (H = Σ x xᵀ of their input)."""
    total = 0.0
    for w in weights:
        scaled = w * s[None, :]
        _, deq, _, _ = rtn_quantize(scaled, bits, sym, effective_group(group, w.shape[1]))
        dw = deq / s[None, :] - w
        total += float(((dw @ gram) * dw).sum(dtype=torch.float64))
    return total


def _units(block: BlockInput, fold: bool) -> list[_Unit]:
    selected = set(block.linears)
    units, covered = [], set()
    for pair in block.layout:  # SkipBlock for a layout it does not know, before anything changes
        if any(name in selected for name in pair.linears):
            units.append(_Unit(pair.linears, pair if fold else None))
        covered.update(pair.linears)
    modules = dict(block.block.named_modules())
    for name in block.linears:
        if name not in covered and isinstance(modules.get(name), nn.Linear):
            units.append(_Unit((name,), None))
    return units


def _collect(block: BlockInput, units: list[_Unit], gram: bool) -> None:
    """One forward over the calibration windows: per unit, max |x| per input channel (and Σ x xᵀ for the search)."""
    modules = dict(block.block.named_modules())

    def hook(unit: _Unit):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            if x.shape[0] == 0:
                return
            amax = x.abs().amax(0)
            unit.absmax = amax if unit.absmax is None else torch.maximum(unit.absmax, amax)
            if gram:
                xtx = x.T @ x
                unit.gram = xtx if unit.gram is None else unit.gram + xtx
            unit.tokens += x.shape[0]
        return record

    handles = [modules[unit.linears[0]].register_forward_pre_hook(hook(unit)) for unit in units]
    try:
        block.capture([])  # runs the block; the hooks record what is needed
    finally:
        for handle in handles:
            handle.remove()


def smooth_block(block: BlockInput, alpha: float, n_grid: int, bits: int, group: int, sym: bool,
                 fold: bool = True) -> tuple[dict[str, ColumnScale], list[dict[str, Any]]]:
    """Compute and apply the smoothing scales of one block: folds in place, and the ColumnScales of the selected
    linears no fold reaches. Returns (input transforms, per-unit info)."""
    units = _units(block, fold)
    if not units:
        return {}, []
    _collect(block, units, gram=n_grid > 0)
    selected = set(block.linears)
    transforms: dict[str, ColumnScale] = {}
    infos = []
    modules = dict(block.block.named_modules())
    for unit in units:
        if unit.absmax is None:
            continue  # no calibration token reached it
        linears = [modules[name] for name in unit.linears]
        w_max = torch.stack([m.weight.detach().abs().amax(0) for m in linears]).amax(0)
        candidates = grid(alpha, n_grid)
        best, errors = 0, []
        if len(candidates) > 1:
            weights = [m.weight.detach().to(torch.float32) for m, name in zip(linears, unit.linears, strict=True)
                       if name in selected]
            for i, (a, b) in enumerate(candidates):
                errors.append(output_error(weights, smooth_scale(unit.absmax, w_max, a, b), unit.gram, bits, group,
                                           sym))
                if errors[i] < errors[best]:
                    best = i
        a, b = candidates[best]
        s = smooth_scale(unit.absmax, w_max, a, b)
        info: dict[str, Any] = {"linears": list(unit.linears), "alpha": a, "beta": b,
                                "folded_into": unit.pair.prev if unit.pair is not None else None}
        if errors:
            info["error_unscaled"], info["error"] = errors[0], errors[best]
        infos.append(info)
        if unit.pair is not None:
            unit.pair.fold(block.block, s)
            for m in linears:
                scale_columns(m, s)
        else:
            for name in unit.linears:
                if name in selected:
                    transforms[name] = ColumnScale(s)
    return transforms, infos
