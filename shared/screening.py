"""Univariate screening: chi2 and binned mutual information, federated; percentile selection.

chi2 is scikit-learn's `feature_selection.chi2` exactly: it needs only the class counts and
the per-class feature sums. scikit-learn requires non-negative X (the authors min–max scaled
first). Min–max on pooled data would reveal the two extreme patients, so features are put on
a *shared* unit range instead: `unit_range(z) = clip((z + width) / (2·width), 0, 1)` on the
pooled z-scores, i.e. min–max where the range is pooled mean ± width·sd (default 3) rather
than the data's extremes. Values beyond that range (rare tails) are clipped to 0 or 1.
chi2 on that input is exactly `chi2(unit_range(z), y)` on the pooled rows.

Mutual information: scikit-learn's `mutual_info_classif` is a k-nearest-neighbour estimator
that needs every patient's neighbours across sites, so it cannot be federated. We use the
binned estimator instead: pooled z-scores cut on a shared grid (`grid`: equal-width bins
between −width and +width sd, the two outer bins open-ended), a (bins × classes) count
table per feature summed over sites, and the plug-in MI in nats — exactly
`sklearn.metrics.mutual_info_score(y, bin)` on the pooled rows.
"""

from __future__ import annotations

import numpy as np
from scipy.special import chdtrc

from shared.federated import Reply

CLASSES = (0, 1)
DEFAULT_BINS = 8
DEFAULT_WIDTH = 2.0  # MI grid: cut points spread over mean ± 2 sd
UNIT_RANGE_WIDTH = 3.0  # chi2 input: mean ± 3 sd mapped onto [0, 1]


def unit_range(z: np.ndarray, width: float = UNIT_RANGE_WIDTH) -> np.ndarray:
    """Pooled z-scores → [0, 1] on the shared range mean ± width·sd (site-side)."""
    return np.clip((np.asarray(z, dtype=np.float64) + width) / (2 * width), 0.0, 1.0)


def local_class_sums(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...] = CLASSES) -> Reply:
    """chi2 at a site: `count` (K,) patients per class and `sum` (K, p) per-class Σx.

    Crosses the wire: K counts and K·p sums over the site's patients in each class, released
    under the site's `min_patients` like any group sum. x must be non-negative
    (`unit_range` first), as scikit-learn's chi2 requires.
    """
    x = np.asarray(x, dtype=np.float64)
    if np.any(x < 0):
        raise ValueError("chi2 needs non-negative input: map z-scores with unit_range first")
    y = np.asarray(y)
    member = np.stack([y == c for c in classes]).astype(np.float64)  # (K, n)
    return {"count": member.sum(axis=1).astype(np.int64), "sum": member @ x}


def combine_chi2(count: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chi2, p-value) per feature from the summed class counts and per-class sums, with
    scikit-learn's formula: observed = per-class Σx, expected = class share × Σx."""
    count = np.asarray(count, dtype=np.float64)
    observed = np.asarray(sums, dtype=np.float64)
    present = count > 0  # scikit-learn only sees the classes that occur
    count, observed = count[present], observed[present]
    expected = np.outer(count / count.sum(), observed.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        statistic = ((observed - expected) ** 2 / expected).sum(axis=0)
    return statistic, chdtrc(len(count) - 1, statistic)


def grid(bins: int = DEFAULT_BINS, width: float = DEFAULT_WIDTH) -> np.ndarray:
    """The bins−1 shared cut points on the z scale, equally spaced over [−width, width]."""
    if bins < 2:
        raise ValueError("need at least 2 bins")
    return np.linspace(-width, width, bins - 1)


def bin_index(z: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Bin of each value, 0..len(cuts): bin b holds cuts[b−1] < z <= cuts[b]."""
    return np.searchsorted(np.asarray(cuts), np.asarray(z, dtype=np.float64), side="left")


def local_binned_counts(z: np.ndarray, y: np.ndarray, cuts: np.ndarray,
                        classes: tuple[int, ...] = CLASSES) -> Reply:
    """MI at a site: `count` (p, bins, K), patients per feature bin and class.

    Crosses the wire: a count table per feature on a grid fixed by the server, never a
    value; the guard's `min_cell_count` rule applies to it (fewer bins give fuller cells).
    Rows with a missing value for a feature are not counted for it.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y)
    bins = bin_index(z, cuts)  # (n, p)
    n_bins = len(cuts) + 1
    table = np.zeros((z.shape[1], n_bins, len(classes)), dtype=np.int64)
    present = ~np.isnan(z)
    for k, c in enumerate(classes):
        for j in range(z.shape[1]):
            rows = present[:, j] & (y == c)
            table[j, :, k] = np.bincount(bins[rows, j], minlength=n_bins)
    return {"count": table}


def mutual_information(table: np.ndarray) -> np.ndarray:
    """Plug-in MI (nats) of each (bins × classes) table in a (p, bins, K) stack, as
    `sklearn.metrics.mutual_info_score` on the same cells; empty cells contribute 0."""
    table = np.asarray(table, dtype=np.float64)
    total = table.sum(axis=(1, 2), keepdims=True)
    rows = table.sum(axis=2, keepdims=True)
    cols = table.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(table > 0, table / total * np.log(table * total / (rows * cols)), 0.0)
    return np.clip(terms.sum(axis=(1, 2)), 0.0, None)


def select_percentile(scores: np.ndarray, percentile: float) -> np.ndarray:
    """Mask of the top `percentile` % scores, as scikit-learn's `SelectPercentile`: NaN
    scores rank lowest; ties at the threshold are kept in column order up to the quota."""
    scores = np.asarray(scores, dtype=np.float64)
    if percentile >= 100:
        return np.ones(len(scores), dtype=bool)
    if percentile <= 0:
        return np.zeros(len(scores), dtype=bool)
    scores = np.where(np.isnan(scores), np.finfo(np.float64).min, scores)
    threshold = np.percentile(scores, 100 - percentile)
    mask = scores > threshold
    ties = np.flatnonzero(scores == threshold)
    quota = int(len(scores) * percentile / 100)
    mask[ties[: quota - int(mask.sum())]] = True  # the same slice as scikit-learn
    return mask
