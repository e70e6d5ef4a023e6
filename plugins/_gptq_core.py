"""The GPTQ machinery shared by GPTQ and SpQR: Hessian preparation and the column loop with error feedback.

Recipe (IST-DASLab/gptq `gptq.py`, Vahe1994/SpQR `spqr_engine.py`): with U the upper Cholesky factor of H^-1
(U^T U = H^-1), columns are quantized one at a time in processing order; column j's scaled error
e = (w_j - q_j) / U[j, j] is pushed onto the later columns of its block at once (W[:, k] -= e U[j, k]) and onto the
columns after the block in one matrix product when the block ends (the "lazy batch" update).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qformat.errors import ConversionError

MAX_DAMP_RETRIES = 3


@dataclass
class PreparedHessian:
    u: torch.Tensor  # upper Cholesky factor of the damped H^-1, in processing order [n, n]
    perm: torch.Tensor | None  # processing order: column j of the loop is input column perm[j] (None = identity)
    dead: torch.Tensor  # bool [n], original order: inputs that never fired (diag H == 0)
    damp: float  # relative damping actually used (percdamp, x10 per retry)
    retries: int  # how many times damping had to be raised for the Cholesky factorisations to succeed


def check_hessian(hessian: object, n: int, layer: str) -> torch.Tensor:
    if hessian is None:
        raise ConversionError(f"layer {layer!r}: this method needs a Hessian (calibration 'hessian') and got none")
    h = torch.as_tensor(hessian).detach().to(dtype=torch.float32, device="cpu")
    if h.shape != (n, n):
        raise ConversionError(f"layer {layer!r}: Hessian has shape {list(h.shape)}, expected [{n}, {n}]")
    if not torch.isfinite(h).all():
        raise ConversionError(f"layer {layer!r}: Hessian holds NaN or Inf (calibration overflowed?)")
    return h.clone()


def act_order(diag: torch.Tensor) -> torch.Tensor:
    """Inputs by decreasing Hessian diagonal (stable, so ties keep their input order)."""
    return torch.argsort(diag, descending=True, stable=True)


def prepare_hessian(h: torch.Tensor, *, percdamp: float, use_act_order: bool, layer: str,
                    spqr_order: bool = False) -> PreparedHessian:
    """Dead inputs, act-order permutation, relative damping and U = chol(chol_inverse(chol(H)), upper).

    GPTQ order: dead diagonal set to 1, permute by the fixed diagonal, damp by percdamp * mean(diag).
    SpQR order: permute by the raw diagonal, damp by percdamp * mean(|diag|), then set the dead diagonal to 1.
    ``h`` is modified. If a factorisation fails, damping is raised x10 (from 0.01 if it was 0) up to 3 times.
    """
    n = h.shape[0]
    idx = torch.arange(n)
    dead = torch.diag(h) == 0
    if not spqr_order:
        h[dead, dead] = 1.0
    perm = act_order(torch.diag(h)) if use_act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    dead_proc = dead[perm] if perm is not None else dead
    mean_diag = float(torch.diag(h).abs().mean())
    damp = percdamp
    for retry in range(MAX_DAMP_RETRIES + 1):
        hd = h.clone()
        hd[idx, idx] += damp * mean_diag
        if spqr_order:
            hd[dead_proc, dead_proc] = 1.0
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return PreparedHessian(u, perm, dead, damp, retry)
        damp = damp * 10 if damp > 0 else 0.01
    raise ConversionError(f"layer {layer!r}: the damped Hessian is not positive definite (Cholesky failed with "
                          f"relative damping up to {damp / 10:g}); check the calibration data for this layer")


def column_blocks(n: int, block_size: int, group_size: int = 0) -> list[tuple[int, int]]:
    """Blocks [i1, i2) for the lazy batch updates, laid out so group statistics always see up-to-date weights.

    The reference fits a group at its first column from the global W, which lacks the pending in-block updates when a
    group starts inside a block (exact only for g = 128 = blocksize). Here a group either lies inside one block (its
    columns have all updates so far) or starts a block. With g = block_size (the defaults) this is the reference's
    schedule; block size changes only speed otherwise, as in the reference.
    """
    if 0 < group_size < n:
        if group_size <= block_size:
            step = block_size - block_size % group_size
            return [(i, min(i + step, n)) for i in range(0, n, step)]
        blocks, i = [], 0
        while i < n:
            end = min(i + block_size, (i // group_size + 1) * group_size, n)
            blocks.append((i, end))
            i = end
        return blocks
    return [(i, min(i + block_size, n)) for i in range(0, n, block_size)]


QuantizeColumn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
StartGroup = Callable[[int, torch.Tensor], None]


def error_feedback(wt: torch.Tensor, u: torch.Tensor, blocks: list[tuple[int, int]], quantize_column: QuantizeColumn,
                   start_group: StartGroup | None = None, group_size: int = 0) -> float:
    """Run the GPTQ column loop in place on ``wt`` = W^T in processing order ([n, R]: one row per input column).

    ``start_group(j, wt[j:j+g])`` fits statistics when column j starts a group; ``quantize_column(j, w, u_jj)``
    returns the dequantized column. On return ``wt`` holds the dequantized weight. Returns the reference's proxy
    loss sum((w - q)^2 / U_jj^2) / 2.
    """
    n = wt.shape[0]
    loss = torch.zeros((), dtype=torch.float64)
    for i1, i2 in blocks:
        u1 = u[i1:i2, i1:i2]
        errs = torch.empty(i2 - i1, wt.shape[1], dtype=wt.dtype)
        for i in range(i2 - i1):
            j = i1 + i
            if start_group is not None and j % group_size == 0:
                start_group(j, wt[j:min(j + group_size, n)])
            w = wt[j]
            d = u1[i, i]
            q = quantize_column(j, w, d)
            err = (w - q) / d
            errs[i] = err
            wt[j] = q
            if j + 1 < i2:
                wt[j + 1:i2].addr_(u1[i, i + 1:], err, alpha=-1.0)
        loss += errs.double().square().sum()
        if i2 < n:
            wt[i2:].addmm_(u[i1:i2, i2:].T, errs, alpha=-1.0)
    return float(loss) / 2
