"""Weighted 1-D k-means for every row of a matrix at once (SqueezeLLM's per-row non-uniform codebooks).

In one dimension a k-means cluster is a run of the sorted values between two midpoints of neighbouring centres. So
each row is sorted once and prefix sums of w, w x and w x^2 are taken (float64); then a cluster's weight, mean and
weighted squared error are differences of prefix sums at the run's ends, which a batched binary search of the
midpoints finds: a Lloyd iteration costs O(R k log C) instead of O(R C k).

The result is Lloyd's algorithm (assign to the nearest centre, move each centre to its cluster's weighted mean; a
centre with no weight stays put) for at most ``max_iter`` iterations, started as sklearn's KMeans (which SqueezeLLM
calls with random_state 0, n_init "auto" = one k-means++ start, max_iter 50) starts: greedy k-means++, each centre the
best of 2 + ln(k) candidates drawn in proportion to weight x squared distance, from a seeded torch generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SortedRows:
    """Rows sorted ascending (float64) with prefix sums [R, C + 1] of w, w x, w x^2 (column 0 = 0)."""

    xs: torch.Tensor
    ws32: torch.Tensor
    xs32: torch.Tensor
    sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor) -> SortedRows:
        xs32, order = torch.sort(x.float(), dim=1, stable=True)
        ws32 = weight.float().gather(1, order)
        xs, ws = xs32.double(), ws32.double()
        lead = torch.zeros(x.shape[0], 1, dtype=torch.float64)
        sums = tuple(torch.cat([lead, v.cumsum(1)], dim=1) for v in (ws, ws * xs, ws * xs * xs))
        return cls(xs, ws32, xs32, sums)  # type: ignore[arg-type]

    def cells(self, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For sorted centres [R, m]: the inner cell boundaries [R, m - 1] (a value on a midpoint goes to the lower
        centre, as nearest_codes decides) and each cell's sums of w and w x [R, m]."""
        rows, cols = self.xs.shape
        mids = (centres[:, 1:] + centres[:, :-1]) * 0.5
        inner = torch.searchsorted(self.xs, mids.contiguous(), side="right")
        edges = torch.cat([torch.zeros(rows, 1, dtype=torch.long), inner,
                           torch.full((rows, 1), cols, dtype=torch.long)], dim=1)
        mass, moment = ((s.gather(1, edges[:, 1:]) - s.gather(1, edges[:, :-1])) for s in self.sums[:2])
        return inner, mass, moment

    def range_cost(self, lo: torch.Tensor, hi: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        """sum w (x - centre)^2 over sorted positions [lo, hi) of each row (all [R, T])."""
        s0, s1, s2 = ((s.gather(1, hi) - s.gather(1, lo)) for s in self.sums)
        return s2 - 2 * centre * s1 + centre.square() * s0

    def gain(self, centres: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """How much adding each candidate [R, T] to the sorted centres [R, m] lowers the row's weighted squared error.
        Only the points between the candidate's midpoints with its neighbours move to it, so this is O(log C)."""
        m = centres.shape[1]
        at = torch.searchsorted(centres, candidates)
        left, right = centres.gather(1, (at - 1).clamp(min=0)), centres.gather(1, at.clamp(max=m - 1))
        has_left, has_right = at > 0, at < m
        inf = torch.full_like(candidates, torch.inf)
        lo = torch.where(has_left, (left + candidates) * 0.5, -inf)
        hi = torch.where(has_right, (candidates + right) * 0.5, inf)
        split = torch.where(has_left & has_right, (left + right) * 0.5, torch.where(has_left, inf, -inf))
        i_lo, i_hi, i_split = (torch.searchsorted(self.xs, v.contiguous(), side="right") for v in (lo, hi, split))
        i_split = torch.minimum(torch.maximum(i_split, i_lo), i_hi)
        before = self.range_cost(i_lo, i_split, left) + self.range_cost(i_split, i_hi, right)
        return before - self.range_cost(i_lo, i_hi, candidates)


def kmeans_plus_plus(rows: SortedRows, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy weighted k-means++ (sklearn's _kmeans_plusplus): the first centre drawn in proportion to the weights,
    each next one the best (least potential) of 2 + ln(k) candidates drawn in proportion to weight x squared
    distance to the nearest centre so far. Every row needs a positive weight. Returns sorted centres [R, k]."""
    xs, ws = rows.xs32, rows.ws32
    trials = 2 + int(math.log(k))
    # (Drawing with replacement is the same draw for one sample, and far faster than without.)
    centres = xs.gather(1, torch.multinomial(ws, 1, replacement=True, generator=generator)).double()
    d2 = (xs - centres.float()).square()
    step = torch.empty_like(d2)
    for _ in range(1, k):
        mass = ws * d2
        empty = mass.sum(1, keepdim=True) <= 0
        if bool(empty.any()):  # all weighted points sit on centres already: any point will do (it adds nothing)
            mass = torch.where(empty, ws, mass)
        candidates = xs.gather(1, torch.multinomial(mass, trials, replacement=True, generator=generator)).double()
        best = rows.gain(centres, candidates).argmax(1, keepdim=True)  # least potential; the first on ties
        chosen = candidates.gather(1, best)
        centres = torch.sort(torch.cat([centres, chosen], dim=1), dim=1).values
        torch.sub(xs, chosen.float(), out=step)
        torch.minimum(d2, step.square_(), out=d2)
    return centres


def kmeans_rows(x: torch.Tensor, weight: torch.Tensor, k: int, max_iter: int = 50,
                seed: int = 0) -> tuple[torch.Tensor, int]:
    """Centres [R, k] (sorted, float64) of a weighted k-means of each row of x [R, C] (weights >= 0 with a positive
    sum per row, [R, C]), and the number of Lloyd iterations run (at most ``max_iter``; it stops when no row's
    clusters change). Deterministic: the seeding draws from a generator seeded with ``seed``."""
    rows = SortedRows.of(x, weight)
    centres = kmeans_plus_plus(rows, k, torch.Generator().manual_seed(seed))
    bounds = None
    done = 0
    for step in range(1, max_iter + 1):
        inner, mass, moment = rows.cells(centres)
        if bounds is not None and torch.equal(inner, bounds):
            break
        bounds, done = inner, step
        # A weighted mean of a sorted run lies inside it, so the centres stay sorted; an empty cluster keeps its
        # centre, which lies between its neighbours' new ones.
        centres = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centres)
    return centres, done


def nearest_codes(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's sorted table [R, k] for every x [R, C] (int64; a value on a midpoint
    takes the lower entry). Midpoints of two fp16 values are exact in fp32, so this is the true nearest entry of the
    stored table."""
    mids = (table[:, 1:] + table[:, :-1]) * 0.5
    return torch.searchsorted(mids.contiguous(), x.contiguous())
