"""Cohort table by label, federated: group moments, t-tests and chi-square from sums.

Two rounds, exact against the pooled rows (DESIGN.md, "standardization" row):
1. each site sends, per label group, the count and sum of every numeric covariate and the
   level counts of every categorical covariate (`local_group_sums`, `local_level_counts`);
2. with the pooled group means fixed, each site sends Σ(x − μ_g)² (`local_group_squares`),
   which avoids the cancellation of Σx² − n·μ².
The server adds the site halves (`combine_*`) and computes the tests on the pooled
moments, which equal scipy's on the pooled rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUPS = 2  # label 0 and label 1


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
