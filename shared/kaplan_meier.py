"""Kaplan–Meier and log-rank, federated: per-site time tables, pooled estimates. Pure numpy.

Every survival time is first binned at its site (`bin_times`: rounded UP to a multiple of
the site policy's `time_bin`; 0 keeps exact times), so the pooled numbers below equal
lifelines on the pooled, equally binned rows:

- site half `local_time_table`: at the site's own distinct binned exit times, the number at
  risk (T ≥ t) and the number of events (T = t, event);
- server half `combine_time_tables`: the union of the sites' times, at-risk counts summed
  after carrying each site's count back to the times it does not list (its at-risk count
  at t is its count at its next own time ≥ t, or 0 past its last one), events summed;
- `kaplan_meier`: the product-limit estimate with lifelines' exponential-Greenwood
  ("log-log") confidence interval, `logrank`: lifelines' (multivariate) log-rank test.

What crosses the wire and why it is acceptable is stated in `local_time_table`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import chdtrc, ndtri

Z95 = float(ndtri(0.975))


def bin_times(times: np.ndarray, time_bin: float) -> np.ndarray:
    """Times rounded UP to the next multiple of `time_bin` (0: unchanged).

    A time that is a multiple already stays (up to float noise: 0.3 with bin 0.1 is 0.3,
    not 0.4). Done at the site before anything is computed from the times.
    """
    t = np.asarray(times, dtype=np.float64)
    if time_bin < 0:
        raise ValueError(f"time_bin must be >= 0, got {time_bin}")
    if time_bin == 0:
        return t.copy()
    q = t / time_bin
    nearest = np.round(q)
    on_grid = np.abs(q - nearest) <= 1e-9 * np.maximum(1.0, np.abs(q))
    return np.where(on_grid, nearest, np.ceil(q)) * time_bin


@dataclass(frozen=True)
class TimeTable:
    """Distinct (binned) exit times with the number at risk and the number of events."""

    time: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray

    @property
    def n(self) -> int:
        return int(self.at_risk[0]) if len(self.at_risk) else 0


def local_time_table(times: np.ndarray, events: np.ndarray) -> TimeTable:
    """Site half: at each distinct binned time of the site, at risk (T ≥ t) and events.

    Crosses the wire: one row per distinct binned time of the site — the time (a multiple
    of the site's `time_bin`), the at-risk count and the event count. Cells of 1 or 2 are
    normal here (a Kaplan–Meier curve is a sequence of unit steps); the disclosure control
    for them is the site's time binning, and the table as a whole is released only when it
    covers at least `min_patients` patients and at least `min_cell_count` events (see
    client/stages/survival.py). No covariate is attached to a time.
    """
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events).astype(bool)
    if t.shape != e.shape:
        raise ValueError(f"times {t.shape} and events {e.shape} differ in shape")
    if t.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return TimeTable(np.zeros(0), empty, empty)
    grid, inverse = np.unique(t, return_inverse=True)
    exits = np.bincount(inverse, minlength=grid.size)
    deaths = np.bincount(inverse, weights=e, minlength=grid.size).astype(np.int64)
    at_risk = np.cumsum(exits[::-1])[::-1].astype(np.int64)
    return TimeTable(grid, at_risk, deaths)


def at_risk_on(table: TimeTable, grid: np.ndarray) -> np.ndarray:
    """A site's at-risk counts carried to `grid`: its count at its next own time ≥ t."""
    if len(table.time) == 0:
        return np.zeros(len(grid), dtype=np.int64)
    idx = np.searchsorted(table.time, grid, side="left")
    padded = np.append(table.at_risk, 0)
    return padded[idx].astype(np.int64)


def events_on(table: TimeTable, grid: np.ndarray) -> np.ndarray:
    """A site's event counts on `grid` (0 where the site has no such time)."""
    out = np.zeros(len(grid), dtype=np.int64)
    if len(table.time):
        idx = np.searchsorted(grid, table.time)
        if np.any(idx >= len(grid)) or np.any(grid[np.minimum(idx, len(grid) - 1)] != table.time):
            raise ValueError("a site time is not on the pooled grid")
        out[idx] = table.events
    return out


def combine_time_tables(tables: Sequence[TimeTable]) -> TimeTable:
    """Server half: the pooled table over the union of the sites' times."""
    parts = [t for t in tables if len(t.time)]
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return TimeTable(np.zeros(0), empty, empty)
    grid = np.unique(np.concatenate([t.time for t in parts]))
    at_risk = np.sum([at_risk_on(t, grid) for t in parts], axis=0)
    events = np.sum([events_on(t, grid) for t in parts], axis=0)
    return TimeTable(grid, at_risk.astype(np.int64), events.astype(np.int64))


@dataclass(frozen=True)
class KaplanMeier:
    """The product-limit estimate on lifelines' timeline (0, then every distinct time)."""

    time: np.ndarray
    survival: np.ndarray
    ci_lower: np.ndarray
    ci_upper: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray
    variance: np.ndarray  # Greenwood's sum  Σ d / (n (n − d)), as lifelines' cumulative_sq_


def kaplan_meier(table: TimeTable, alpha: float = 0.05) -> KaplanMeier:
    """KM survival and lifelines' exponential-Greenwood CI (`KaplanMeierFitter`).

    S(t) = exp Σ_{t_i ≤ t} [log(n_i − d_i) − log n_i];  V(t) = Σ d_i / (n_i (n_i − d_i))
    (a term with n_i = d_i counts 0);  CI = exp(−exp(log(−log S) ∓ z √V / log S)), with 1
    where S = 1 (lifelines fills the undefined value with 1).
    """
    time, at_risk, events = table.time, table.at_risk, table.events
    if len(time) == 0 or time[0] > 0:  # lifelines' timeline starts at 0
        n0 = int(at_risk[0]) if len(at_risk) else 0
        time = np.concatenate([[0.0], time])
        at_risk = np.concatenate([[n0], at_risk]).astype(np.int64)
        events = np.concatenate([[0], events]).astype(np.int64)
    n = at_risk.astype(np.float64)
    d = events.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_terms = np.where(d > 0, np.log(n - d) - np.log(n), 0.0)
        var_terms = np.where((d > 0) & (n > d), d / (n * (n - d)), 0.0)
    log_s = np.cumsum(log_terms)
    variance = np.cumsum(var_terms)
    survival = np.exp(log_s)
    z = float(ndtri(1 - alpha / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.log(survival)
        lower = np.exp(-np.exp(np.log(-v) - z * np.sqrt(variance) / v))
        upper = np.exp(-np.exp(np.log(-v) + z * np.sqrt(variance) / v))
    lower = np.where(np.isnan(lower), 1.0, lower)
    upper = np.where(np.isnan(upper), 1.0, upper)
    return KaplanMeier(time, survival, lower, upper, at_risk, events, variance)


@dataclass(frozen=True)
class LogRank:
    statistic: float
    p_value: float
    df: int


def logrank(tables: Sequence[TimeTable]) -> LogRank:
    """Log-rank test over ≥ 2 groups from the pooled per-group time tables, as lifelines'
    `multivariate_logrank_test` (for two groups equal to `logrank_test`).

    O_j − E_j summed over the union of times, variance V_jk = Σ f_t n_jt (δ_jk n_t − n_kt)
    with f_t = d_t (n_t − d_t) / (n_t² (n_t − 1)); statistic = Z' V⁻ Z over the first
    k − 1 groups (pseudo-inverse, as lifelines), chi-square with k − 1 df.
    """
    groups = [t for t in tables]
    k = len(groups)
    if k < 2:
        return LogRank(float("nan"), float("nan"), 0)
    nonempty = [t.time for t in groups if len(t.time)]
    if not nonempty:
        return LogRank(float("nan"), float("nan"), k - 1)
    grid = np.unique(np.concatenate(nonempty))
    n_ij = np.stack([at_risk_on(t, grid) for t in groups], axis=1).astype(np.float64)
    d_ij = np.stack([events_on(t, grid) for t in groups], axis=1).astype(np.float64)
    n_i = n_ij.sum(axis=1)
    d_i = d_ij.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = n_ij * (d_i / n_i)[:, None]
        ratio = (n_i - d_i) / (n_i - 1)
    expected = np.nan_to_num(expected, nan=0.0)
    ratio = np.where(np.isfinite(ratio), ratio, 1.0)  # lifelines replaces inf/nan by 1
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.nan_to_num(ratio * d_i / n_i**2, nan=0.0)
    z = d_ij.sum(axis=0) - expected.sum(axis=0)
    weighted = n_ij * np.sqrt(factor)[:, None]
    total = n_i * np.sqrt(factor)
    v = np.diag(weighted.T @ total) - weighted.T @ weighted
    v = v[: k - 1, : k - 1]
    u = float(z[: k - 1] @ np.linalg.pinv(v) @ z[: k - 1])
    return LogRank(u, float(chdtrc(k - 1, u)), k - 1)
