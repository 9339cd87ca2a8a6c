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
a calibration bin whose edge falls inside a merged cell is not determined. The joint
(bins × bins) table of the paired test is by nature sparse (most cells hold 0 or 1
patients); under a min_cell_count guard it must be sent on a coarser grid, and the paired
test then holds for the scores snapped to that coarser grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from shared import roc

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
    index = _bin_index(scores, edges)
    y = np.asarray(y)
    bins = len(edges) - 1
    sums = np.stack([np.bincount(index[y == g], weights=scores[y == g], minlength=bins)
                     for g in range(GROUPS)])
    squares = np.stack([np.bincount(index[y == g], weights=scores[y == g] ** 2,
                                    minlength=bins) for g in range(GROUPS)])
    return sums, squares


def local_joint_histogram(scores1: np.ndarray, scores2: np.ndarray, y: np.ndarray,
                          edges1: np.ndarray, edges2: np.ndarray) -> np.ndarray:
    """(2 × bins1 × bins2) counts of patients per label and per pair of bins of two models.

    Needed by the paired DeLong test: the covariance of the two AUCs sums, over patients,
    the product of each patient's placement under model 1 and under model 2, which the
    per-model histograms (or per-bin placement sums) cannot give — it needs which bin of
    model 2 the patients of each bin of model 1 fall in. The marginals of this table are
    the two models' `local_histogram`s.

    Crosses the wire: a 3-D contingency table of counts; it is sparse, so under a
    min_cell_count guard send it on a coarser grid (module note).
    """
    i1 = _bin_index(np.clip(np.asarray(scores1, dtype=np.float64), edges1[0], edges1[-1]),
                    edges1)
    i2 = _bin_index(np.clip(np.asarray(scores2, dtype=np.float64), edges2[0], edges2[-1]),
                    edges2)
    y = np.asarray(y)
    b1, b2 = len(edges1) - 1, len(edges2) - 1
    table = np.zeros((GROUPS, b1, b2), dtype=np.int64)
    for g in range(GROUPS):
        np.add.at(table[g], (i1[y == g], i2[y == g]), 1)
    return table


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
    z = float(stats.norm.ppf((1 + level) / 2))
    return DeLongAUC(auc, variance, se, max(0.0, auc - z * se), min(1.0, auc + z * se),
                     (int(n0.sum()), int(n1.sum())))


@dataclass(frozen=True)
class PairedDeLong:
    auc1: float
    auc2: float
    delta: float  # auc1 − auc2
    covariance: np.ndarray  # 2 × 2 DeLong covariance of (auc1, auc2)
    z: float
    p: float  # two-sided


def combine_paired_delong(parts: list[np.ndarray]) -> PairedDeLong:
    """Paired DeLong test (pROC `roc.test(method="delong")`) from the summed joint tables.

    Per label g, the joint table T_g[b1, b2] gives the marginal histograms of each model
    (hence AUC_k and the placements V10_k, V01_k per bin) and the cross moments:
    S10[k, l] = D10_1ᵀ T_1 D10_2 / (n1 − 1), with D10_k = V10_k − AUC_k per bin, and S01
    likewise on T_0. Cov = S10/n1 + S01/n0; z = Δ / √(Var1 + Var2 − 2·Cov12).
    """
    table = np.asarray(combine_sum(parts), dtype=np.float64)
    margins = [np.stack([table[g].sum(axis=1) for g in range(GROUPS)]),
               np.stack([table[g].sum(axis=0) for g in range(GROUPS)])]
    for m in margins:
        _check_both_labels(m)
    fits = [_placements(m) for m in margins]
    aucs = np.array([f[0] for f in fits])
    d10 = [f[1] - f[0] for f in fits]
    d01 = [f[2] - f[0] for f in fits]
    n0, n1 = table[0].sum(), table[1].sum()
    s10 = np.empty((2, 2))
    s01 = np.empty((2, 2))
    for k in range(2):
        for j in range(2):
            # T_g indexed [bin of model 1, bin of model 2]; the same model on both sides uses
            # that model's margin on the diagonal
            s10[k, j] = _cross(table[1], d10[k], d10[j], k, j) / (n1 - 1)
            s01[k, j] = _cross(table[0], d01[k], d01[j], k, j) / (n0 - 1)
    cov = s10 / n1 + s01 / n0
    delta = float(aucs[0] - aucs[1])
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = delta / np.sqrt(var) if var > 0 else (0.0 if delta == 0 else np.copysign(np.inf, delta))
    p = float(2 * stats.norm.sf(abs(z)))
    return PairedDeLong(float(aucs[0]), float(aucs[1]), delta, cov, float(z), p)


def _cross(t: np.ndarray, a: np.ndarray, b: np.ndarray, k: int, j: int) -> float:
    """Σ over patients of a[bin under model k]·b[bin under model j], from one label's table."""
    if k == j:
        margin = t.sum(axis=1 - k)
        return float(np.dot(margin, a * b))
    left, right = (a, b) if k == 0 else (b, a)
    return float(left @ t @ right)


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
    n0, n1 = (np.asarray(c, dtype=np.int64) for c in counts)
    tp = np.concatenate([np.cumsum(n1[::-1])[::-1], [0]])  # positives with bin ≥ k
    fp = np.concatenate([np.cumsum(n0[::-1])[::-1], [0]])
    tpr = tp / n1.sum()
    fpr = fp / n0.sum()
    j = tpr - fpr
    k = int(np.argmax(j))  # first maximum = lowest threshold
    return YoudenCut(float(edges[k]), k, float(j[k]), float(tpr[k]), float(1 - fpr[k]))


def combine_confusion(parts: list[np.ndarray], edges: np.ndarray,
                      threshold: float) -> np.ndarray:
    """[[TN, FP], [FN, TP]] at score ≥ threshold, from cumulative histogram counts.

    The threshold must be a grid edge (the bin containing any other threshold would be
    split); for any other threshold, have the sites send `local_confusion`.
    """
    counts = np.asarray(combine_sum(parts), dtype=np.int64)
    k = int(np.searchsorted(edges, threshold))
    if k > len(edges) - 1 or not np.isclose(edges[k], threshold, rtol=0, atol=1e-12):
        raise ValueError(f"threshold {threshold!r} is not an edge of the grid")
    neg, pos = counts[0], counts[1]
    tn, fp = int(neg[:k].sum()), int(neg[k:].sum())
    fn, tp = int(pos[:k].sum()), int(pos[k:].sum())
    return np.array([[tn, fp], [fn, tp]], dtype=np.int64)


@dataclass(frozen=True)
class Rate:
    value: float  # successes / trials (nan when trials = 0)
    lower: float  # Wilson score interval
    upper: float
    successes: int
    trials: int


def wilson(successes: int, trials: int, level: float = 0.95) -> Rate:
    """Proportion with its Wilson score interval (statsmodels `proportion_confint`, wilson)."""
    if trials == 0:
        return Rate(np.nan, np.nan, np.nan, int(successes), 0)
    z = float(stats.norm.ppf((1 + level) / 2))
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * np.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    return Rate(p, float(max(0.0, centre - half)), float(min(1.0, centre + half)),
                int(successes), int(trials))


@dataclass(frozen=True)
class Diagnostics:
    confusion: np.ndarray  # [[TN, FP], [FN, TP]]
    accuracy: Rate
    sensitivity: Rate
    specificity: Rate
    ppv: Rate
    npv: Rate
    f1: Rate  # 2TP / (2TP + FP + FN); its Wilson CI treats it as that proportion


def diagnostics(confusion: np.ndarray, level: float = 0.95) -> Diagnostics:
    """ACC, SEN, SPE, PPV, NPV, F1 from a pooled confusion matrix, each with a Wilson CI."""
    (tn, fp), (fn, tp) = np.asarray(confusion, dtype=np.int64).tolist()
    return Diagnostics(
        np.asarray(confusion, dtype=np.int64),
        wilson(tp + tn, tp + tn + fp + fn, level),
        wilson(tp, tp + fn, level),
        wilson(tn, tn + fp, level),
        wilson(tp, tp + fp, level),
        wilson(tn, tn + fn, level),
        wilson(2 * tp, 2 * tp + fp + fn, level),
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

    Requirement: each calibration bin is a union of grid bins, i.e. the grid is uniform on
    [0, 1] and n_bins divides its number of bins (checked). Also, sklearn puts a score lying
    exactly on an interior calibration edge in the lower bin, the grid in the upper one;
    scores on the grid (bin centres) never lie on an edge. `sums` are the sites' Σscore
    from `local_score_sums`, so the mean prediction is exact even for raw scores.
    """
    bins = len(edges) - 1
    if bins % n_bins or not np.allclose(edges, roc.grid(bins), rtol=0, atol=1e-12):
        raise ValueError(f"{n_bins} calibration bins are not unions of the {bins}-bin grid")
    c = np.asarray(combine_sum(counts), dtype=np.float64).reshape(GROUPS, n_bins, -1).sum(2)
    s = np.asarray(combine_sum(sums), dtype=np.float64).reshape(GROUPS, n_bins, -1).sum(2)
    total = c.sum(axis=0)
    keep = total > 0
    return Calibration(c[1][keep] / total[keep], s.sum(axis=0)[keep] / total[keep],
                       total[keep].astype(np.int64), np.linspace(0.0, 1.0, n_bins + 1))


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
    return centres[_bin_index(scores, edges)]


def _bin_index(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)


def _check_both_labels(counts: np.ndarray) -> None:
    totals = np.asarray(counts).reshape(GROUPS, -1).sum(axis=1)
    if np.any(totals == 0):
        raise ValueError("both labels must be present")
