"""BitStack (Wang et al. 2024): a weight as a stack of sign-times-low-rank blocks; load as many as memory allows.

Follows the reference (``BitStackLinear.decompose_weight``, ``scale_utils.py``):

1. activation-aware scaling: ``W ← W · diag(s)`` with ``s`` the calibration activations' per-channel size plus
   1e-3; the record divides it back out with an input-channel ``scale`` node (``1 / s`` in F16, so the stored factor
   is exact and the decomposition is of ``W / f``), instead of folding ``s`` into the preceding norm;
2. for each of ``blocks`` steps: ``sign = sign(W)`` (0 → +1), ``U, S, Vᵀ = svd(|W|)``, ``u = U_k √S_k``,
   ``v = √S_k V_kᵀ`` in F16, ``W ← W − sign ⊙ (u v)`` (the residual of the stored, fp16 values);
3. the file is ``scale(sum(sign_lowrank_0, …, sign_lowrank_{n−1}), 1 / s)`` (spec/composition.md "BitStack"): the
   first P terms are the weight at P blocks (``qformat.format.partial``).

Differences, stated: ``s`` is the RMS of each input channel over all calibration tokens (``sqrt(diag H / 2)``), where
the reference averages per-sample L2 norms over the tokens of each sample (the same up to a constant for equal-length
samples; only its ratio to the 1e-3 floor changes). The reference orders blocks across layers by the perplexity of the
whole model after adding one block to one layer (n_layers × n_blocks evaluations on 32 samples); here each block
records its *gain*, the drop of its layer's calibration output error ``tr(ΔW H ΔWᵀ)`` it buys, and the loader orders
blocks level by level (every layer's block j before any block j + 1, as the reference's levels do) by gain per byte
(``qformat.format.partial.stack_order``), which needs no evaluation at conversion time.

Bits per block: ``1 + 16 k (R + C) / (R C)``: 1.125 at 4096² with k = 16, but 1.89 at SmolLM2's 576².
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qformat.plugin import LayerInput, Method, MethodConfig, ParameterError, hookimpl, output_error, param

from ._common import MethodResult, QuantizesThroughRun, record_builder, weight_matrix
from ._gptq_core import check_hessian
from ._quantizers import fp16_exact, to_fp16

SCALE_FLOOR = 1e-3  # reference: s = mean L2 norm + 1e-3


@dataclass(frozen=True)
class BitStackConfig(MethodConfig):
    """bitstack's parameters: blocks per weight and their rank."""

    method = "bitstack"
    blocks: int = param(16, "sign x low-rank blocks per weight (the reference script's --niter 16); the loader keeps "
                        "a prefix of them", min=1, max=64)
    rank: int = param(16, "rank k of each block's magnitude u v (reference --k 16)", min=1, max=4096)
    act_scale: bool = param(True, "activation-aware column scaling before the decomposition (from the calibration "
                            "Hessian's diagonal)")


class BitStack(QuantizesThroughRun, Method):
    config = BitStackConfig
    description = ("BitStack: W·diag(s) decomposed into `blocks` residual blocks sign(W) ⊙ (u v) with rank-k fp16 "
                   "magnitudes from the SVD of |W|; stored as a sum of sign_lowrank terms under a 1/s column scale, "
                   "each block's output-error gain recorded so a loader keeps the blocks that fit a memory budget.")
    calibration = frozenset({"hessian"})

    def check_shapes(self, config: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            rows, cols = shape[0], int(np.prod(shape[1:]))
            if config.rank > min(rows, cols):
                raise ParameterError(f"method 'bitstack' parameter 'rank': {config.rank} exceeds min(rows, columns) "
                                     f"= {min(rows, cols)} of {name} {list(shape)}; choose rank <= {min(rows, cols)}")

    def run(self, layer: LayerInput, config: BitStackConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        rows, cols = w.shape
        k = config.rank
        if k > min(rows, cols):
            raise ParameterError(f"method 'bitstack' parameter 'rank': {k} exceeds min(rows, columns) = "
                                 f"{min(rows, cols)} of {layer.name}")
        h = check_hessian(layer.hessian, cols, layer.name).double()
        if config.act_scale:
            s = torch.sqrt(torch.diagonal(h).clamp(min=0) / 2).float() + SCALE_FLOOR
            factor = fp16_exact(1.0 / s)  # W = factor * W', stored exactly
        else:
            factor = torch.ones(cols)
        residual = w / factor  # the matrix decomposed (W diag(s) up to the factor's fp16 rounding)
        approx = torch.zeros(rows, cols)
        b = record_builder(layer)
        terms, gains = [], []
        error = output_error(w, h)
        for i in range(config.blocks):
            sign = residual >= 0
            u_k, sv, vh_k = _top_singular(residual.abs(), k)
            root = sv.sqrt()
            u, v = fp16_exact(u_k * root), fp16_exact(root[:, None] * vh_k)
            magnitude = u @ v
            block = torch.where(sign, magnitude, -magnitude)
            residual -= block
            approx += block  # the sum codec adds the blocks left to right, as here
            new_error = output_error(w - approx * factor, h)
            gains.append(error - new_error)
            error = new_error
            terms.append(b.sign_lowrank(b.packed(f"b{i}.sign", sign.to(torch.uint8).numpy(), 1),
                                        b.tensor(f"b{i}.u", to_fp16(u)), b.tensor(f"b{i}.v", to_fp16(v))))
        node = b.scale(b.sum(terms) if len(terms) > 1 else terms[0],
                       b.tensor("inv_act_scale", to_fp16(factor.unsqueeze(0))), (rows, 1))
        info = {"method": self.name, "params": config.to_params(), "blocks": config.blocks, "rank": k,
                "stack_gains": [float(g) for g in gains]}
        return MethodResult(b.finish(node, info), approx * factor, info)


def _top_singular(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, S_k, V_kᵀ) of m's SVD; a wide matrix is decomposed through its transpose (LAPACK is ~2x faster on the
    tall orientation, measured on 576x1536)."""
    if m.shape[0] < m.shape[1]:
        u, s, vh = torch.linalg.svd(m.T, full_matrices=False)
        return vh[:k].T, s[:k], u[:, :k].T
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]




@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(BitStack())
