"""AQLM's per-layer mathematics (Egiazarian et al. 2024, written from the paper and Vahe1994/AQLM `src/aq.py`,
`src/kmeans.py`, `src/beam_search_xtx.py`; no code copied): residual k-means initialisation, Adam on codebooks and
scales with codes fixed, and beam search over codes minimising the XTX-weighted output error.

Shapes: weight ``w`` [R, C]; input groups of ``g`` columns, ``G = C / g`` of them; ``M`` codebooks of ``K = 2^B``
entries, ``books`` [M, K, g]; ``codes`` int64 [R, G, M] (``codes[r, j, m]`` is codebook m's entry for columns
``j·g … j·g + g − 1`` of row r: flattened to [R, G·M] it is exactly the ``vq`` codec's layout); per-row ``scales``
[R, 1]. The weight is ``Ŵ[r, j·g + t] = scales[r] · (((books[0, q0, t] + books[1, q1, t]) + …)`` in fp32: the
``vq`` decode (codebook order) followed by the ``scale`` decode, so :func:`dequantize` is what the file decodes to.

Objective (the reference's): ``loss = tr((W − Ŵ) H (W − Ŵ)ᵀ) / R`` with ``H`` the layer's calibration Hessian
(``2/N Σ x xᵀ``, the reference's XTX up to the factor 2, which changes neither the codes nor Adam's steps).

Determinism: everything draws from one seeded ``torch.Generator`` (the k-means starting points only) and runs a fixed
sequence of CPU ops; ties go to the lowest index (``argmin``). Two runs with the same torch thread count give the
same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._quantizers import FP16_TINY, fp16_exact

NEAREST_CHUNK = 1 << 22  # distances computed at most this many (point, centre) pairs at a time
BEAM_BLOCK = 128  # columns per lazy block of the beam search (speed only)
POINTS_PER_CENTROID = 128  # k-means fits on at most this many points per centre (the reference's
# max_points_per_centroid, a seeded random subset), then every point takes its nearest centre


# -- reconstruction and objective ---------------------------------------------------------------------------------

def reconstruct(codes: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """The unscaled sum of codebook entries [R, C], in the ``vq`` codec's order: ((B0 + B1) + B2) + … in fp32."""
    rows, groups, n_books = codes.shape
    acc = books[0][codes[..., 0]]
    for m in range(1, n_books):
        acc = acc + books[m][codes[..., m]]
    return acc.reshape(rows, groups * books.shape[-1])


def dequantize(codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Ŵ = scales · Σ_m books[m][codes[..., m]]: exactly ``scale(vq(codes, books), scales)``'s decode."""
    return reconstruct(codes, books) * scales


def objective(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) / R, accumulated in float64."""
    dw = (w - deq).double()
    return float(((dw @ h.double()) * dw).sum() / w.shape[0])


def round_books(books: torch.Tensor) -> torch.Tensor:
    """Codebooks as stored (fp16, AQLM's codebook_value_nbits=16), as fp32."""
    return fp16_exact(books.detach())


def round_scales(scales: torch.Tensor) -> torch.Tensor:
    """Per-row scales as stored (fp16, never 0 or negative: a scale is a norm), as fp32."""
    return fp16_exact(scales.detach().clamp_min(FP16_TINY))


# -- residual k-means initialisation ------------------------------------------------------------------------------

def nearest(data: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every point (squared Euclidean; ties to the lowest index) -> int64 [n]."""
    k = centres.shape[0]
    c2 = (centres * centres).sum(1)
    out = torch.empty(data.shape[0], dtype=torch.int64)
    step = max(1, NEAREST_CHUNK // k)
    for start in range(0, data.shape[0], step):
        part = data[start:start + step]
        out[start:start + step] = (c2 - 2.0 * (part @ centres.T)).argmin(1)
    return out


def kmeans(data: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of ``data`` [n, d]: k distinct random points to start (the reference's
    ``randperm`` start; with fewer points than k the rest are random repeats), at most ``iters`` updates, an empty
    cluster keeps its centre. -> (centres [k, d], codes int64 [n] of the nearest final centre)."""
    n = data.shape[0]
    perm = torch.randperm(n, generator=generator)
    if n >= k:
        centres = data[perm[:k]].clone()
    else:
        centres = torch.cat([data[perm], data[torch.randint(n, (k - n,), generator=generator)]])
    codes = nearest(data, centres)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, codes, data)
        counts = torch.bincount(codes, minlength=k).to(data.dtype)[:, None]
        updated = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres)
        if torch.equal(updated, centres):
            break
        centres = updated
        codes = nearest(data, centres)
    return centres, codes


def residual_kmeans(wn: torch.Tensor, n_books: int, k: int, group: int, iters: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """AQLM's initialisation: fit codebook m by k-means on the residual left by codebooks 0 … m−1 of the
    ``group``-wide row slices of ``wn`` (the weight divided by its row scales); with more than
    ``POINTS_PER_CENTROID · k`` slices the fit uses a seeded random subset of that many. -> (books [M, K, g], codes [R, G, M])."""
    rows, cols = wn.shape
    residual = wn.reshape(-1, group).clone()
    books, codes = [], []
    cap = POINTS_PER_CENTROID * k
    for _ in range(n_books):
        if residual.shape[0] > cap:
            subset = residual[torch.randperm(residual.shape[0], generator=generator)[:cap]]
            centres, _ = kmeans(subset, k, iters, generator)
            q = nearest(residual, centres)
        else:
            centres, q = kmeans(residual, k, iters, generator)
        residual = residual - centres[q]
        books.append(centres)
        codes.append(q)
    return torch.stack(books), torch.stack(codes, 1).reshape(rows, cols // group, n_books)


# -- beam search over codes ---------------------------------------------------------------------------------------

def beam_search(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor,
                beam_size: int) -> torch.Tensor:
    """Re-choose every code to lower tr(ΔW H ΔWᵀ), rows independently: outer loop over input groups, inner over
    codebooks (natural order), keeping the ``beam_size`` best hypotheses per row (beam 1 = greedy coordinate descent,
    which never raises the loss: the current code is among the candidates). -> the best hypothesis's codes.

    For a candidate entry v = s_r · C_m[k] in slice S of row r, with e the row's residual W − Ŵ without the current
    entry: loss = e H eᵀ − 2 v·(e H)[S] + vᵀ H[S, S] v, so only ``(e H)[:, S]`` is needed per step, as in the
    reference's ``_beam_search_squared_errors`` (which recomputes it with an [R, C] × [C, g] product per step; here
    it is kept up to date in lazy blocks of ``BEAM_BLOCK`` columns).
    """
    rows, groups, n_books = codes.shape
    k, g = books.shape[1], books.shape[2]
    s = scales[:, 0]
    err = (w - dequantize(codes, books, scales))[None]  # [B, R, C]: current residual per hypothesis
    losses = ((err[0] @ h) * err[0]).sum(1)[None]  # [B, R]
    beam = codes[None].clone()  # [B, R, G, M]
    row_index = torch.arange(rows)
    per_block = max(1, BEAM_BLOCK // g)  # groups per lazy block
    for first in range(0, groups, per_block):
        # Lazy blocks (as GPTQ's): (e H)[:, block] once per block as one wide product; inside the block only the
        # block's own columns of e change, so (e H)[:, S] = eh_block[:, S] + (e − e_start)[:, block] H[block, S].
        blk = slice(first * g, min(groups, first + per_block) * g)
        eh_block = err @ h[:, blk]  # [B, R, width]
        start_block = err[:, :, blk].clone()
        for j in range(first, min(groups, first + per_block)):
            cols = slice(j * g, (j + 1) * g)
            rel = slice(cols.start - blk.start, cols.stop - blk.start)
            h_block = h[cols, cols]
            h_part = h[blk, cols]  # [width, g]
            for m in range(n_books):
                book = books[m]
                prev = book[beam[:, :, j, m]] * s[None, :, None]  # [B, R, g]
                eh = eh_block[:, :, rel] + (err[:, :, blk] - start_block) @ h_part  # (e_cur H)[:, S]
                b = eh + prev @ h_block  # (e H)[:, S] for e = residual without the current entry
                without = losses + 2.0 * (prev * eh).sum(-1) + ((prev @ h_block) * prev).sum(-1)  # [B, R]
                quad = ((book @ h_block) * book).sum(1)  # [K]
                dots = torch.einsum("kg,brg->bkr", book, b)  # [B, K, R]
                cand = without[:, None, :] - 2.0 * s * dots + (s * s) * quad[None, :, None]  # [B, K, R]
                n_beams = cand.shape[0]
                flat = cand.permute(2, 0, 1).reshape(rows, n_beams * k)  # [R, B·K]
                if beam_size == 1:
                    best, pos = flat.min(1, keepdim=True)  # first minimum: ties to the lowest (beam, code)
                else:
                    best, pos = torch.topk(flat, min(beam_size, n_beams * k), dim=1, largest=False, sorted=True)
                src, new_code = pos // k, pos % k  # [R, B']
                if n_beams == 1 and beam_size == 1:  # greedy: every row keeps its single hypothesis
                    prev_sel = prev
                else:
                    pick = (row_index[:, None], src)
                    beam = beam.permute(1, 0, 2, 3)[pick].permute(1, 0, 2, 3).clone()
                    err = err.permute(1, 0, 2)[pick].permute(1, 0, 2).clone()
                    eh_block = eh_block.permute(1, 0, 2)[pick].permute(1, 0, 2).clone()
                    start_block = start_block.permute(1, 0, 2)[pick].permute(1, 0, 2).clone()
                    prev_sel = prev.permute(1, 0, 2)[pick].permute(1, 0, 2)
                beam[:, :, j, m] = new_code.T
                err[:, :, cols] += prev_sel - book[new_code.T] * s[None, :, None]
                losses = best.T.contiguous()
    return beam[0]  # sorted per row: hypothesis 0 is each row's best


# -- the whole per-layer optimisation -------------------------------------------------------------------------------

@dataclass
class AQLMSettings:
    n_books: int
    bits: int
    group: int
    max_epochs: int
    steps_per_epoch: int
    lr: float
    beam_size: int
    init_iters: int
    relative_tolerance: float
    seed: int


@dataclass
class Epoch:
    """Losses of one epoch: Adam on the fp32 master values (before/after), then on the stored (fp16-rounded)
    values with the epoch's old codes and after the beam search."""

    adam_before: float
    adam_after: float
    rounded: float
    beam: float


@dataclass
class AQLMResult:
    codes: torch.Tensor  # int64 [R, G, M]
    books: torch.Tensor  # fp32 holding fp16 values [M, K, g]
    scales: torch.Tensor  # fp32 holding fp16 values [R, 1]
    dequantized: torch.Tensor  # fp32 [R, C], exactly the record's decode
    init_loss: float
    loss: float
    epochs: list[Epoch] = field(default_factory=list)


def gradients(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, books: torch.Tensor,
              scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of tr(ΔW H ΔWᵀ)/R for codebooks and scales, codes fixed, written out (no autograd: its scatter-add
    for repeated codes is not deterministic across threads). With U the unscaled sum of entries and
    D = ∂loss/∂Ŵ = −2 (W − Ŵ) H / R (H symmetric): ∂loss/∂scale_r = Σ_c D[r, c] U[r, c] and ∂loss/∂books[m, k] =
    Σ over the slices coded k in codebook m of scale_r · D[r, slice] (``index_add_``, serial on CPU). One
    [R, C] × [C, C] product. -> (books' gradient [M, K, g], scales' gradient [R, 1])."""
    rows, groups, n_books = codes.shape
    unscaled = reconstruct(codes, books)
    grad = ((w - unscaled * scales) @ h) * (-2.0 / rows)
    per_slice = (grad * scales).reshape(-1, books.shape[-1])
    book_grad = torch.zeros_like(books)
    for m in range(n_books):
        book_grad[m].index_add_(0, codes[..., m].reshape(-1), per_slice)
    return book_grad, (grad * unscaled).sum(1, keepdim=True)


def adam_phase(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, books: torch.nn.Parameter,
               scales: torch.nn.Parameter, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` Adam updates of codebooks and scales, codes fixed (:func:`gradients`)."""
    for _ in range(steps):
        with torch.no_grad():
            books.grad, scales.grad = gradients(w, h, codes, books, scales)
        optimizer.step()


def quantize_layer(w: torch.Tensor, h: torch.Tensor, cfg: AQLMSettings) -> AQLMResult:
    """Residual k-means, then up to ``max_epochs`` of (Adam on codebooks/scales, beam search over codes) until the
    relative improvement of an epoch falls under ``relative_tolerance``. Codebooks and scales are rounded to fp16
    before every beam search, so the final codes are chosen for the stored values and :attr:`AQLMResult.dequantized`
    is what the file decodes to; the best epoch's state is kept."""
    rows, cols = w.shape
    k = 1 << cfg.bits
    generator = torch.Generator().manual_seed(cfg.seed)
    norms = w.norm(dim=1, keepdim=True)
    init_scales = torch.where(norms > 0, norms, torch.ones_like(norms))  # an all-zero row: any scale decodes to 0
    books0, codes = residual_kmeans(w / init_scales, cfg.n_books, k, cfg.group, cfg.init_iters, generator)
    books = torch.nn.Parameter(books0)
    scales = torch.nn.Parameter(init_scales.clone())
    optimizer = torch.optim.Adam([books, scales], lr=cfg.lr, betas=(0.0, 0.95), amsgrad=True)

    best_books, best_scales = round_books(books), round_scales(scales)
    best_codes = codes
    best = init = objective(w, dequantize(codes, best_books, best_scales), h)
    epochs: list[Epoch] = []
    for _ in range(cfg.max_epochs):
        with torch.no_grad():
            before = objective(w, dequantize(codes, books, scales), h)
        adam_phase(w, h, codes, books, scales, optimizer, cfg.steps_per_epoch)
        stored_books, stored_scales = round_books(books), round_scales(scales)
        with torch.no_grad():
            after = objective(w, dequantize(codes, books, scales), h)
            rounded = objective(w, dequantize(codes, stored_books, stored_scales), h)
            codes = beam_search(w, h, codes, stored_books, stored_scales, cfg.beam_size)
            loss = objective(w, dequantize(codes, stored_books, stored_scales), h)
        epochs.append(Epoch(before, after, rounded, loss))
        previous = best
        if loss < best:
            best, best_codes, best_books, best_scales = loss, codes, stored_books, stored_scales
        if previous <= 0 or (previous - loss) / previous < cfg.relative_tolerance:
            break
    deq = dequantize(best_codes, best_books, best_scales)
    return AQLMResult(best_codes, best_books, best_scales, deq, init, best, epochs)
