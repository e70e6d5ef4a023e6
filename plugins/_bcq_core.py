"""Binary-coding quantization of groups of weights, ``x ≈ Σ_i α_i b_i`` with ``b_i ∈ {−1, +1}`` (LUT-GEMM's BCQ).

Read from naver-aics/lut-gemm ``examples/bcq.py`` (``greedy_mean_torch``, ``refine_mean_torch``, ``find_B_torch``):

- greedy: for each plane ``b = sign(r)``, ``α = mean|r|`` over the group, ``r -= α b``;
- alternating rounds: α by least squares for the current signs (the reference runs q steps of batched conjugate
  gradient on ``BᵀB α = Bᵀw``, exact for a q × q system; here a batched least-squares solve, which also takes the
  singular systems of constant groups), α made positive and sorted in decreasing order (the 2^q candidate sums do not
  change), then every weight takes the candidate sum nearest to it (the reference's binary search over the sorted
  sums finds the same one).

Differences, on purpose: ``sign(0)`` is +1 (a stored bit has no zero; the reference's greedy step gives 0 a zero sign
only in its first plane), and the rounds stop early once no sign changes (the next round would repeat this one).
"""

from __future__ import annotations

from functools import lru_cache

import torch

CHUNK_ELEMENTS = 1 << 24  # weights x candidates per assignment step: bounds the temporary distance tensor


@lru_cache(maxsize=8)
def sign_patterns(q: int) -> torch.Tensor:
    """All 2^q sign vectors [2^q, q], +1/-1 (the reference's ``list_binary_vecs`` order)."""
    patterns = [[]]
    for _ in range(q):
        patterns = [[1.0] + p for p in patterns] + [[-1.0] + p for p in patterns]
    return torch.tensor(patterns, dtype=torch.float32)


def greedy(x: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(α [N, q], signs [N, g, q]) of the greedy residual fit of groups x [N, g]."""
    r = x.clone()
    alphas, signs = [], []
    for _ in range(q):
        b = torch.where(r >= 0, 1.0, -1.0)
        a = r.abs().mean(dim=1, keepdim=True)
        r -= a * b
        alphas.append(a)
        signs.append(b)
    return torch.cat(alphas, dim=1), torch.stack(signs, dim=-1)


def nearest_signs(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Signs [N, g, q] giving each weight of x [N, g] the nearest of its group's 2^q sums Σ ±α_i (first on ties)."""
    n, g = x.shape
    patterns = sign_patterns(alpha.shape[1])
    out = torch.empty(n, g, alpha.shape[1])
    step = max(1, CHUNK_ELEMENTS // (g * patterns.shape[0]))
    for i in range(0, n, step):
        sums = alpha[i:i + step] @ patterns.T  # [n', 2^q]
        idx = (x[i:i + step].unsqueeze(-1) - sums.unsqueeze(1)).abs().argmin(dim=-1)
        out[i:i + step] = patterns[idx]
    return out


def least_squares_alpha(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """α [N, q] minimising ‖x − signs α‖² per group (minimum-norm where the signs are linearly dependent)."""
    bt = signs.transpose(1, 2)
    gram = bt @ signs
    rhs = bt @ x.unsqueeze(-1)
    return torch.linalg.lstsq(gram.double(), rhs.double(), driver="gelsd").solution.squeeze(-1).float()


def fit(x: torch.Tensor, q: int, rounds: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(α [N, q] ≥ 0, signs [N, g, q], rounds run) for groups x [N, g]: the greedy fit (its own signs, as the
    reference's ``rounds=0``), then up to ``rounds`` alternating rounds (α then in decreasing order)."""
    alpha, signs = greedy(x, q)
    if q == 1:  # mean |x| is already the least-squares α of sign(x), and sign(x) the nearest of ±α
        return alpha, signs, 0
    done = 0
    for done in range(1, rounds + 1):
        alpha = least_squares_alpha(x, signs).abs().sort(dim=1, descending=True).values
        new = nearest_signs(x, alpha)
        if torch.equal(new, signs):
            return alpha, signs, done
        signs = new
    return alpha, signs, done
