"""Cohort table by label, federated: group moments, t-tests and chi-square from sums, and
median (Q1, Q3) with the Mann–Whitney U test from histograms on a shared grid.

Three rounds (the `cohort` stage of docs/DESIGN.md; the two-pass moments as in the radiomics
stage's pooled standardization):
1. each site sends, per label group, the count and sum of every numeric covariate, whether
   all its values of that covariate are whole numbers, and the level counts of every
   categorical covariate (`local_group_sums`, `local_is_integer`, `local_level_counts`);
2. with the pooled group means fixed, each site sends Σ(x − μ_g)² (`local_group_squares`),
   which avoids the cancellation of Σx² − n·μ²;
3. on a grid the server builds from the pooled mean and sd (`grid_edges`), each site sends
   per label group its counts on that grid within its resolution (n / min_cell_count
   bins), adjacent bins merged until every cell holds ≥ min_cell_count patients, each
   cell reported by its edges (`local_group_histograms`).
The server adds the site halves (`combine_*`). Moments and tests on them equal scipy's on
the pooled rows. Quantiles and U come with bounds over every placement of each cell's
patients inside the cell (`combine_quantiles`, `combine_mann_whitney`); the bounds close —
the value is exact, equal to numpy's and scipy's — when each cell holds a single value
(whole-number data, unit bins, no merged cells, nothing in the open end bins: in practice
at min_cell_count 1). Above it the bounds are those of cells of ≥ min_cell_count patients
on at most n / min_cell_count bins per site (issue 25: finer cells gave patients away).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared import roc
from shared.queries import QueryRejected

GROUPS = 2  # label 0 and label 1
MAX_BINS = 2000  # of the shared histogram grid, besides its two open end bins
GRID_SDS = 6.0  # the grid covers the pooled mean ± 6 sd
QUANTILES = (0.25, 0.5, 0.75)  # Q1, median, Q3


def local_group_sums(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per label group: (n, Σx) over the patients with a value.

    Crosses the wire: two counts and two sums per covariate; each is released only when
    its group holds at least the site's `min_patients`, so no single value is exposed.
    """
    x, y = _checked(x, y)
    seen = ~np.isnan(x)
    n = np.array([np.sum(seen & (y == g)) for g in range(GROUPS)], dtype=np.int64)
    total = np.array([np.sum(x[seen & (y == g)]) for g in range(GROUPS)], dtype=np.float64)
    return n, total


def local_group_squares(x: np.ndarray, y: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Per label group: Σ(x − μ_g)² around the pooled group means μ_g sent by the server.

    Crosses the wire: one sum of squares per group, released under the same rule as the sums.
    """
    x, y = _checked(x, y)
    seen = ~np.isnan(x)
    return np.array(
        [np.sum((x[seen & (y == g)] - means[g]) ** 2) for g in range(GROUPS)], dtype=np.float64
    )


def local_level_counts(values: np.ndarray, y: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Level names and the (levels × groups) count table of a categorical covariate.

    Crosses the wire: a contingency table; the guard refuses it when a non-zero cell is
    below the site's `min_cell_count`. Missing values (None/NaN/"") are not counted.
    """
    labels = np.asarray(y)
    present = np.array([_present(v) for v in values], dtype=bool)
    names = np.array([str(v) for v in values], dtype=object)
    levels = sorted({str(v) for v, keep in zip(values, present, strict=True) if keep})
    table = np.zeros((len(levels), GROUPS), dtype=np.int64)
    for i, level in enumerate(levels):
        for g in range(GROUPS):
            table[i, g] = np.sum(present & (names == level) & (labels == g))
    return levels, table


def combine_level_counts(
    tables: list[tuple[list[str], np.ndarray]],
) -> tuple[list[str], np.ndarray]:
    """Sum site tables over the union of their levels (sorted)."""
    levels = sorted({level for names, _ in tables for level in names})
    pooled = np.zeros((len(levels), GROUPS), dtype=np.int64)
    index = {level: i for i, level in enumerate(levels)}
    for names, table in tables:
        for name, row in zip(names, np.asarray(table), strict=True):
            pooled[index[name]] += row
    return levels, pooled


@dataclass(frozen=True)
class GroupMoments:
    """n, mean and sample sd (ddof 1) of one covariate in each label group."""

    n: np.ndarray
    mean: np.ndarray
    sd: np.ndarray


def combine_means(
    n_parts: list[np.ndarray], sum_parts: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled (n, mean) per group from the sites' (n, Σx)."""
    n = np.sum(n_parts, axis=0)
    total = np.sum(sum_parts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return n, mean


def recenter_squares(ss: np.ndarray, n: np.ndarray, total: np.ndarray, old_mean: np.ndarray,
                     new_mean: np.ndarray) -> np.ndarray:
    """A site's Σ(x − μ_new)² from its Σ(x − μ_old)², n and Σx — exact, no new round:
    Σ(x − μ_new)² = Σ(x − μ_old)² + 2(μ_old − μ_new)(Σx − n·μ_old) + n(μ_old − μ_new)²."""
    shift = np.asarray(old_mean, dtype=np.float64) - np.asarray(new_mean, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = ss + 2 * shift * (total - n * old_mean) + n * shift ** 2
    return np.where(n > 0, out, 0.0)


def combine_moments(n: np.ndarray, mean: np.ndarray, ss_parts: list[np.ndarray]) -> GroupMoments:
    """Pooled moments from the group means and the sites' Σ(x − μ_g)²."""
    ss = np.sum(ss_parts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.where(n > 1, np.sqrt(ss / np.maximum(n - 1, 1)), np.nan)
    return GroupMoments(n=np.asarray(n), mean=np.asarray(mean), sd=sd)


def site_moments(n: np.ndarray, total: np.ndarray, ss_pooled: np.ndarray,
                 pooled_mean: np.ndarray) -> GroupMoments:
    """One site's own moments from its sums and its Σ(x − μ_pooled)².

    Σ(x − μ_site)² = Σ(x − μ_pooled)² − n·(μ_site − μ_pooled)².
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        ss = ss_pooled - n * (mean - pooled_mean) ** 2
        sd = np.where(n > 1, np.sqrt(np.maximum(ss, 0) / np.maximum(n - 1, 1)), np.nan)
    return GroupMoments(n=np.asarray(n), mean=mean, sd=sd)


@dataclass(frozen=True)
class TTest:
    statistic: float
    p_value: float
    df: float


def student_t(m: GroupMoments) -> TTest:
    """Two-sample t-test with pooled variance: `scipy.stats.ttest_ind_from_stats` on the
    pooled group moments, so it equals `ttest_ind(group0, group1, equal_var=True)`."""
    return _t_test(m, equal_var=True)


def welch_t(m: GroupMoments) -> TTest:
    """Welch's unequal-variance t-test, as `scipy.stats.ttest_ind(equal_var=False)`."""
    return _t_test(m, equal_var=False)


def _t_test(m: GroupMoments, equal_var: bool) -> TTest:
    from scipy import stats  # server half only: a site's fresh process skips its import

    n0, n1 = (int(v) for v in m.n)
    if n0 < 2 or n1 < 2:
        return TTest(np.nan, np.nan, float(n0 + n1 - 2) if equal_var else np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = stats.ttest_ind_from_stats(m.mean[0], m.sd[0], n0, m.mean[1], m.sd[1], n1,
                                            equal_var=equal_var)
        v0, v1 = m.sd[0] ** 2 / n0, m.sd[1] ** 2 / n1  # scipy does not return the df
        df = n0 + n1 - 2 if equal_var else (v0 + v1) ** 2 / (v0**2 / (n0 - 1) + v1**2 / (n1 - 1))
    return TTest(float(result.statistic), float(result.pvalue), float(df))


@dataclass(frozen=True)
class ChiSquare:
    statistic: float
    p_value: float
    dof: int
    yates: bool


def chi_square(table: np.ndarray) -> ChiSquare:
    """Pearson's chi-square of a (levels × groups) table: `scipy.stats.chi2_contingency`
    with its default Yates correction for a 2 × 2 table. Levels with no patients are dropped.
    """
    from scipy import stats  # server half only: a site's fresh process skips its import

    table = np.asarray(table, dtype=np.float64)
    table = table[table.sum(axis=1) > 0]
    if table.shape[0] < 2 or np.any(table.sum(axis=0) == 0):
        return ChiSquare(np.nan, np.nan, 0, False)
    result = stats.chi2_contingency(table, correction=True)
    dof = int(result.dof)
    return ChiSquare(float(result.statistic), float(result.pvalue), dof, dof == 1)


def local_is_integer(x: np.ndarray) -> bool:
    """Whether every present value of the site's column is a whole number.

    Crosses the wire: one yes/no per covariate about the column as a whole (released under
    min_patients over its present values); the server needs it to choose unit bins, and a
    whole number in a unit bin is known exactly.
    """
    x = np.asarray(x, dtype=np.float64)
    seen = x[~np.isnan(x)]
    return bool(seen.size) and bool(np.all(np.isfinite(seen)) and np.all(seen == np.round(seen)))


def grid_edges(mean: float, sd: float, integer: bool) -> np.ndarray | None:
    """Edges of the shared histogram grid of one covariate, from its pooled mean and sd.

    Unit bins centred on the whole numbers of [⌊μ − 6σ⌋, ⌈μ + 6σ⌉] when every site's values
    are whole numbers and that is at most MAX_BINS bins (a bin then holds one value), else
    MAX_BINS equal bins over [μ − 6σ, μ + 6σ]; plus the open bins (−∞, lo) and [hi, +∞).
    None when the mean is unknown. Unit bins are not used for fractional data: a column on
    [0, 1] would get one bin.
    """
    if not np.isfinite(mean):
        return None
    spread = GRID_SDS * sd if np.isfinite(sd) and sd > 0 else max(abs(mean), 1.0)
    lo, hi = mean - spread, mean + spread
    if integer and np.ceil(hi) - np.floor(lo) + 1 <= MAX_BINS:
        inner = np.arange(np.floor(lo), np.ceil(hi) + 2) - 0.5
    else:
        inner = np.linspace(lo, hi, MAX_BINS + 1)
    return np.concatenate([[-np.inf], inner, [np.inf]])


def pooled_spread(m: GroupMoments) -> tuple[float, float]:
    """Mean and sd (ddof 1) of both label groups together, from the group moments."""
    n = np.asarray(m.n, dtype=np.float64)
    total = float(n.sum())
    if total < 1:
        return np.nan, np.nan
    mean = float(np.sum(np.where(n > 0, n * np.nan_to_num(m.mean), 0.0)) / total)
    within = np.where(n > 1, (n - 1) * np.nan_to_num(m.sd) ** 2, 0.0)
    between = np.where(n > 0, n * (np.nan_to_num(m.mean) - mean) ** 2, 0.0)
    sd = float(np.sqrt(np.sum(within + between) / (total - 1))) if total > 1 else np.nan
    return mean, sd


def local_group_histograms(x: np.ndarray, y: np.ndarray, edges: np.ndarray,
                           min_cell: int = 1) -> list[roc.Cells]:
    """Per label group, its cells on the shared grid: the grid within the site's resolution
    (at most n / min_cell_count bins, n the patients with a value: `roc.site_edges`),
    each label's counts merged into cells of ≥ min_cell patients, every cell reported by
    its edges (`roc.site_cells`); first/last are bins of the server's grid.

    Crosses the wire: per group, cells as (first bin, last bin, count), each count ≥
    min_cell (the guard checks it again against min_cell_count), the group released only
    under min_patients. No value and no order statistic: a cell's ends are edges of the
    site's coarse grid, which depends on the server's grid and the site's n only, never on
    where a patient lies inside a cell (at min_cell_count 1 cells are the non-empty bins:
    that policy releases single patients' bins). The ledger releases one grid per patient
    set (`client.stages.cohort`), so nested or shifted grids cannot be differenced. Missing values
    are not counted.
    """
    x, y = _checked(x, y)
    edges = checked_edges(edges)
    seen = ~np.isnan(x)
    return list(roc.site_cells(x[seen], y[seen], edges, int(seen.sum()), min_cell))


def site_grid(edges: np.ndarray, x: np.ndarray, min_cell: int) -> np.ndarray:
    """The edges a site bins `x` in (`local_group_histograms`): the server's grid within its
    resolution."""
    n = int(np.sum(~np.isnan(np.asarray(x, dtype=np.float64))))
    edges = checked_edges(edges)
    return edges[roc.site_edges(edges, n, min_cell)]


def checked_edges(edges: np.ndarray, max_bins: int = MAX_BINS + 2) -> np.ndarray:
    """A grid's edges as sent by the server, or QueryRejected: 1-D, strictly increasing,
    at most `max_bins` bins, infinite only at its ends."""
    edges = np.asarray(edges, dtype=np.float64).reshape(-1)
    if len(edges) < 2 or len(edges) - 1 > max_bins or np.any(np.isnan(edges)) \
            or np.any(np.diff(edges) <= 0) or not np.all(np.isfinite(edges[1:-1])):
        raise QueryRejected(f"a grid needs 2 … {max_bins + 1} strictly increasing edges, "
                            f"finite but for its ends; got {len(edges)}")
    return edges


@dataclass(frozen=True)
class CellRanges:
    """One label group's released cells (pooled over sites or from one): each spans grid
    bins first … last, holds `count` patients, and a patient in it has a value in
    [lower, upper] (±inf in an open end bin)."""

    first: np.ndarray
    last: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray

    @property
    def n(self) -> int:
        return int(np.sum(self.count))

    @property
    def point(self) -> np.ndarray:
        """Cells whose patients all have one known value."""
        return np.isfinite(self.lower) & (self.lower == self.upper)


def cell_ranges(cells: roc.Cells, edges: np.ndarray, integer: bool) -> CellRanges:
    """A site's cells with the values their patients can have: bins first … last cover
    [edges[first], edges[last + 1]); a site whose values are whole numbers narrows that to
    the whole numbers in it, ⌈edges[first]⌉ … ⌈edges[last + 1]⌉ − 1 (one value in a
    unit bin)."""
    first, last, count = (np.asarray(v, dtype=np.int64).reshape(-1) for v in cells)
    edges = np.asarray(edges, dtype=np.float64)
    if len(first) and (first.min() < 0 or last.max() >= len(edges) - 1 or np.any(last < first)):
        raise ValueError("cells outside the grid")
    lower, upper = edges[first], edges[last + 1]
    if integer:
        lower, upper = np.ceil(lower), np.maximum(np.ceil(upper) - 1, np.ceil(lower))
    else:  # a value below the edge is at most the float just below it: cells that only
        # touch compare strictly, so U is still exact when no bin holds both groups
        upper = np.where(np.isinf(upper), upper, np.nextafter(upper, -np.inf))
    return CellRanges(first, last, lower, upper, count)


def pool_cells(parts: list[CellRanges]) -> CellRanges:
    """All sites' cells of one label group, side by side."""
    if not parts:
        empty = np.zeros(0)
        return CellRanges(empty.astype(np.int64), empty.astype(np.int64), empty, empty,
                          empty.astype(np.int64))
    return CellRanges(*(np.concatenate([getattr(p, f) for p in parts])
                        for f in ("first", "last", "lower", "upper", "count")))


@dataclass(frozen=True)
class QuantileBound:
    """The q-quantile (numpy's default, linear) of a group lies in [lower, upper]."""

    q: float
    lower: float
    upper: float

    @property
    def exact(self) -> bool:
        return bool(np.isfinite(self.lower) and self.lower == self.upper)

    @property
    def estimate(self) -> float:
        """The value when exact, else the bound's midpoint (nan when an end is infinite)."""
        if self.exact:
            return self.lower
        return (self.lower + self.upper) / 2 if np.isfinite(self.lower + self.upper) else np.nan


def combine_quantiles(cells: CellRanges, qs: tuple[float, ...] = QUANTILES,
                      ) -> list[QuantileBound]:
    """Bounds on the pooled group's quantiles: a quantile is a non-decreasing function of
    every value, so it lies between the quantile of the cells' lower ends and that of
    their upper ends. When every cell is a single value both are `numpy.quantile`."""
    return [QuantileBound(q, _quantile(cells.lower, cells.count, q),
                          _quantile(cells.upper, cells.count, q)) for q in qs]


def _quantile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """`numpy.quantile(np.repeat(values, counts), q)` (linear), without repeating; an
    infinite order statistic makes the result infinite."""
    n = int(np.sum(counts))
    if n == 0:
        return np.nan
    order = np.argsort(values, kind="stable")
    sorted_values, cumulative = values[order], np.cumsum(counts[order])
    h = (n - 1) * q
    j = int(np.floor(h))
    a = float(sorted_values[np.searchsorted(cumulative, j, side="right")])
    if h == j:
        return a
    b = float(sorted_values[np.searchsorted(cumulative, j + 1, side="right")])
    if a == b or not np.isfinite(a) or not np.isfinite(b):
        return a if not np.isfinite(a) else b
    return a + (b - a) * (h - j)


@dataclass(frozen=True)
class MannWhitney:
    """Mann–Whitney U of label 1 against label 0 (the statistic of scipy's
    `mannwhitneyu(x1, x0)`: pairs with x1 > x0, ties one half), two-sided asymptotic p with
    tie and continuity correction. `u_bound`, `p_bound` and `tie_bound` (Σ t³ − t) hold
    over every placement of the cells' patients; `exact` when they close. `u` is then
    scipy's U, else the middle of its bound; `p_value` is nan unless exact."""

    u: float
    p_value: float
    exact: bool
    u_bound: tuple[float, float]
    p_bound: tuple[float, float]
    tie_bound: tuple[float, float]
    n: tuple[int, int]  # label 0, label 1


def combine_mann_whitney(group0: CellRanges, group1: CellRanges) -> MannWhitney:
    """U and its p from the pooled cells of each group.

    U is non-decreasing in every label-1 value and non-increasing in every label-0 value,
    so it lies between U with label 1 at its cells' lower ends and label 0 at their upper
    ends, and the reverse. p falls with |U − n0·n1/2| and rises with the variance, which
    falls with the tie term; so p lies between p(farthest U, most ties) and p(nearest U,
    fewest ties).
    """
    n0, n1 = group0.n, group1.n
    if n0 == 0 or n1 == 0:
        nan2 = (np.nan, np.nan)
        return MannWhitney(np.nan, np.nan, False, nan2, nan2, nan2, (n0, n1))
    u_lo = _u_statistic(group1.lower, group1.count, group0.upper, group0.count)
    u_hi = _u_statistic(group1.upper, group1.count, group0.lower, group0.count)
    ties = _tie_bound(pool_cells([group0, group1]))
    mu = n0 * n1 / 2
    far = max(abs(u_lo - mu), abs(u_hi - mu))
    near = 0.0 if u_lo <= mu <= u_hi else min(abs(u_lo - mu), abs(u_hi - mu))
    p_bound = (_mwu_p(far, ties[1], n0, n1), _mwu_p(near, ties[0], n0, n1))
    exact = u_lo == u_hi and ties[0] == ties[1]
    return MannWhitney(u=(u_lo + u_hi) / 2, p_value=p_bound[0] if exact else np.nan,
                       exact=exact, u_bound=(u_lo, u_hi), p_bound=p_bound, tie_bound=ties,
                       n=(n0, n1))


def _u_statistic(x1: np.ndarray, c1: np.ndarray, x0: np.ndarray, c0: np.ndarray) -> float:
    """Σ over pairs of [x1 > x0] + ½[x1 = x0], each value repeated by its count."""
    order = np.argsort(x0, kind="stable")
    x0 = x0[order]
    cumulative = np.concatenate([[0], np.cumsum(c0[order])]).astype(np.float64)
    below = cumulative[np.searchsorted(x0, x1, side="left")]
    up_to = cumulative[np.searchsorted(x0, x1, side="right")]
    return float(np.sum(c1 * (below + 0.5 * (up_to - below))))


def _tie_bound(cells: CellRanges) -> tuple[float, float]:
    """Bounds on Σ(t³ − t) over the tied values of the pooled sample. Lower: the ties among
    patients whose value is known (more patients only add ties). Upper: Σ(t³ − t) =
    Σ_patients (t² − 1), and a patient ties with at most as many as the cells covering a
    bin of its own cell hold."""
    point = cells.point
    _, group = np.unique(cells.lower[point], return_inverse=True)
    known = np.bincount(group, weights=cells.count[point].astype(np.float64))
    low = float(np.sum(known ** 3 - known))
    cover = np.zeros(int(cells.last.max()) + 2)
    np.add.at(cover, cells.first, cells.count)
    np.add.at(cover, cells.last + 1, -cells.count)
    cover = np.cumsum(cover)
    most = np.array([cover[a:b + 1].max() for a, b in zip(cells.first, cells.last, strict=True)])
    n = float(cells.n)
    high = min(float(np.sum(cells.count * (most ** 2 - 1))), n ** 3 - n)
    return min(low, high), high


def _mwu_p(distance: float, tie_term: float, n0: int, n1: int) -> float:
    """Two-sided p of U at |U − n0·n1/2| = distance, as scipy's asymptotic method with
    continuity correction."""
    from scipy import stats  # server half only: a site's fresh process skips its import

    n = n0 + n1
    s = np.sqrt(n0 * n1 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (distance - 0.5) / s
    return float(np.clip(2 * stats.norm.sf(z), 0, 1))


def _checked(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if x.shape != y.shape:
        raise ValueError(f"values {x.shape} and labels {y.shape} differ in shape")
    return x, y


def _present(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return str(value).strip() != ""
