"""AUC from label-stratified score histograms on a shared grid, with its error bound.

Each site counts its scores per label in the bins of a grid the server fixes (uniform on
[0, 1] by default). A count of 1 or 2 in a cell would be refused by the site's guard
(min_cell_count), so the site first merges adjacent bins of each label until every
non-empty cell holds at least `min_cell_count` patients (`coarsen`), and sends the merged
bins as index ranges of the shared grid.

Against a hostile coordinator (issue 25) a site bins in at most n // min_cell_count of the
grid's bins (`site_edges`) and, above min_cell_count 1, reports each cell by its edges
(`tile`: from the previous cell to where it reached min_cell_count), so that no cell's
first or last bin is a patient's (`site_cells` does both).

The server then knows each score only up to its (merged) bin. For a positive in bin
[a, b) and a negative in [c, d): the pair is concordant if a ≥ d, discordant if b ≤ c, and
unknown otherwise. The AUC (Mann–Whitney, ties one half) lies between the bound that
counts every unknown pair discordant and the one that counts it concordant; the estimate
counts an unknown pair by the probability that a uniform score in the positive's bin beats
one in the negative's bin (ties within one bin: one half, as the exact AUC does for ties).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.queries.bounds import max_bins
from shared.queries.params import QueryRejected

DEFAULT_BINS = 200


def grid(bins: int = DEFAULT_BINS) -> np.ndarray:
    """Edges of the shared score grid on [0, 1]."""
    return np.linspace(0.0, 1.0, bins + 1)


def checked_grid(edges: object, what: str = "score grid") -> np.ndarray:
    """A grid as the server sent it, or QueryRejected: 1-D, finite, strictly increasing,
    from 0 (or below) to 1 (or above), so that every probability lies in a bin and a grid
    cannot pile the scores into its outer bins."""
    grid = np.asarray(edges, dtype=np.float64) if isinstance(edges, list | tuple | np.ndarray) \
        else np.zeros(0)
    if grid.ndim != 1 or len(grid) < 2 or not np.all(np.isfinite(grid)):
        raise QueryRejected(f"{what}: needs two or more finite edges")
    if np.any(np.diff(grid) <= 0):
        raise QueryRejected(f"{what}: edges must be strictly increasing")
    if grid[0] > 0.0 or grid[-1] < 1.0:
        raise QueryRejected(f"{what}: must cover [0, 1] (from {grid[0]:g} to {grid[-1]:g})")
    return grid


def resolution(n: int, min_cell: int) -> int | None:
    """The most bins a site with `n` scored patients bins them in (`max_bins`: no more bins
    than could each hold min_cell_count of them). None at min_cell_count 1: that policy lets
    single patients' cells leave, and refinement resolves them to their float value anyway."""
    return None if min_cell <= 1 else max_bins(n, min_cell)


def site_edges(edges: np.ndarray, n: int, min_cell: int) -> np.ndarray:
    """Indices of the edges of `edges` a site bins in: all of them within its `resolution`,
    else every k-th (and the last), k the smallest that brings the bins within it. The
    coarser grid depends on the server's grid and the site's n only, never on where its
    scores lie, and every coarse cell is a range of the server's bins."""
    bins = len(edges) - 1
    bound = resolution(n, min_cell)
    if bound is None or bins <= bound:
        return np.arange(len(edges))
    k = -(-bins // bound)
    return np.unique(np.r_[np.arange(0, bins, k), bins])


def site_cells(scores: np.ndarray, y: np.ndarray, edges: np.ndarray, n: int,
               min_cell: int) -> tuple[Cells, Cells]:
    """A site's released cells of each label on the server's grid `edges`: its histogram on
    the grid bounded to its resolution (`site_edges`), coarsened to min_cell_count
    (`coarsen`); first/last are indices of the server's grid bins."""
    keep = site_edges(edges, n, min_cell)
    hist = local_histogram(scores, y, np.asarray(edges)[keep])
    out = []
    for g in (0, 1):
        first, last, count = cells_of(hist[g], min_cell)
        out.append((keep[first], keep[last + 1] - 1, count))
    return out[0], out[1]


def cells_of(counts: np.ndarray, min_cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A site's cells of one label's histogram: `coarsen` at min_cell_count 1 (each
    non-empty bin its own cell), `tile` above it."""
    return coarsen(counts, min_cell) if min_cell <= 1 else tile(counts, min_cell)


def tile(counts: np.ndarray, min_cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`coarsen`, with every cell reported by its edges: a cell runs from the bin after the
    previous cell (bin 0 for the first) to the bin where it reached min_cell, the last one
    to the grid's end. A merged cell's first and last non-empty bin would be the bins of
    its lowest and highest patient (with a narrow bin around a score the coordinator knows,
    whether a patient of that label has it); its edges are those of the cells around it."""
    first, last, count = coarsen(counts, min_cell)
    if not len(first):
        return first, last, count
    first = np.r_[0, last[:-1] + 1].astype(np.int64)
    last = np.r_[last[:-1], len(np.asarray(counts)) - 1].astype(np.int64)
    return first, last, count


def local_histogram(scores: np.ndarray, y: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(2 × bins) counts of label-0 and label-1 scores in the grid's bins (last bin closed)."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), edges[0], edges[-1])
    index = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)
    y = np.asarray(y)
    return np.stack([np.bincount(index[y == g], minlength=len(edges) - 1) for g in (0, 1)])


def coarsen(counts: np.ndarray, min_cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge adjacent bins of one label's counts until no cell is in 1 … min_cell−1.

    Returns (first, last, merged): each merged cell spans grid bins first … last (its
    first and last non-empty bin) and holds `merged` patients. Each label is coarsened on
    its own, so one label's small cells do not widen the other's bins.

    Crosses the wire (through the handlers that call it): counts of patients in ranges of
    the shared grid, every non-zero count ≥ min_cell_count — no single score. A label with
    1 … min_cell−1 patients in all still yields one small cell, which the guard refuses.
    """
    cells: list[list[int]] = []  # [first, last, count]
    open_cell: list[int] | None = None
    for b, count in enumerate(np.asarray(counts, dtype=np.int64)):
        if count == 0:
            continue
        if open_cell is None:
            open_cell = [b, b, 0]
        open_cell[1] = b
        open_cell[2] += int(count)
        if open_cell[2] >= min_cell:
            cells.append(open_cell)
            open_cell = None
    if open_cell is not None:  # a small remainder joins the last cell
        if cells:
            cells[-1][1] = open_cell[1]
            cells[-1][2] += open_cell[2]
        else:
            cells.append(open_cell)
    table = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
    return table[:, 0], table[:, 1], table[:, 2]


@dataclass(frozen=True)
class HistogramAUC:
    auc: float
    lower: float
    upper: float
    n: tuple[int, int]  # label 0, label 1


Cells = tuple[np.ndarray, np.ndarray, np.ndarray]  # (first, last, counts) from `coarsen`


def combine_auc(negatives: list[Cells], positives: list[Cells]) -> HistogramAUC:
    """Pooled AUC from every site's coarsened cells of each label."""
    a0, b0, n0 = _bins(negatives)
    a1, b1, n1 = _bins(positives)
    total0, total1 = n0.sum(), n1.sum()
    if total0 == 0 or total1 == 0:
        return HistogramAUC(np.nan, np.nan, np.nan, (int(total0), int(total1)))
    pairs = np.outer(n1, n0)  # positives' bins × negatives' bins
    concordant = a1[:, None] >= b0[None, :]
    discordant = b1[:, None] <= a0[None, :]
    unknown = ~(concordant | discordant)
    p_win = _uniform_win(a1[:, None], b1[:, None], a0[None, :], b0[None, :])
    denom = total0 * total1
    lower = float(np.sum(pairs * concordant) / denom)
    upper = float(np.sum(pairs * (concordant | unknown)) / denom)
    estimate = float(np.sum(pairs * np.where(unknown, p_win, concordant)) / denom)
    return HistogramAUC(estimate, lower, upper, (int(total0), int(total1)))


def expand(parts: list[Cells], bins: int) -> tuple[np.ndarray, bool]:
    """One label's pooled counts per grid bin from every site's cells, each merged cell's
    count spread evenly over the bins it spans (an estimate inside a merged cell). Returns
    (counts, exact): exact when no site merged bins, i.e. the counts are the histogram's."""
    counts = np.zeros(bins)
    exact = True
    for first, last, n in parts:
        for a, b, c in zip(np.asarray(first, dtype=np.int64), np.asarray(last, dtype=np.int64),
                           np.asarray(n, dtype=np.float64), strict=True):
            counts[a:b + 1] += c / (b - a + 1)
            exact &= bool(a == b)
    return counts, exact


def place_at_means(cells: Cells, sums: np.ndarray, squares: np.ndarray, edges: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One site's label counts, Σscore and Σscore² per grid bin, each cell's in the bin of
    its mean score (its Σscore / count, within the cell): an estimate of where a cell that
    spans several bins holds its patients (a site's cells run from one to the next, empty
    bins included, `tile`), unbiased where spreading it evenly is not. A cell of one bin
    is placed exactly."""
    first, last, count = (np.asarray(v) for v in cells)
    bins = len(edges) - 1
    out = [np.zeros(bins) for _ in range(3)]
    if not len(first):
        return out[0], out[1], out[2]
    count = count.astype(np.float64)
    mean = np.divide(sums, count, out=np.zeros(len(count)), where=count > 0)
    index = np.searchsorted(edges, mean, side="right") - 1
    index = np.clip(index, first, last).astype(np.int64)
    for target, values in zip(out, (count, sums, squares), strict=True):
        np.add.at(target, index, np.asarray(values, dtype=np.float64))
    return out[0], out[1], out[2]


def _bins(parts: list[Cells]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell ranges [first, last + 1) in grid units, and counts, over all sites."""
    lo = np.concatenate([np.asarray(first, dtype=float) for first, _, _ in parts])
    hi = np.concatenate([np.asarray(last, dtype=float) + 1 for _, last, _ in parts])
    counts = np.concatenate([np.asarray(n, dtype=float) for _, _, n in parts])
    return lo, hi, counts


def _uniform_win(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """P(U > V) for U uniform on [a, b), V uniform on [c, d) (grid units): the mean over U of
    V's piecewise-linear CDF, integrated in closed form."""
    a, b, c, d = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (a, b, c, d)))
    return (_cdf_integral(b, c, d) - _cdf_integral(a, c, d)) / (b - a)


def _cdf_integral(u: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """∫_{-∞}^{u} P(V ≤ t) dt for V uniform on [c, d)."""
    inside = np.clip(u, c, d)
    return (inside - c) ** 2 / (2 * (d - c)) + np.maximum(u - d, 0.0)
