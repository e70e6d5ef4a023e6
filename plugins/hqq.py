"""HQQ (Badri & Shaji 2023): half-quadratic optimisation of each group's zero point, no calibration data.

Follows mobiusml/hqq `hqq/core/quantize.py` (Quantizer.quantize, BaseQuantizeConfig) and `hqq/core/optimize.py`
(optimize_weights_proximal_legacy, the default): min-max start with HQQ's inverse scale, then the lp (p = 0.7)
proximal zero update with beta 10 for up to 20 iterations, stopping early; the scale stays fixed. See
:mod:`._hqq_solver` for the arithmetic.

Groups:
- ``axis=1`` (HQQ's and HF HqqConfig's default): ``group_size`` contiguous input columns of a row, as HQQ's reshape to
  ``[-1, g]`` when g divides the row; stored ``group_shape [1, g]``.
- ``axis=0``: HQQ reshapes the flattened weight to ``[g, -1]``, so its groups are g elements strided ``numel / g``
  apart. The format's tiles are contiguous, so here a group is ``g`` consecutive rows of one input column
  (``group_shape [g, 1]``): the same group size and solver, different members. (HQQ on the rows permuted so that its
  strided groups are these tiles is exactly this method; tests/test_hqq.py checks that.)

Storage: ``affine(packed codes, scale=fp16 1/s, zero)``: the zero is a packed bits-wide integer when every zero is an
integer in [0, 2^bits) (optimize=false with round_zero, as HQQ's 4-bit default starts), otherwise fp16. The solver runs
on the stored values (fp16 scale, fp16 zero after each update, codes against them), so the record decodes exactly to
the weight it settled on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.plugin import LayerInput, Method, MethodConfig, ParameterError, hookimpl, param

from ._common import MethodResult, QuantizesThroughRun, record_builder, weight_matrix
from ._hqq_solver import SolverOptions, init_params, solve
from ._quantizers import dequantize, to_fp16, to_uint8

DEFAULT_KAPPA = 1.01


@dataclass(frozen=True)
class HQQConfig(MethodConfig):
    """hqq's parameters: BaseQuantizeConfig's (nbits, group_size, axis; round_zero when 4-bit) and the solver's."""

    method = "hqq"
    bits: int = param(4, "bits per weight code", min=1, max=8)
    group_size: int = param(64, "weights per scale/zero: input columns of a row (axis 1) or rows of a column (axis 0); "
                            "-1 or 0 = the whole row/column; need not divide it (the last group is shorter)",
                            min=-1, max=1 << 20)
    axis: int = param(1, "1: groups along a row (contiguous input columns); 0: groups of consecutive rows within an "
                      "input column", choices=(0, 1))
    optimize: bool = param(True, "run the half-quadratic zero-point solver (false: plain rounding from min-max)")
    round_zero: str = param("auto", "round the starting zero to an integer (auto: when bits == 4, as HQQ)",
                            choices=("auto", "true", "false"))
    lp_norm: float = param(0.7, "p of the lp error the solver minimises", min=0.1, max=1.0)
    beta: float = param(10.0, "half-quadratic penalty beta", min=1e-6, max=1e6)
    kappa: float = param(DEFAULT_KAPPA, "beta growth per iteration, solver=slow only (HQQ's legacy solver never "
                         "grows beta)", min=1.0, max=2.0)
    iters: int = param(20, "solver iterations at most (HQQ: 20 legacy, 100 slow)", min=1, max=1000)
    solver: str = param("legacy", "legacy: HQQ's default, early stop when the mean error stops falling; slow: "
                        "optimize_weights_proximal_slow's loop (beta *= kappa, no early stop)",
                        choices=("legacy", "slow"))

    def check(self) -> None:
        if self.solver == "legacy" and self.kappa != DEFAULT_KAPPA:
            raise ParameterError(f"method 'hqq' parameter 'kappa': {self.kappa} has no effect with solver=legacy "
                                 "(HQQ's legacy solver never grows beta); use solver=slow")

    @property
    def rounds_zero(self) -> bool:
        return self.bits == 4 if self.round_zero == "auto" else self.round_zero == "true"


def group_matrix(w: torch.Tensor, group: int, axis: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [R, C] as HQQ's group matrix: axis 1 -> [R * G, g] (row-major groups of a row), axis 0 -> [g, G * C]
    (column t * C + c = rows t*g .. t*g+g-1 of column c). A ragged last group is padded with copies of the last real
    row/column; the mask (None without padding) marks real weights."""
    rows, cols = w.shape
    length = cols if axis == 1 else rows
    n_groups = -(-length // group)
    padded = n_groups * group
    idx = torch.arange(padded).clamp(max=length - 1)
    real = (torch.arange(padded) < length).float()
    if axis == 1:
        m = w[:, idx].reshape(rows * n_groups, group)
        mask = real.expand(rows, padded).reshape(rows * n_groups, group)
    else:
        m = w[idx].reshape(n_groups, group, cols).permute(1, 0, 2).reshape(group, n_groups * cols)
        mask = real[:, None].expand(padded, cols).reshape(n_groups, group, cols).permute(1, 0, 2).reshape(
            group, n_groups * cols)
    return m.contiguous(), (mask.contiguous() if padded != length else None)


def from_group_matrix(m: torch.Tensor, shape: tuple[int, int], group: int, axis: int) -> torch.Tensor:
    """The inverse of :func:`group_matrix` (padding dropped)."""
    rows, cols = shape
    if axis == 1:
        return m.reshape(rows, -1)[:, :cols]
    return m.reshape(group, -1, cols).permute(1, 0, 2).reshape(-1, cols)[:rows]


def param_grid(p: torch.Tensor, shape: tuple[int, int], axis: int) -> torch.Tensor:
    """Per-group parameters from the group matrix ([R*G, 1] or [1, G*C]) as the affine grid ([R, G] or [G, C])."""
    return p.reshape(shape[0], -1) if axis == 1 else p.reshape(-1, shape[1])


def expand_grid(p: torch.Tensor, shape: tuple[int, int], group: int, axis: int) -> torch.Tensor:
    """The affine grid broadcast to [R, C] (the decoder's expansion)."""
    rows, cols = shape
    if axis == 1:
        return p.repeat_interleave(group, dim=1)[:, :cols]
    return p.repeat_interleave(group, dim=0)[:rows]


class HQQ(QuantizesThroughRun, Method):
    config = HQQConfig
    description = ("HQQ: min-max groups (along a row, axis 1, or down a column, axis 0) whose float zero points are "
                   "optimised by HQQ's half-quadratic lp solver (p 0.7, beta 10, 20 iterations, early stop); fp16 "
                   "scale and zero, no calibration.")
    calibration = frozenset()


    def run(self, layer: LayerInput, config: HQQConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        bits, axis = config.bits, config.axis
        w = weight_matrix(layer)
        shape = (w.shape[0], w.shape[1])
        length = shape[1] if axis == 1 else shape[0]
        group = length if config.group_size <= 0 else min(config.group_size, length)
        m, mask = group_matrix(w, group, axis)
        inv_scale, zero = init_params(m, bits, axis, config.rounds_zero)
        opts = SolverOptions(config.lp_norm, config.beta, config.kappa, config.iters, config.solver)
        fit = solve(m, inv_scale, zero, bits, axis, opts, stored=True, mask=mask, optimize=config.optimize)
        assert fit.scale is not None
        scale = param_grid(fit.scale, shape, axis)
        zero = param_grid(fit.zero, shape, axis)
        codes = from_group_matrix(fit.codes, shape, group, axis)
        deq = dequantize(codes, expand_grid(scale, shape, group, axis), expand_grid(zero, shape, group, axis))

        b = record_builder(layer)
        maxq = (1 << bits) - 1
        integral = bool(((zero == torch.round(zero)) & (zero >= 0) & (zero <= maxq)).all())
        zero_node = b.packed("zero", to_uint8(zero), bits) if integral else b.tensor("zero", to_fp16(zero))
        node = b.affine(b.packed("codes", to_uint8(codes), bits), scale=b.tensor("scale", to_fp16(scale)),
                        zero=zero_node, bits=bits, group_shape=(1, group) if axis == 1 else (group, 1))
        numel = shape[0] * shape[1]
        info = {"method": self.name, "params": config.to_params(), "iterations": fit.iterations,
                "bits_per_weight": sum(a.nbytes for a in b.tensors.values()) * 8 / numel}
        return MethodResult(b.finish(node, info), deq, info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(HQQ())
