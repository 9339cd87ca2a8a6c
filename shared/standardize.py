"""Pooled standardization (z-scores, ddof 0, as scikit-learn's `StandardScaler`), federated.

Two rounds, exact against `StandardScaler` on the pooled rows:
1. `local_sums`: per feature the count of present values and their sum → pooled mean;
2. `local_squares`: per feature Σ(x − μ)² and Σ(x − μ) around the pooled mean → pooled
   variance with the corrected two-pass formula StandardScaler uses (Chan, Golub & LeVeque).
Missing values (NaN) are skipped per feature, as StandardScaler does. Features whose pooled
variance is indistinguishable from 0 (StandardScaler's own `_is_constant_feature` bound) are
dropped with a stated reason instead of being scaled by 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.federated import Query, Reply
from shared.queries.bounds import QueryRejected

SUMS = "standardize.sums"
SQUARES = "standardize.squares"
CENTRE_SCALES = 20.0  # how many scales beyond the site's range a z-score centre may lie


def local_sums(x: np.ndarray) -> Reply:
    """Round 1 at a site: `n` (p,) present values and `sum` (p,) Σx per feature.

    Crosses the wire: one count and one sum per feature over all the site's patients; no
    value of a single patient is recoverable when the count is at least the site's
    `min_patients`.
    """
    x = _matrix(x)
    present = ~np.isnan(x)
    return {"n": present.sum(axis=0).astype(np.int64), "sum": np.nansum(x, axis=0)}


def local_squares(x: np.ndarray, mean: np.ndarray) -> Reply:
    """Round 2 at a site: `square` Σ(x − μ)² and `residual` Σ(x − μ), each (p,), around the
    pooled mean μ sent by the server.

    Crosses the wire: one sum of squares per feature (the site's spread around a public
    mean); `residual` equals Σx − n·μ, already implied by round 1, and is sent only for the
    rounding correction of the two-pass variance.
    """
    x = _matrix(x)
    deviation = x - np.asarray(mean, dtype=np.float64)
    return {"square": np.nansum(deviation**2, axis=0), "residual": np.nansum(deviation, axis=0)}


def combine_mean(n: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Pooled mean per feature from the summed `n` and `sum` (NaN where n is 0)."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.asarray(total, dtype=np.float64) / n, np.nan)


@dataclass(frozen=True)
class Scaling:
    """Pooled mean and sd (ddof 0) per feature; `keep` marks the features that are used.

    `scale` is the sd, set to 1 for dropped features (as StandardScaler's `scale_`);
    `dropped` maps a feature's column index to the reason it was dropped.
    """

    n: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray
    keep: np.ndarray
    dropped: dict[int, str] = field(default_factory=dict)

    def transform(self, x: np.ndarray, *, kept_only: bool = True) -> np.ndarray:
        """Site-side z-scores (x − μ) / sd, by default only for the kept features."""
        z = (_matrix(x) - self.mean) / self.scale
        return z[:, self.keep] if kept_only else z


def combine_scaling(n: np.ndarray, mean: np.ndarray, square: np.ndarray,
                    residual: np.ndarray) -> Scaling:
    """Pooled variance = (Σ(x − μ)² − (Σ(x − μ))²/n) / n; constant features dropped."""
    n = np.asarray(n, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (np.asarray(square) - np.asarray(residual) ** 2 / n) / n
    eps = np.finfo(np.float64).eps
    # StandardScaler's bound for "indistinguishable from constant" (rounding of two passes)
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    empty = n == 0
    keep = ~(constant | empty)
    var = np.where(constant, 0.0, var)
    scale = np.where(keep, np.sqrt(np.where(keep, var, 1.0)), 1.0)
    dropped = {int(j): "no values at any site" for j in np.flatnonzero(empty)}
    dropped |= {int(j): "constant: pooled sd is 0 (within rounding)"
                for j in np.flatnonzero(constant & ~empty)}
    return Scaling(n=n.astype(np.int64), mean=mean, var=var, scale=scale, keep=keep,
                   dropped=dropped)


def check_scaling(x: np.ndarray, center: np.ndarray, scale: np.ndarray,
                  max_coefficient: float) -> tuple[np.ndarray, np.ndarray]:
    """The server's z-score `center` and `scale` per column, checked against the site's own
    column statistics (x as the site holds it): finite, one per column, the scale no smaller
    than the site's SD / `max_coefficient` (a tiny scale is a steep point: (x − c)/s is then a
    step at c) and the centre within the site's range widened by that range and
    `CENTRE_SCALES` scales on either side (a pooled mean lies there even for a small or
    constant site far from the others; farther out every value is only clipped). Raises
    `QueryRejected` with the reason, naming no value."""
    x = _matrix(x)
    center = np.asarray(center, dtype=np.float64).ravel()
    scale = np.asarray(scale, dtype=np.float64).ravel()
    if center.shape != (x.shape[1],) or scale.shape != (x.shape[1],):
        raise QueryRejected(f"center/scale of {center.size}/{scale.size} values for "
                            f"{x.shape[1]} columns")
    if not (np.all(np.isfinite(center)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise QueryRejected("center/scale: every centre finite and every scale > 0")
    if not len(x):
        return center, scale
    with np.errstate(invalid="ignore"):
        sd = np.nanstd(x, axis=0)
        low, high = np.nanmin(x, axis=0), np.nanmax(x, axis=0)
    sd, low, high = (np.nan_to_num(v) for v in (sd, low, high))
    steep = np.flatnonzero(sd > max_coefficient * scale)
    if steep.size:
        raise QueryRejected(f"scale of column {int(steep[0])} is below the site's SD / "
                            f"max_coefficient ({max_coefficient:g}): a steep point")
    margin = high - low + CENTRE_SCALES * scale
    outside = np.flatnonzero((center < low - margin) | (center > high + margin))
    if outside.size:
        raise QueryRejected(f"centre of column {int(outside[0])} is outside the site's range")
    return center, scale


def site_reply(x: np.ndarray, query: Query) -> Reply:
    """The site half for the `Standardize` solver's queries."""
    if query["step"] == SUMS:
        return local_sums(x)
    if query["step"] == SQUARES:
        return local_squares(x, query["mean"])
    raise ValueError(f"unknown standardization step {query['step']!r}")


class Standardize:
    """Two-round solver. Round 1 query `{"step": "standardize.sums"}`, reply `n`, `sum`
    (p,); round 2 query `{"step": "standardize.squares", "mean": (p,)}`, reply `square`,
    `residual` (p,). `result` is the `Scaling` once `done`."""

    def __init__(self) -> None:
        self.rounds = 0
        self.done = False
        self.result: Scaling | None = None
        self._n: np.ndarray | None = None
        self._mean: np.ndarray | None = None

    def query(self) -> Query:
        if self._mean is None:
            return {"step": SUMS}
        return {"step": SQUARES, "mean": self._mean}

    def update(self, reply: Reply) -> None:
        self.rounds += 1
        if self._mean is None:
            self._n = np.asarray(reply["n"])
            self._mean = combine_mean(reply["n"], reply["sum"])
            return
        self.result = combine_scaling(self._n, self._mean, reply["square"], reply["residual"])
        self.done = True


def _matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a (patients × features) matrix, got shape {x.shape}")
    return x
