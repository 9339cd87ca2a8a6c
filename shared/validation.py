"""Validation statistics from label-stratified score histograms on a shared grid.

Every statistic here is computed by the server from counts (and a few sums) that the sites
send per bin of the shared grid (`shared.roc.grid`, uniform on [0, 1], 200 bins by default);
no single score or label leaves a site. Site halves are added element-wise (`combine_*`
take the list of site arrays). The grid bins are half-open [e_b, e_{b+1}) (last one closed),
as in `roc.local_histogram`.

Exactness. When each site sends its uncoarsened per-bin counts, or all scores already sit
on grid points (one value per bin), the pooled statistics below equal the library / direct
computations on the pooled scores snapped to the bin centres: AUC (= `roc_auc_score`),
DeLong variance and CI, paired DeLong test, Youden cut and confusion metrics at a grid edge,
uniform calibration curve (calibration bins = unions of grid bins), Brier score, and the
calibration slope/intercept. For raw (off-grid) scores, the AUC/DeLong/slope statistics are
those of the snapped scores (error bounded as in `shared.roc`), while `local_confusion`,
`local_score_sums` (Brier, mean predicted probability per calibration bin) stay exact.

Site-side coarsening (`roc.coarsen`, so that no non-empty cell is below min_cell_count)
turns the exact results into approximations or bounds: the AUC becomes the interval of
`roc.combine_auc`; the DeLong placements V10/V01 of patients in a merged cell are only
known up to the cell's range (the variance is then an estimate, not a bound); the Youden
search and `combine_confusion` can only cut at the edges of merged cells (the server's
threshold must be a common edge, otherwise use `local_confusion`, which sends 4 counts);
a calibration bin whose edge falls inside a merged cell is not determined.

The paired DeLong test needs, per patient, the product of their placements under two
models, which no pair of histograms holds. It takes a second round: the server sends the
pooled per-bin placement deviations of every model (`placement_deviations`), and each site
returns k × k sums of their products over its own patients (`local_placement_moments`).
Exact on the grid when the pooled histograms are; no count table crosses the wire.

Under a hostile coordinator (issue 25) the site checks what it is sent before it sums:
each model once (a model listed twenty times with one-hot rows read out the per-bin
counts), the deviations shaped and valued as a pooled histogram's (`check_placements`:
monotone, within [−1, 1]), and each patient's placement taken as the mean over the cell the
site released them in (`cell_values`), so that a sum's diagonal is a function of released
cells. Where the placements are constant on every cell (always at min_cell_count 1, and for
a proven-exact set) the sums equal the per-bin ones; the site says so (`exact`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from shared import roc
from shared.queries.params import QueryRejected

GROUPS = 2  # label 0 (negative) and label 1 (positive)


# --------------------------------------------------------------------------- site side


def local_histogram(scores: np.ndarray, y: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(2 × bins) counts of label-0 and label-1 scores per grid bin (`roc.local_histogram`).

    Crosses the wire: patient counts per (label, bin) — the input of the AUC, DeLong, Youden,
    confusion and calibration-slope statistics. A count of 1 or 2 pins a patient's score to
    one bin; under the guard the site coarsens (`roc.coarsen`) first, see the module note.
    """
    return roc.local_histogram(scores, y, edges)


def local_score_sums(scores: np.ndarray, y: np.ndarray,
                     edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(2 × bins) Σscore and Σscore² per (label, bin): calibration means and Brier score.

    Crosses the wire: two sums per cell of the histogram above, released under the same
    cell rule (a sum over ≥ min_cell_count patients; a single score is never sent). Exact
    for raw scores too: Brier and each calibration bin's mean prediction are sums of these.
    """
    scores = np.clip(np.asarray(scores, dtype=np.float64), edges[0], edges[-1])
    index = bin_index(scores, edges)
    y = np.asarray(y)
    bins = len(edges) - 1
    sums = np.stack([np.bincount(index[y == g], weights=scores[y == g], minlength=bins)
                     for g in range(GROUPS)])
    squares = np.stack([np.bincount(index[y == g], weights=scores[y == g] ** 2,
                                    minlength=bins) for g in range(GROUPS)])
    return sums, squares


def local_placement_moments(bins: np.ndarray, y: np.ndarray, d10: np.ndarray,
                            d01: np.ndarray) -> np.ndarray:
    """(2 × k × k) cross sums of the k models' DeLong placement deviations over the site's
    patients: [0] = Σ_neg D01_a[b_a(i)]·D01_c[b_c(i)], [1] = Σ_pos D10_a[b_a(i)]·D10_c[b_c(i)].

    `bins` (k × n) are the patients' grid-bin indices under each model (`bin_index`);
    `d10`, `d01` (k × bins) are the deviations the server computed from the pooled
    histograms (`placement_deviations`). The covariance of two AUCs sums, over patients, the
    product of each patient's placement under both models, which per-model histograms cannot
    give; the site evaluates it on its own patients' exact bins.

    Crosses the wire: k × k sums per label over all the site's patients of that label — no
    per-patient value, no count table (one number per pair of models).
    """
    bins = np.atleast_2d(np.asarray(bins, dtype=np.int64))
    y = np.asarray(y).astype(bool)
    rows = np.arange(len(bins))[:, None]
    neg = np.asarray(d01)[rows, bins[:, ~y]]  # (k, n0)
    pos = np.asarray(d10)[rows, bins[:, y]]  # (k, n1)
    return np.stack([neg @ neg.T, pos @ pos.T])


PLACEMENT_TOL = 1e-9  # rounding of a pooled histogram's cumulative sums


def check_placements(d10: object, d01: object, bins: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The placement deviations a query sends for k models on grids of `bins` bins, as
    (d10, d01) arrays, or QueryRejected. They must be what `placement_deviations` makes of
    a pooled histogram: k rows (one per model), finite, each model's row V − AUC of a
    placement V in [0, 1] (so within [−1, 1] and spanning at most 1), D10 non-decreasing
    and D01 non-increasing over the model's bins, zeros after them (`_padded`). A one-hot
    row, or a row that picks bins, is none of these."""
    out = []
    for name, value, sign in (("d10", d10, 1.0), ("d01", d01, -1.0)):
        rows = np.asarray(value, dtype=np.float64) if isinstance(value, np.ndarray | list) \
            else np.zeros((0, 0))
        if rows.ndim != 2 or rows.shape[0] != len(bins) or rows.shape[1] < max(bins, default=0):
            raise QueryRejected(f"placements {name}: shape {rows.shape} does not fit "
                                f"{len(bins)} models of {max(bins, default=0)} bins")
        if not np.all(np.isfinite(rows)) or np.any(np.abs(rows) > 1 + PLACEMENT_TOL):
            raise QueryRejected(f"placements {name}: values beyond [-1, 1]")
        for a, b in enumerate(bins):
            row = rows[a, :b]
            if np.any(sign * np.diff(row) < -PLACEMENT_TOL) or np.ptp(row) > 1 + PLACEMENT_TOL \
                    or np.any(rows[a, b:] != 0):
                raise QueryRejected(f"placements {name}: model {a}'s row is not the placement "
                                    "of a pooled histogram (monotone, spanning at most 1)")
        out.append(rows)
    return out[0], out[1]


def cell_values(row: np.ndarray, scores: np.ndarray, index: np.ndarray, edges: np.ndarray,
                cells_first: np.ndarray, cells_last: np.ndarray) -> tuple[np.ndarray, bool]:
    """Per patient, `row` at the bin of the mean score of the cell the patient is in (cells
    as (first, last) bin ranges of `edges`, in order, holding every patient's bin `index`;
    `scores` the patients' scores), and whether `row` is constant on every cell (the value
    is then each patient's own bin's).

    A site evaluates the server's placements per released cell, not per bin: a sum over its
    patients is then a function of its cells, counts and sums, which the server already
    has, and no placement can pick out a bin inside a cell. The cell's mean score is where
    the server placed the cell in its pooled histogram (`roc.place_at_means`), so the
    placement read there is the one the pooled statistics gave those patients."""
    row = np.asarray(row, dtype=np.float64)
    first, last = np.asarray(cells_first, np.int64), np.asarray(cells_last, np.int64)
    if not len(first):
        return np.zeros(len(index)), True
    cell = np.searchsorted(first, np.asarray(index, np.int64), side="right") - 1
    count = np.bincount(cell, minlength=len(first)).astype(np.float64)
    total = np.bincount(cell, weights=np.asarray(scores, np.float64), minlength=len(first))
    mean = np.divide(total, count, out=np.zeros(len(first)), where=count > 0)
    at = np.clip(np.searchsorted(edges, mean, side="right") - 1, first, last)
    constant = all(np.ptp(row[f:la + 1]) <= PLACEMENT_TOL for f, la in zip(first, last,
                                                                             strict=True))
    return row[at][cell], constant


def local_cell_moments(values01: np.ndarray, values10: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`local_placement_moments` from per-patient placement values (k × n: a negative's
    D01, a positive's D10, each already evaluated on its cell, `cell_values`)."""
    y = np.asarray(y).astype(bool)
    neg = np.atleast_2d(values01)[:, ~y]
    pos = np.atleast_2d(values10)[:, y]
    return np.stack([neg @ neg.T, pos @ pos.T])


def local_confusion(scores: np.ndarray, y: np.ndarray, threshold: float) -> np.ndarray:
    """2 × 2 confusion matrix [[TN, FP], [FN, TP]] (sklearn's layout) for score ≥ threshold.

    For a threshold the server fixed (e.g. the training sites' Youden cut applied unchanged
    to an external site). Crosses the wire: four counts, each subject to min_cell_count.
    Exact for raw scores at any threshold.
    """
    y = np.asarray(y).astype(bool)
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    return np.array([[np.sum(~y & ~pred), np.sum(~y & pred)],
                     [np.sum(y & ~pred), np.sum(y & pred)]], dtype=np.int64)


def combine_sum(parts: list[np.ndarray]) -> np.ndarray:
    """Element-wise sum of the sites' arrays (histograms, sums, tables, confusion matrices)."""
    return np.sum([np.asarray(p) for p in parts], axis=0)


# --------------------------------------------------------------------------- the grid

LOGIT_CLIP = 1e-6


def local_logit_moments(scores: np.ndarray) -> np.ndarray:
    """[n, Σ logit(s), Σ logit(s)²] of one model's scores (clipped to [1e-6, 1 − 1e-6]).

    Crosses the wire: three sums over all the site's scored patients, so that the server can
    place a grid where the scores are (a model whose probabilities all lie within 0.35 ±
    0.01 gets no resolution from a uniform grid on [0, 1]). No single score.
    """
    z = _logit(np.asarray(scores, dtype=np.float64))
    return np.array([len(z), z.sum(), np.dot(z, z)])


def grid_from_moments(parts: list[np.ndarray], bins: int = roc.DEFAULT_BINS,
                      calibration_bins: int = 10, spread: float = 4.0) -> np.ndarray:
    """Edges of one model's grid on [0, 1]: `bins` bins uniform in logit over the pooled mean
    ± `spread` SD of the logit scores, plus 0, 1 and the calibration edges k/calibration_bins
    (so that calibration bins are unions of grid bins). Scores beyond the range share the
    outer bins (ties there; the AUC bound covers them)."""
    n, total, squares = np.sum([np.asarray(p, dtype=np.float64) for p in parts], axis=0)
    mean = total / n
    sd = max(np.sqrt(max(squares / n - mean * mean, 0.0)), 1e-3)
    inner = 1 / (1 + np.exp(-np.linspace(mean - spread * sd, mean + spread * sd, bins + 1)))
    fixed = np.linspace(0.0, 1.0, calibration_bins + 1)
    edges = np.unique(np.concatenate([inner, fixed]))
    return edges[np.concatenate([[True], np.diff(edges) > 1e-12])]


def _logit(scores: np.ndarray) -> np.ndarray:
    p = np.clip(scores, LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


# --------------------------------------------------------------------------- AUC, DeLong


def _placements(counts: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong placements per bin: V10[b] = P(neg < b) + ½P(neg = b) for a positive
    in bin b, V01[b] = P(pos > b) + ½P(pos = b) for a negative in bin b."""
    n0, n1 = (np.asarray(c, dtype=np.float64) for c in counts)
    total0, total1 = n0.sum(), n1.sum()
    below0 = np.cumsum(n0) - n0
    above1 = total1 - np.cumsum(n1)
    v10 = (below0 + 0.5 * n0) / total0
    v01 = (above1 + 0.5 * n1) / total1
    auc = float(np.dot(n1, v10) / total1)
    return auc, v10, v01


def combine_auc(parts: list[np.ndarray]) -> float:
    """Mann–Whitney AUC (ties ½) from the sites' uncoarsened (2 × bins) histograms."""
    counts = combine_sum(parts)
    _check_both_labels(counts)
    return _placements(counts)[0]


@dataclass(frozen=True)
class DeLongAUC:
    auc: float
    variance: float
    se: float
    lower: float  # auc − z·se, clipped to [0, 1] (as pROC)
    upper: float
    n: tuple[int, int]  # label 0, label 1


def combine_delong(parts: list[np.ndarray], level: float = 0.95) -> DeLongAUC:
    """AUC with DeLong (1988) variance S10/n1 + S01/n0 and CI AUC ± z·SE (pROC `delong`,
    z = Φ⁻¹((1 + level)/2) = 1.95996… for 95 %), from the summed (2 × bins) histograms.

    S10 = Σ_pos (V10 − AUC)² / (n1 − 1) and S01 = Σ_neg (V01 − AUC)² / (n0 − 1); every
    patient of a bin has the same placement, so both sums run over bins, weighted by count.
    """
    counts = combine_sum(parts)
    _check_both_labels(counts)
    n0, n1 = (np.asarray(c, dtype=np.float64) for c in counts)
    auc, v10, v01 = _placements(counts)
    s10 = float(np.dot(n1, (v10 - auc) ** 2) / (n1.sum() - 1))
    s01 = float(np.dot(n0, (v01 - auc) ** 2) / (n0.sum() - 1))
    variance = s10 / n1.sum() + s01 / n0.sum()
    se = float(np.sqrt(variance))
    z = float(ndtri((1 + level) / 2))
    return DeLongAUC(auc, variance, se, max(0.0, auc - z * se), min(1.0, auc + z * se),
                     (int(n0.sum()), int(n1.sum())))


def placement_deviations(counts: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and, per grid bin, D10 = V10 − AUC (a positive's deviation) and D01 = V01 − AUC
    (a negative's), from a pooled (2 × bins) histogram. The server sends D10 and D01 (numbers
    per bin of the pooled set, nothing about any one site) for `local_placement_moments`."""
    _check_both_labels(counts)
    auc, v10, v01 = _placements(counts)
    return auc, v10 - auc, v01 - auc


@dataclass(frozen=True)
class PairedDeLong:
    auc1: float
    auc2: float
    delta: float  # auc1 − auc2
    covariance: np.ndarray  # 2 × 2 DeLong covariance of (auc1, auc2)
    z: float
    p: float  # two-sided


def combine_delong_covariance(counts: list[np.ndarray],
                              moments: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of k models and their DeLong (1988) covariance matrix.

    `counts` are the k models' pooled (2 × bins) histograms over the same patients;
    `moments` the sites' `local_placement_moments`. S10 = Σ_pos D10 D10ᵀ / (n1 − 1),
    S01 = Σ_neg D01 D01ᵀ / (n0 − 1), Cov = S10/n1 + S01/n0 (pROC `delong`). Its diagonal
    equals `combine_delong`'s variance.
    """
    aucs = np.array([_placements(np.asarray(c, dtype=np.float64))[0] for c in counts])
    n0, n1 = np.asarray(counts[0], dtype=np.float64).sum(axis=1)
    total = np.asarray(combine_sum(moments), dtype=np.float64)
    cov = total[1] / (n1 - 1) / n1 + total[0] / (n0 - 1) / n0
    return aucs, cov


def paired_delong(aucs: np.ndarray, cov: np.ndarray, a: int = 0, b: int = 1) -> PairedDeLong:
    """Paired DeLong test of AUC_a = AUC_b (pROC `roc.test(method="delong")`):
    z = Δ / √(Var_a + Var_b − 2·Cov_ab), two-sided p."""
    delta = float(aucs[a] - aucs[b])
    var = cov[a, a] + cov[b, b] - 2 * cov[a, b]
    z = delta / np.sqrt(var) if var > 0 else (0.0 if delta == 0 else np.copysign(np.inf, delta))
    p = float(2 * ndtr(-abs(z)))
    pair = np.asarray(cov)[np.ix_([a, b], [a, b])]
    return PairedDeLong(float(aucs[a]), float(aucs[b]), delta, pair, float(z), p)


# --------------------------------------------------------------------------- Youden, metrics


@dataclass(frozen=True)
class YoudenCut:
    threshold: float  # predict positive when score ≥ threshold (a grid edge)
    index: int  # edge index: bins ≥ index are called positive
    j: float  # TPR − FPR at the cut
    sensitivity: float
    specificity: float


def combine_youden(parts: list[np.ndarray], edges: np.ndarray) -> YoudenCut:
    """Youden cut: argmax TPR − FPR over the grid's cut points e_0 … e_bins (score ≥ e_k).

    Ties (equal J, e.g. edges separated only by empty bins) go to the LOWEST threshold, i.e.
    the cut just above the last non-empty bin called negative (favours sensitivity).
    Exact for scores on the grid; with coarsened cells, search only their common edges.
    """
    counts = combine_sum(parts)
    _check_both_labels(counts)
    n0, n1 = (np.asarray(c, dtype=np.float64) for c in counts)
    tp = np.concatenate([np.cumsum(n1[::-1])[::-1], [0]])  # positives with bin ≥ k
    fp = np.concatenate([np.cumsum(n0[::-1])[::-1], [0]])
    tpr = tp / n1.sum()
    fpr = fp / n0.sum()
    j = tpr - fpr
    # first maximum = lowest threshold; J values of different cuts differ by ≥ 1/(n0·n1),
    # so a tolerance only absorbs the rounding of fractional (spread) counts
    k = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    return YoudenCut(float(edges[k]), k, float(j[k]), float(tpr[k]), float(1 - fpr[k]))


def combine_confusion(parts: list[np.ndarray], edges: np.ndarray,
                      threshold: float) -> np.ndarray:
    """[[TN, FP], [FN, TP]] at score ≥ threshold, from cumulative histogram counts.

    The threshold must be a grid edge (the bin containing any other threshold would be
    split); for any other threshold, have the sites send `local_confusion`. Fractional
    counts (cells a site merged, spread over their bins) are rounded so that each label
    keeps its total.
    """
    counts = np.asarray(combine_sum(parts), dtype=np.float64)
    k = int(np.searchsorted(edges, threshold))
    if k > len(edges) - 1 or not np.isclose(edges[k], threshold, rtol=0, atol=1e-12):
        raise ValueError(f"threshold {threshold!r} is not an edge of the grid")
    n0, n1 = (round(float(v)) for v in counts.sum(axis=1))
    tn, fn = (round(float(v)) for v in counts[:, :k].sum(axis=1))
    return np.array([[tn, n0 - tn], [fn, n1 - fn]], dtype=np.int64)


def combine_roc_curve(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every grid edge where either changes, from the highest threshold down
    (the curve starts at (0, 0) and ends at (1, 1))."""
    counts = np.asarray(combine_sum(parts), dtype=np.float64)
    _check_both_labels(counts)
    tp = np.concatenate([[0.0], np.cumsum(counts[1][::-1])])
    fp = np.concatenate([[0.0], np.cumsum(counts[0][::-1])])
    keep = np.concatenate([[True], (np.diff(tp) > 0) | (np.diff(fp) > 0)])
    return fp[keep] / fp[-1], tp[keep] / tp[-1]


@dataclass(frozen=True)
class Rate:
    value: float  # successes / trials (nan when trials = 0)
    lower: float  # Wilson score interval
    upper: float
    successes: int
    trials: int


def wilson(successes: int, trials: int, level: float = 0.95) -> Rate:
    """Proportion with its Wilson score interval (`scipy.stats.binomtest(...).proportion_ci`,
    method wilson; statsmodels' `proportion_confint(method="wilson")` gives the same)."""
    from scipy import stats  # server half only: a site's fresh process skips its import

    if trials == 0:
        return Rate(np.nan, np.nan, np.nan, int(successes), 0)
    ci = stats.binomtest(int(successes), int(trials)).proportion_ci(level, method="wilson")
    return Rate(successes / trials, float(ci.low), float(ci.high), int(successes),
                int(trials))


def f1_interval(tp: int, fp: int, fn: int, level: float = 0.95) -> Rate:
    """F1 = 2TP / (2TP + FP + FN) with a delta-method (Wald) interval, clipped to [0, 1].

    F1 is not a binomial proportion (its "trials" 2TP + FP + FN count a TP twice), so a
    Wilson interval on it is wrong. Under the multinomial model of the confusion matrix the
    delta method gives Var(F1) = 4·TP·(FP + FN)·(TP + FP + FN) / (2TP + FP + FN)⁴ (the TN
    cell and n cancel). At F1 = 0 or 1 the interval collapses to the point.
    """
    denominator = 2 * tp + fp + fn
    if denominator == 0:
        return Rate(np.nan, np.nan, np.nan, int(2 * tp), 0)
    f1 = 2 * tp / denominator
    se = np.sqrt(4.0 * tp * (fp + fn) * (tp + fp + fn)) / denominator ** 2
    z = float(ndtri((1 + level) / 2))
    return Rate(f1, float(max(0.0, f1 - z * se)), float(min(1.0, f1 + z * se)), int(2 * tp),
                int(denominator))


@dataclass(frozen=True)
class Diagnostics:
    confusion: np.ndarray  # [[TN, FP], [FN, TP]]
    accuracy: Rate
    sensitivity: Rate
    specificity: Rate
    ppv: Rate
    npv: Rate
    f1: Rate  # 2TP / (2TP + FP + FN), delta-method interval (`f1_interval`)


def diagnostics(confusion: np.ndarray, level: float = 0.95) -> Diagnostics:
    """ACC, SEN, SPE, PPV, NPV from a pooled confusion matrix, each with a Wilson CI, and F1
    with its delta-method interval."""
    (tn, fp), (fn, tp) = np.asarray(confusion, dtype=np.int64).tolist()
    return Diagnostics(
        np.asarray(confusion, dtype=np.int64),
        wilson(tp + tn, tp + tn + fp + fn, level),
        wilson(tp, tp + fn, level),
        wilson(tn, tn + fp, level),
        wilson(tp, tp + fp, level),
        wilson(tn, tn + fn, level),
        f1_interval(tp, fp, fn, level),
    )


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    prob_true: np.ndarray  # fraction of positives per non-empty calibration bin
    prob_pred: np.ndarray  # mean predicted probability per non-empty calibration bin
    count: np.ndarray  # patients per non-empty calibration bin
    edges: np.ndarray  # the calibration bins' edges (all, including empty bins)


def combine_calibration(counts: list[np.ndarray], sums: list[np.ndarray],
                        edges: np.ndarray, n_bins: int = 10) -> Calibration:
    """Uniform calibration curve (`calibration_curve(strategy="uniform", n_bins)`).

    Requirement: each calibration bin is a union of grid bins, i.e. every edge k/n_bins is
    an edge of the grid (checked; `grid_from_moments` builds such grids). Also, sklearn puts
    a score lying exactly on an interior calibration edge in the lower bin, the grid in the
    upper one; scores on the grid (bin centres) never lie on an edge. `sums` are the sites'
    Σscore from `local_score_sums`, so the mean prediction is exact even for raw scores.
    """
    cal_edges = np.linspace(0.0, 1.0, n_bins + 1)
    at = np.searchsorted(edges, cal_edges - 1e-12)
    if np.any(at >= len(edges)) or not np.allclose(edges[np.minimum(at, len(edges) - 1)],
                                                   cal_edges, rtol=0, atol=1e-12):
        raise ValueError(f"{n_bins} calibration bins are not unions of the grid's bins")
    c = np.add.reduceat(np.asarray(combine_sum(counts), dtype=np.float64), at[:-1], axis=1)
    s = np.add.reduceat(np.asarray(combine_sum(sums), dtype=np.float64), at[:-1], axis=1)
    total = c.sum(axis=0)
    keep = total > 0
    return Calibration(c[1][keep] / total[keep], s.sum(axis=0)[keep] / total[keep],
                       total[keep].astype(np.int64), cal_edges)


def combine_brier(counts: list[np.ndarray], sums: list[np.ndarray],
                  squares: list[np.ndarray]) -> float:
    """Brier score mean((y − p)²) = (Σ_neg p² + Σ_pos (1 − 2p + p²)) / n from the sites'
    per-(label, bin) counts, Σp and Σp² (`local_score_sums`); exact for any scores."""
    c = np.asarray(combine_sum(counts), dtype=np.float64)
    s = np.asarray(combine_sum(sums), dtype=np.float64)
    q = np.asarray(combine_sum(squares), dtype=np.float64)
    return float((q[0].sum() + c[1].sum() - 2 * s[1].sum() + q[1].sum()) / c.sum())


@dataclass(frozen=True)
class CalibrationSlope:
    intercept: float
    slope: float
    iterations: int


def combine_calibration_slope(parts: list[np.ndarray], edges: np.ndarray,
                              tol: float = 1e-12, max_iter: int = 100) -> CalibrationSlope:
    """Logistic recalibration y ~ a + b·logit(p), fitted by Newton on the pooled histogram.

    Every patient of a bin has the score of the bin centre, so the likelihood is a binomial
    one per bin (n1[b] events out of n0[b] + n1[b]) at x_b = logit(centre_b): exact for
    scores on the grid. For raw scores it is the fit of the snapped scores (the exact one
    needs a federated Newton round per iteration, as in `shared.logistic`).
    """
    counts = np.asarray(combine_sum(parts), dtype=np.float64)
    _check_both_labels(counts)
    centres = (edges[:-1] + edges[1:]) / 2
    x = np.log(centres) - np.log1p(-centres)
    events, trials = counts[1], counts.sum(axis=0)
    keep = trials > 0
    design = np.column_stack([np.ones(keep.sum()), x[keep]])
    events, trials = events[keep], trials[keep]
    beta = np.zeros(2)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        p = 1 / (1 + np.exp(-(design @ beta)))
        gradient = design.T @ (events - trials * p)
        hessian = (design * (trials * p * (1 - p))[:, None]).T @ design
        step = np.linalg.solve(hessian, gradient)
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            break
    return CalibrationSlope(float(beta[0]), float(beta[1]), iterations)


# --------------------------------------------------------------------------- helpers


def snap(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Scores replaced by the centre of their grid bin (what the histograms know of them)."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), edges[0], edges[-1])
    centres = (edges[:-1] + edges[1:]) / 2
    return centres[bin_index(scores, edges)]


def bin_index(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Grid bin of each score (half-open bins, last one closed; clipped to the grid)."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), edges[0], edges[-1])
    return np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)


def _check_both_labels(counts: np.ndarray) -> None:
    totals = np.asarray(counts).reshape(GROUPS, -1).sum(axis=1)
    if np.any(totals == 0):
        raise ValueError("both labels must be present")
