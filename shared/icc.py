"""ICC(2,1) per feature — two-way random effects, absolute agreement, single rater
(Shrout & Fleiss 1979; McGraw & Wong 1996 "ICC(A,1)") — federated over sites.

Each feature is an (n patients × k readers) table. The two-way ANOVA mean squares need only
n, the grand total T, Σx², Σ over patients of (row sum)² and the k reader column sums:

    SST = Σx² − T²/(nk)        SSR = Σ row² / k − T²/(nk)      SSC = Σ col² / n − T²/(nk)
    SSE = SST − SSR − SSC      MSR = SSR/(n−1)   MSC = SSC/(k−1)   MSE = SSE/((n−1)(k−1))
    ICC(2,1) = (MSR − MSE) / (MSR + (k−1)·MSE + k·(MSC − MSE)/n)

All of these are sums over patients, so each site sends its part and the server adds them.
The sums are taken around a shift c per feature (the ANOVA is shift-invariant): round 1
gives the pooled grand mean, round 2 the centred sums, which avoids the cancellation of
Σx² − T²/(nk) on radiomics features with large means. Vectorized over features; a patient
enters a feature's table only when every reader has a value for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.federated import Query, Reply

COLUMN_SUMS = "icc.column_sums"
SQUARES = "icc.squares"
DEFAULT_THRESHOLD = 0.75


def local_column_sums(readers: np.ndarray) -> Reply:
    """Round 1 at a site: `n` (p,) complete patients and `column_sum` (k, p) per reader.

    `readers` is (k readers, n patients, p features), rows aligned by patient.
    Crosses the wire: a count and k sums per feature, as in standardization.
    """
    x, present = _complete(readers)
    return {"n": present.sum(axis=0).astype(np.int64), "column_sum": x.sum(axis=1)}


def local_squares(readers: np.ndarray, shift: np.ndarray) -> Reply:
    """Round 2 at a site: the ANOVA sums of (x − c) for the server's shift c (p,).

    Reply: `n` (p,), `total` (p,) ΣΣ(x − c), `square` (p,) ΣΣ(x − c)², `row_square` (p,)
    Σ_patients (Σ_readers (x − c))², `column_sum` (k, p) Σ_patients (x − c) per reader.
    Crosses the wire: sums over the site's patients only; the row sums are squared and
    summed at the site, so no patient's readings leave it.
    """
    x, present = _complete(readers)
    x = np.where(present, x - np.asarray(shift, dtype=np.float64), 0.0)
    rows = x.sum(axis=0)
    return {"n": present.sum(axis=0).astype(np.int64), "total": rows.sum(axis=0),
            "square": (x**2).sum(axis=(0, 1)), "row_square": (rows**2).sum(axis=0),
            "column_sum": x.sum(axis=1)}


@dataclass(frozen=True)
class MeanSquares:
    """Per feature: patients n, readers k, the ANOVA mean squares and ICC(2,1)."""

    n: np.ndarray
    k: int
    msr: np.ndarray
    msc: np.ndarray
    mse: np.ndarray
    icc: np.ndarray


def combine_icc(n: np.ndarray, total: np.ndarray, square: np.ndarray, row_square: np.ndarray,
                column_sum: np.ndarray) -> MeanSquares:
    """ICC(2,1) from the summed round-2 reply (NaN where undefined: n < 2 or no variance)."""
    n = np.asarray(n, dtype=np.float64)
    column_sum = np.asarray(column_sum, dtype=np.float64)
    k = column_sum.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        correction = np.asarray(total) ** 2 / (n * k)
        sst = np.asarray(square) - correction
        ssr = np.asarray(row_square) / k - correction
        ssc = (column_sum**2).sum(axis=0) / n - correction
        msr = ssr / (n - 1)
        msc = ssc / (k - 1)
        mse = (sst - ssr - ssc) / ((n - 1) * (k - 1))
        icc = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    icc = np.where((n >= 2) & np.isfinite(icc), icc, np.nan)
    return MeanSquares(n=n.astype(np.int64), k=k, msr=msr, msc=msc, mse=mse, icc=icc)


@dataclass(frozen=True)
class IccFilter:
    keep: np.ndarray
    dropped: dict[int, str] = field(default_factory=dict)


def icc_filter(icc: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> IccFilter:
    """Keep features with ICC(2,1) > threshold; the others are dropped with the reason."""
    icc = np.asarray(icc, dtype=np.float64)
    keep = np.isfinite(icc) & (icc > threshold)
    dropped = {int(j): ("ICC undefined (fewer than 2 patients or no variance)"
                        if not np.isfinite(icc[j]) else f"ICC {icc[j]:.3f} <= {threshold}")
               for j in np.flatnonzero(~keep)}
    return IccFilter(keep=keep, dropped=dropped)


def site_reply(readers: np.ndarray, query: Query) -> Reply:
    """The site half for the `ICC` solver's queries."""
    if query["step"] == COLUMN_SUMS:
        return local_column_sums(readers)
    if query["step"] == SQUARES:
        return local_squares(readers, query["shift"])
    raise ValueError(f"unknown ICC step {query['step']!r}")


class ICC:
    """Solver: round 1 `{"step": "icc.column_sums"}` → `n`, `column_sum`; round 2
    `{"step": "icc.squares", "shift": (p,)}` → the centred sums of `local_squares`.
    Pass `shift` (e.g. pooled means known from elsewhere) to skip round 1.
    `result` is the `MeanSquares` once `done`."""

    def __init__(self, shift: np.ndarray | None = None) -> None:
        self.rounds = 0
        self.done = False
        self.result: MeanSquares | None = None
        self._shift = None if shift is None else np.asarray(shift, dtype=np.float64)

    def query(self) -> Query:
        if self._shift is None:
            return {"step": COLUMN_SUMS}
        return {"step": SQUARES, "shift": self._shift}

    def update(self, reply: Reply) -> None:
        self.rounds += 1
        if self._shift is None:
            n = np.asarray(reply["n"], dtype=np.float64)
            k = reply["column_sum"].shape[0]
            with np.errstate(invalid="ignore", divide="ignore"):
                shift = reply["column_sum"].sum(axis=0) / (n * k)
            self._shift = np.where(n > 0, shift, 0.0)
            return
        self.result = combine_icc(reply["n"], reply["total"], reply["square"],
                                  reply["row_square"], reply["column_sum"])
        self.done = True


def _complete(readers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(readers, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"expected (readers >= 2, patients, features), got shape {x.shape}")
    present = ~np.isnan(x).any(axis=0)  # (patients, features)
    return np.where(present, x, 0.0), present
