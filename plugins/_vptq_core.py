"""VPTQ's mathematics: vectors along output features, Hessian-weighted k-means, GPTQ-style vector assignment.

Written from the algorithm of microsoft/VPTQ (``algorithm`` branch: ``vptq/vptq.py``, ``vptq/quantizer.py``,
``algorithm.md``; no code copied). The weight W [R, C] is cut into vectors of ``v`` consecutive output rows of one
input column: column c holds the R / v vectors ``W[i·v:(i+1)·v, c]``. That is ``vq`` version 2 with
``vector_shape [v, 1]`` (spec/components.md), codes ``[R / v, C]``.

1. k-means (Lloyd) over all R / v · C vectors, each weighted by its column's Hessian diagonal ``H_cc`` (the
   reference's ``kmeans_mode hessian``: the mean of the vector's per-element weights, which are all ``H_cc``);
   started from ``k`` distinct vectors drawn by a seeded generator (the reference's cuML ``init='random'``).
2. GPTQ over the columns in blocks (``block_size``) with the upper Cholesky factor U of the damped H^-1: column j's
   vectors go to their nearest centroids (plain Euclidean distance, as the reference's ``cdist``), the scaled error
   ``(w_j - q_j) / U_jj`` is pushed onto the later columns (in-block at once, after the block by one product).
3. Residual codebook (optional): k-means on the error the first pass left (``w_j - q_j`` of the updated columns,
   weighted the same way), then the GPTQ pass again from the original weight, each vector taking its nearest main
   centroid and then the residual centroid nearest to what is left.

Determinism: every random choice comes from a ``torch.Generator`` seeded with ``seed``; ties go to the lowest index
(``argmin``); centroid sums are accumulated in float64 with ``index_add_`` (serial on CPU). Codebooks are rounded to
fp16 before any code is chosen, and the dequantized weight is computed with the decoder's fp32 arithmetic (main
entry + residual entry, then times the column scale), so the record decodes bit for bit to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ._gptq_core import column_blocks, error_feedback, prepare_hessian
from ._quantizers import fp16_exact

CHUNK = 1 << 14  # vectors per distance block in k-means (bounds memory at CHUNK x k floats)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread, restored after: the GPTQ column loop is hundreds of tiny products per block
    (R / v vectors x k entries, a rank-1 update), which a second OpenMP thread only slows down, by up to 100x when the
    cores are busy (measured on 2 shared cores); and on one thread the result cannot depend on the machine's count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def column_vectors(w: torch.Tensor, v: int) -> torch.Tensor:
    """[R, C] -> [C, R / v, v]: column c's vectors, entry e of vector i being row i·v + e."""
    rows, cols = w.shape
    return w.T.reshape(cols, rows // v, v)


def nearest(x: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ``books`` [k, v] for every row of ``x`` [n, v] (squared Euclidean distance,
    ties to the lowest index), in blocks of CHUNK rows."""
    norms = books.square().sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    for lo in range(0, x.shape[0], CHUNK):
        part = x[lo:lo + CHUNK]
        dist = norms[None, :] - 2.0 * (part @ books.T)  # |x|^2 is the same for every entry
        out[lo:lo + CHUNK] = dist.argmin(1)
    return out


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, v] fp32
    iterations: int
    inertia: float  # weighted squared error of the last assignment


def weighted_kmeans(x: torch.Tensor, weight: torch.Tensor, k: int, iters: int, seed: int,
                    points_per_centre: int = 128) -> KMeansResult:
    """Lloyd's algorithm on ``x`` [n, v] with per-vector weights ``weight`` [n] (>= 0), ``k`` <= n clusters.

    Fits on at most ``points_per_centre · k`` vectors drawn without replacement (AQLM's ``max_points_per_centroid``;
    every vector is assigned afterwards by the GPTQ pass). Start: ``k`` distinct vectors of those. Both draws come
    from a generator seeded with ``seed``. A cluster that loses all its weight keeps its centre. Stops after ``iters``
    iterations or when no assignment changes. Runs on one thread (:func:`one_thread`).
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n > points_per_centre * k:
        pick = torch.randperm(n, generator=gen)[:points_per_centre * k].sort().values
        x, weight = x[pick], weight[pick]
        n = x.shape[0]
    centres = x[torch.randperm(n, generator=gen)[:k]].clone()
    if float(weight.sum()) <= 0:
        weight = torch.ones_like(weight)
    w64, x64 = weight.double(), x.double()
    labels = None
    done = 0
    with one_thread():
        for step in range(1, iters + 1):
            new = nearest(x, centres)
            if labels is not None and torch.equal(new, labels):
                break
            labels, done = new, step
            mass = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, w64)
            moment = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x64 * w64[:, None])
            alive = mass > 0
            centres = centres.clone()
            centres[alive] = (moment[alive] / mass[alive, None]).float()
        final = nearest(x, centres)
    inertia = float((w64 * (x64 - centres.double()[final]).square().sum(1)).sum())
    return KMeansResult(centres, done, inertia)


@dataclass
class VPTQResult:
    codes: torch.Tensor  # long [R / v, C]
    books: torch.Tensor  # fp32 holding fp16 values [k, v]
    res_codes: torch.Tensor | None  # long [R / v, C]
    res_books: torch.Tensor | None  # [k_res, v]
    dequantized: torch.Tensor  # fp32 [R, C], in the (normalised) space quantized: main + residual entries
    kmeans_iterations: list[int]
    proxy_loss: float  # GPTQ's sum((w - q)^2 / U_jj^2) / 2 of the final pass


def vector_weights(diag: torch.Tensor, rows: int, v: int) -> torch.Tensor:
    """Per-vector k-means weights [C · R / v] (column-major like column_vectors): the column's H diagonal."""
    return diag.clamp_min(0.0).repeat_interleave(rows // v)


def gptq_pass(w: torch.Tensor, u: torch.Tensor, block_size: int, v: int, books: torch.Tensor,
              res_books: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                                       torch.Tensor, float]:
    """One GPTQ pass over the columns of ``w`` [R, C] (not modified). Returns codes, residual codes, the dequantized
    weight, the per-column error left at quantization time (w_j - q_j of the updated column) and the proxy loss."""
    rows, cols = w.shape
    groups = rows // v
    codes = torch.empty(groups, cols, dtype=torch.long)
    res_codes = torch.empty(groups, cols, dtype=torch.long) if res_books is not None else None
    left = torch.empty(cols, rows)

    def quantize_column(j: int, col: torch.Tensor, _d: torch.Tensor) -> torch.Tensor:
        vectors = col.reshape(groups, v)
        idx = nearest(vectors, books)
        codes[:, j] = idx
        q = books[idx]
        if res_books is not None:
            ridx = nearest(vectors - q, res_books)
            res_codes[:, j] = ridx  # type: ignore[index]
            q = q + res_books[ridx]  # fp32, main then residual: the decoder's sum order
        q = q.reshape(rows)
        left[j] = col - q
        return q

    wt = w.T.contiguous()
    with one_thread():
        loss = error_feedback(wt, u, column_blocks(cols, block_size), quantize_column)
    return codes, res_codes, wt.T.contiguous(), left.T.contiguous(), loss


def vptq(w: torch.Tensor, h: torch.Tensor, *, v: int, k: int, k_res: int, iters: int, block_size: int,
         damp: float, seed: int, layer: str) -> VPTQResult:
    """Quantize ``w`` [R, C] (fp32, R a multiple of v) with Hessian ``h`` [C, C] (modified). Dead inputs (H_cc = 0)
    are zeroed first, as the reference does."""
    rows, cols = w.shape
    diag = torch.diagonal(h).clone()
    prep = prepare_hessian(h, percdamp=damp, use_act_order=False, layer=layer)
    w = w.clone()
    w[:, prep.dead] = 0.0
    weights = vector_weights(torch.where(prep.dead, 0.0, diag), rows, v)
    flat = column_vectors(w, v).reshape(-1, v)
    main = weighted_kmeans(flat, weights, k, iters, seed)
    books = fp16_exact(main.centroids)
    iterations = [main.iterations]
    codes, res_codes, deq, left, loss = gptq_pass(w, prep.u, block_size, v, books, None)
    res_books = None
    if k_res > 0:
        residual = weighted_kmeans(column_vectors(left, v).reshape(-1, v), weights, k_res, iters, seed + 1)
        res_books = fp16_exact(residual.centroids)
        iterations.append(residual.iterations)
        codes, res_codes, deq, _, loss = gptq_pass(w, prep.u, block_size, v, books, res_books)
    return VPTQResult(codes, books, res_codes, res_books, deq, iterations, loss)
