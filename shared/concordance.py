"""Harrell's C-index across sites, as `lifelines.utils.concordance_index`. Pure numpy.

Scores are risk scores (higher = earlier event expected, e.g. x'β̂); lifelines' convention
is predicted survival, so C here equals `concordance_index(T, −score, E)`. A pair (i, j) is
comparable when i has an event and j left later (T_j > T_i), or at the same time without an
event (T_j = T_i, j censored); it is concordant when score_i > score_j and counts one half
when the scores tie. C = (concordant + tied / 2) / comparable.

Pairs inside one site are counted there, exactly (`local_pair_counts`). Pairs across sites:

- exact, through event queries (`local_cross_counts`): each site releases the (binned
  time, score) of its events; every other site counts its own patients against them and
  returns three totals. Event-level values leave the site, so this runs only when every
  site's policy sets `allow_event_queries`.
- bounded, from 2-D histograms (`local_event_partition`, `local_bound_counts`,
  `combine_bounds`): each site releases its events as a (time × score) count table over
  rectangles of a grid the server sets, under the guard's full cell rule; every other site
  then counts its own patients, exactly, against those rectangles and returns seven totals.
  Pairs the rectangles leave undecided (same time range or score range) widen the bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri


@dataclass(frozen=True)
class PairCounts:
    concordant: int
    tied: int
    comparable: int

    def __add__(self, other: PairCounts) -> PairCounts:
        return PairCounts(self.concordant + other.concordant, self.tied + other.tied,
                          self.comparable + other.comparable)

    @property
    def credit(self) -> float:
        return self.concordant + self.tied / 2


def concordance(counts: Sequence[PairCounts]) -> float:
    total = sum(counts, PairCounts(0, 0, 0))
    return total.credit / total.comparable if total.comparable else float("nan")


def local_cross_counts(times: np.ndarray, events: np.ndarray, scores: np.ndarray,
                       event_times: np.ndarray, event_scores: np.ndarray) -> PairCounts:
    """Pairs of each given event (time, score) with this site's patients that are
    comparable to it: T_j > t, or T_j = t and j censored.

    Crosses the wire: three totals over all those pairs (concordant, tied, comparable).
    """
    t = np.asarray(times, dtype=np.float64)
    censored = ~np.asarray(events).astype(bool)
    r = np.asarray(scores, dtype=np.float64)
    qt = np.asarray(event_times, dtype=np.float64)
    qr = np.asarray(event_scores, dtype=np.float64)
    if qt.size == 0 or t.size == 0:
        return PairCounts(0, 0, 0)
    values = np.unique(np.concatenate([r, qr]))
    rank = np.searchsorted(values, r) + 1  # 1-based for the Fenwick tree
    qrank = np.searchsorted(values, qr) + 1
    tree = np.zeros(values.size + 1, dtype=np.int64)
    # own patients by (T, censored) descending; queries by t descending
    own = np.lexsort((-censored.astype(int), -t))
    queries = np.argsort(-qt, kind="stable")
    ptr, inserted = 0, 0
    concordant = tied = comparable = 0
    size = values.size
    for q in queries:
        tq = qt[q]
        while ptr < own.size and (t[own[ptr]] > tq or (t[own[ptr]] == tq and censored[own[ptr]])):
            i = rank[own[ptr]]
            while i <= size:
                tree[i] += 1
                i += i & -i
            ptr += 1
            inserted += 1
        below = _prefix(tree, qrank[q] - 1)
        upto = _prefix(tree, qrank[q])
        concordant += below
        tied += upto - below
        comparable += inserted
    return PairCounts(int(concordant), int(tied), int(comparable))


def _prefix(tree: np.ndarray, i: int) -> int:
    total = 0
    while i > 0:
        total += tree[i]
        i -= i & -i
    return int(total)


def local_pair_counts(times: np.ndarray, events: np.ndarray, scores: np.ndarray) -> PairCounts:
    """Pairs inside one site (each comparable pair once).

    Crosses the wire: three totals over the site's own comparable pairs.
    """
    e = np.asarray(events).astype(bool)
    return local_cross_counts(times, events, scores, np.asarray(times)[e],
                              np.asarray(scores)[e])


# --------------------------------------------------------------------------- histograms


def grid_edges(time_grid: np.ndarray, exits: np.ndarray, score_mean: float, score_sd: float,
               levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The finest grid, 2**levels time blocks × 2**levels score bins, as inner edges.

    Time blocks split the pooled exits into equal shares (edges on pooled times; a block is
    (e_{m−1}, e_m]); score bins are the quantiles of a normal with the scores' pooled mean
    and sd ([f_{k−1}, f_k), open end bins). Both axes thus hold roughly equal shares, which
    keeps the cells the sites can release (≥ min_cell_count events each) small.
    """
    k = 2**levels
    cum = np.cumsum(np.asarray(exits, dtype=np.float64))
    total = cum[-1] if cum.size else 0.0
    if total > 0:
        idx = np.searchsorted(cum, total * np.arange(1, k) / k, side="left")
        time_edges = np.asarray(time_grid, dtype=np.float64)[np.minimum(idx, cum.size - 1)]
    else:
        time_edges = np.zeros(k - 1)
    sd = score_sd if np.isfinite(score_sd) and score_sd > 0 else 1.0
    score_edges = score_mean + sd * ndtri(np.arange(1, k) / k)
    return time_edges, score_edges


def local_event_partition(times: np.ndarray, events: np.ndarray, scores: np.ndarray,
                          time_edges: np.ndarray, score_edges: np.ndarray,
                          min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The site's events as a count table over rectangles of the server's grid.

    Starting from the whole grid, a rectangle is split in four (else in two along time,
    else along score) when every part holds 0 or at least `min_count` events, down to single
    grid cells at most (a quadtree: near-square cells in share units, which keeps the bound
    narrow); the leaves with events are returned as `cells` (R × 4: first and last time
    block, first and last score bin) and their `counts`.

    Crosses the wire: that count table; the guard applies the cell rule to `counts` (a
    site with 1 or 2 events in all refuses it). The leaves' shape says only where a finer
    split would have made a small cell.
    """
    e = np.asarray(events).astype(bool)
    block = np.searchsorted(time_edges, np.asarray(times, dtype=np.float64)[e], side="left")
    score_bin = np.searchsorted(score_edges, np.asarray(scores, dtype=np.float64)[e],
                                side="right")
    nb, nk = len(time_edges) + 1, len(score_edges) + 1
    table = np.zeros((nb, nk), dtype=np.int64)
    np.add.at(table, (block, score_bin), 1)
    cum = np.zeros((nb + 1, nk + 1), dtype=np.int64)
    cum[1:, 1:] = table.cumsum(axis=0).cumsum(axis=1)

    def count(r: tuple[int, int, int, int]) -> int:
        m0, m1, k0, k1 = r
        return int(cum[m1 + 1, k1 + 1] - cum[m0, k1 + 1] - cum[m1 + 1, k0] + cum[m0, k0])

    leaves: list[tuple[int, int, int, int, int]] = []
    stack = [(0, nb - 1, 0, nk - 1)]
    while stack:
        rect = stack.pop()
        total = count(rect)
        if total == 0:
            continue
        m0, m1, k0, k1 = rect
        mm, km = (m0 + m1) // 2, (k0 + k1) // 2
        halves_t = [(m0, mm, k0, k1), (mm + 1, m1, k0, k1)] if m1 > m0 else []
        halves_s = [(m0, m1, k0, km), (m0, m1, km + 1, k1)] if k1 > k0 else []
        quads = ([(a, b, c, d) for a, b, _, _ in halves_t for _, _, c, d in halves_s]
                 if halves_t and halves_s else [])
        for parts in (quads, halves_t, halves_s):
            if parts and all(count(p) == 0 or count(p) >= min_count for p in parts):
                stack += parts
                break
        else:
            leaves.append((*rect, total))
    leaves.sort()
    cells = np.array([leaf[:4] for leaf in leaves], dtype=np.int64).reshape(-1, 4)
    counts = np.array([leaf[4] for leaf in leaves], dtype=np.int64)
    return cells, counts


@dataclass(frozen=True)
class BoundCounts:
    """Totals over the pairs (another site's event in a cell, one of this site's patients)
    in which the event may be the earlier one (see `combine_bounds`)."""

    comparable: float  # certainly comparable
    credit: float  # … of which certainly concordant
    unknown: float  # … of which the outcome is open (same score bin)
    open_low: float  # comparability open, could carry credit 0
    open_high: float  # comparability open, could carry credit 1
    estimate_credit: float
    estimate_pairs: float

    FIELDS = ("comparable", "credit", "unknown", "open_low", "open_high", "estimate_credit",
              "estimate_pairs")

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in self.FIELDS], dtype=np.float64)


def local_bound_counts(times: np.ndarray, events: np.ndarray, scores: np.ndarray,
                       time_edges: np.ndarray, score_edges: np.ndarray, cells: np.ndarray,
                       counts: np.ndarray) -> BoundCounts:
    """This site's exact patients against other sites' event rectangles.

    For an event a in a rectangle (time in (lo, hi], score in [flo, fhi)) and a patient j
    here: certainly comparable when T_j > hi, or j is censored and T_j ≥ hi; certainly not
    (from a's side) when T_j ≤ lo; open otherwise. Credit 1 when score_j < flo, 0 when
    score_j ≥ fhi, open otherwise.

    Crosses the wire: seven totals over all those pairs.
    """
    t = np.asarray(times, dtype=np.float64)[None, :]
    cens = ~np.asarray(events).astype(bool)[None, :]
    r = np.asarray(scores, dtype=np.float64)[None, :]
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 4)
    f = np.asarray(counts, dtype=np.float64)
    te = np.concatenate([[-np.inf], np.asarray(time_edges, dtype=np.float64), [np.inf]])
    se = np.concatenate([[-np.inf], np.asarray(score_edges, dtype=np.float64), [np.inf]])
    lo, hi = te[cells[:, 0]][:, None], te[cells[:, 1] + 1][:, None]
    flo, fhi = se[cells[:, 2]][:, None], se[cells[:, 3] + 1][:, None]
    later = (t > hi) | (cens & (t >= hi))
    open_ = ~later & (t > lo)
    high, low = r < flo, r >= fhi
    mid = ~high & ~low
    open_cens = open_ & cens

    def total(mask: np.ndarray, weight: float = 1.0) -> float:
        return weight * float(f @ mask.sum(axis=1))

    return BoundCounts(
        comparable=total(later), credit=total(later & high), unknown=total(later & mid),
        open_low=total(open_ & ~high), open_high=total(open_ & ~low),
        estimate_credit=total(later & high) + total(later & mid, 0.5)
        + total(open_cens & high) + total(open_cens & mid, 0.5),
        estimate_pairs=total(later) + total(open_cens),
    )


@dataclass(frozen=True)
class Bound:
    estimate: float
    lower: float
    upper: float
    open_pairs: int  # pairs whose comparability or outcome the grid leaves open


def combine_bounds(within: Sequence[PairCounts], cross: Sequence[BoundCounts]) -> Bound:
    """C-index bound from the exact within-site counts and the cross-site totals.

    With K, P the certain credit and comparable pairs, U the comparable pairs of open
    outcome and Q0/Q1 the pairs of open comparability that could carry credit 0/1:
    lower = K / (P + Q0), upper = (K + U + Q1) / (P + Q1) (the extremes of
    (K + u + Σ_S c) / (P + |S|) over every choice). An unordered pair of two events in the
    same time range may be counted open from both sides, which only widens the bound. The
    estimate counts a shared time range as a shared time and a shared score bin as a tie,
    and lies within the bound.
    """
    credit = sum(w.credit for w in within) + sum(c.credit for c in cross)
    pairs = float(sum(w.comparable for w in within)) + sum(c.comparable for c in cross)
    unknown = sum(c.unknown for c in cross)
    q0 = sum(c.open_low for c in cross)
    q1 = sum(c.open_high for c in cross)
    est_credit = sum(w.credit for w in within) + sum(c.estimate_credit for c in cross)
    est_pairs = float(sum(w.comparable for w in within)) + sum(c.estimate_pairs for c in cross)
    lower = credit / (pairs + q0) if pairs + q0 > 0 else float("nan")
    upper = (credit + unknown + q1) / (pairs + q1) if pairs + q1 > 0 else float("nan")
    estimate = est_credit / est_pairs if est_pairs > 0 else float("nan")
    return Bound(estimate, lower, upper, round(unknown + max(q0, q1)))
