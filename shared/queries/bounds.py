"""The bounds a site sets from its own data and policy on what a query asks (no I/O).

The declarations (`shared.queries.params`) hold what can be checked without data; these
are the checks that need the site's rows: how steep a point may be, how concentrated the
weights of a weighted sum may be, how fine a grid may be, how much memory a query takes.
Each raises `QueryRejected` with the reason; none names a patient or a value of one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.queries.params import QueryRejected

MIB = 2**20


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size (Σ|w|)² / Σw² of non-negative or signed weights: n for
    equal weights, 1 when one patient carries all the weight."""
    w = np.abs(np.asarray(weights, dtype=np.float64)).ravel()
    total = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / total if total > 0 else 0.0


def require_spread(weights: np.ndarray, least: float, what: str) -> None:
    """Refuse a weighted sum whose weights rest on fewer than `least` patients' worth."""
    ess = effective_sample_size(weights)
    if ess < least:
        raise QueryRejected(f"{what}: its weights rest on {ess:.1f} patients' worth "
                            f"(effective sample size), below the {least:g} this site "
                            "requires")


def require_gentle(coefficients: np.ndarray, column_sd: np.ndarray, max_coefficient: float,
                   what: str) -> None:
    """Refuse points with a coefficient steeper than `max_coefficient` per standard
    deviation of its column at this site (columns of sd 0 count as 1)."""
    coef = np.atleast_2d(np.asarray(coefficients, dtype=np.float64))
    sd = np.asarray(column_sd, dtype=np.float64).reshape(1, -1)
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    if coef.shape[-1] != sd.shape[-1]:
        raise QueryRejected(f"{what}: {coef.shape[-1]} coefficients for {sd.shape[-1]} columns")
    if not np.all(np.isfinite(coef)):
        raise QueryRejected(f"{what}: a coefficient is not finite")
    steep = float(np.max(np.abs(coef) * sd)) if coef.size else 0.0
    if steep > max_coefficient:
        raise QueryRejected(f"{what}: a coefficient of {steep:.3g} per standard deviation is "
                            f"steeper than max_coefficient ({max_coefficient:g})")


def max_bins(n: int, min_cell_count: int) -> int:
    """The finest grid a site with `n` patients answers: no more cells than could each hold
    `min_cell_count` of them (and at least one)."""
    return max(1, int(n) // max(1, int(min_cell_count)))


def require_memory(shape_products: Sequence[int], max_mib: int, what: str,
                   itemsize: int = 8) -> None:
    """Refuse a query whose arrays (given by their element counts) exceed the site's
    `max_query_memory_mb` before any of them is allocated."""
    need = sum(int(k) for k in shape_products) * itemsize
    if need > max_mib * MIB:
        raise QueryRejected(f"{what} needs {need / MIB:,.0f} MiB, more than this site's "
                            f"max_query_memory_mb ({max_mib})")
