"""Federated validation statistics against pooled references on the Wisconsin breast-cancer set.

Two logistic models on different feature subsets give two real score vectors, snapped to the
centres of a 200-bin grid (so the histograms lose nothing), split into 3 non-IID sites. Each
federated statistic, combined from the sites' counts, must equal the library or direct
computation on the pooled snapped scores.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.preprocessing import StandardScaler

from shared import roc
from shared import validation as val
from tests.splits import non_iid_split, wisconsin

BINS = 200
EDGES = roc.grid(BINS)
MODEL1 = ["mean texture", "mean smoothness"]
MODEL2 = ["mean symmetry", "texture error", "mean fractal dimension"]


@pytest.fixture(scope="module")
def sites() -> list[dict[str, np.ndarray]]:
    frame = wisconsin()
    for name, cols in (("s1", MODEL1), ("s2", MODEL2)):
        x = StandardScaler().fit_transform(frame[cols])
        raw = LogisticRegression().fit(x, frame.label).predict_proba(x)[:, 1]
        frame[name] = val.snap(raw, EDGES)
    parts = non_iid_split(frame, by="mean area", n_sites=3, seed=3)
    return [{"s1": p.s1.to_numpy(), "s2": p.s2.to_numpy(), "y": p.label.to_numpy()}
            for p in parts]


@pytest.fixture(scope="module")
def pooled(sites: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([s[k] for s in sites]) for k in ("s1", "s2", "y")}


def hists(sites: list[dict[str, np.ndarray]], key: str = "s1") -> list[np.ndarray]:
    return [val.local_histogram(s[key], s["y"], EDGES) for s in sites]


# ----------------------------------------------------------------- direct DeLong (reference)


def direct_placements(score: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    pos, neg = score[y == 1], score[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return float(psi.mean()), psi.mean(axis=1), psi.mean(axis=0)


def direct_delong(scores: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fits = [direct_placements(s, y) for s in scores]
    aucs = np.array([f[0] for f in fits])
    v10 = np.array([f[1] for f in fits])
    v01 = np.array([f[2] for f in fits])
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    return aucs, np.atleast_2d(cov)


# ----------------------------------------------------------------- tests


def test_scores_are_on_the_grid_with_ties(pooled: dict[str, np.ndarray]) -> None:
    for key in ("s1", "s2"):
        assert np.array_equal(val.snap(pooled[key], EDGES), pooled[key])
        assert len(np.unique(pooled[key])) < len(pooled[key])  # ties are exercised
    assert pooled["y"].sum() == 212 and len(pooled["y"]) == 569


def test_auc_equals_roc_auc_score(sites, pooled) -> None:
    for key in ("s1", "s2"):
        truth = roc_auc_score(pooled["y"], pooled[key])
        assert val.combine_auc(hists(sites, key)) == pytest.approx(truth, abs=1e-9)


def test_delong_variance_and_ci_equal_direct(sites, pooled) -> None:
    for key in ("s1", "s2"):
        aucs, cov = direct_delong([pooled[key]], pooled["y"])
        result = val.combine_delong(hists(sites, key))
        se = np.sqrt(cov[0, 0])
        z = stats.norm.ppf(0.975)
        assert result.auc == pytest.approx(aucs[0], abs=1e-9)
        assert result.variance == pytest.approx(cov[0, 0], abs=1e-9, rel=1e-9)
        assert result.se == pytest.approx(se, abs=1e-9)
        assert result.lower == pytest.approx(max(0.0, aucs[0] - z * se), abs=1e-9)
        assert result.upper == pytest.approx(min(1.0, aucs[0] + z * se), abs=1e-9)
        assert result.n == (357, 212)


def paired(sites: list[dict[str, np.ndarray]], keys: tuple[str, ...]) -> tuple:
    """Both rounds of the paired test: pooled histograms → deviations → site moments."""
    counts = [val.combine_sum(hists(sites, k)) for k in keys]
    dev = [val.placement_deviations(c) for c in counts]
    d10 = np.stack([d[1] for d in dev])
    d01 = np.stack([d[2] for d in dev])
    moments = [val.local_placement_moments(
        np.stack([val.bin_index(s[k], EDGES) for k in keys]), s["y"], d10, d01) for s in sites]
    return val.combine_delong_covariance(counts, moments)


def test_paired_delong_equals_direct(sites, pooled) -> None:
    aucs, cov = direct_delong([pooled["s1"], pooled["s2"]], pooled["y"])
    delta = aucs[0] - aucs[1]
    z = delta / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    p = 2 * stats.norm.sf(abs(z))
    fed_aucs, fed_cov = paired(sites, ("s1", "s2"))
    result = val.paired_delong(fed_aucs, fed_cov)
    assert result.auc1 == pytest.approx(aucs[0], abs=1e-9)
    assert result.auc2 == pytest.approx(aucs[1], abs=1e-9)
    assert result.delta == pytest.approx(delta, abs=1e-9)
    np.testing.assert_allclose(result.covariance, cov, atol=1e-9, rtol=1e-9)
    assert result.z == pytest.approx(z, abs=1e-9)
    assert result.p == pytest.approx(p, abs=1e-9)
    # the covariance's diagonal is the single-model DeLong variance
    for k, key in enumerate(("s1", "s2")):
        assert fed_cov[k, k] == pytest.approx(val.combine_delong(hists(sites, key)).variance,
                                              rel=1e-12)


def test_paired_delong_of_a_model_with_itself_is_null(sites) -> None:
    aucs, cov = paired(sites, ("s1", "s1"))
    result = val.paired_delong(aucs, cov)
    assert result.delta == 0 and result.z == 0 and result.p == 1


def test_expand_is_exact_uncoarsened_and_keeps_totals_when_coarsened(sites) -> None:
    for label in (0, 1):
        raw = [h[label] for h in hists(sites)]
        cells = [roc.coarsen(c, 1) for c in raw]
        counts, exact = roc.expand(cells, BINS)
        assert exact and np.array_equal(counts, np.sum(raw, axis=0))
        counts, exact = roc.expand([roc.coarsen(c, 5) for c in raw], BINS)
        assert not exact and counts.sum() == pytest.approx(np.sum(raw))


def test_youden_is_the_best_cut_lowest_on_ties(sites, pooled) -> None:
    for key in ("s1", "s2"):
        score, y = pooled[key], pooled["y"]
        cut = val.combine_youden(hists(sites, key), EDGES)
        js = []
        for t in EDGES:
            (tn, fp), (fn, tp) = confusion_matrix(y, (score >= t).astype(int), labels=[0, 1])
            js.append(tp / (tp + fn) - fp / (fp + tn))
        js = np.array(js)
        assert cut.threshold == EDGES[int(np.argmax(js))]  # first maximum = lowest edge
        assert cut.j == pytest.approx(js.max(), abs=1e-12)
        fpr, tpr, _ = roc_curve(y, score)
        assert cut.j == pytest.approx(np.max(tpr - fpr), abs=1e-12)  # same optimum as sklearn
        assert cut.sensitivity - (1 - cut.specificity) == pytest.approx(cut.j, abs=1e-12)


def test_confusion_metrics_equal_sklearn(sites, pooled) -> None:
    for key in ("s1", "s2"):
        score, y = pooled[key], pooled["y"]
        threshold = val.combine_youden(hists(sites, key), EDGES).threshold
        pred = (score >= threshold).astype(int)
        reference = confusion_matrix(y, pred, labels=[0, 1])
        federated = val.combine_confusion(hists(sites, key), EDGES, threshold)
        local = val.combine_sum([val.local_confusion(s[key], s["y"], threshold) for s in sites])
        assert np.array_equal(federated, reference) and np.array_equal(local, reference)
        (tn, fp), (fn, tp) = reference
        d = val.diagnostics(federated)
        assert d.accuracy.value == (tp + tn) / (tp + tn + fp + fn)
        assert d.sensitivity.value == tp / (tp + fn)
        assert d.specificity.value == tn / (tn + fp)
        assert d.ppv.value == tp / (tp + fp)
        assert d.npv.value == tn / (tn + fn)
        assert d.f1.value == 2 * tp / (2 * tp + fp + fn)
        assert d.sensitivity.value == pytest.approx(recall_score(y, pred), abs=1e-15)
        assert d.ppv.value == pytest.approx(precision_score(y, pred), abs=1e-15)
        assert d.f1.value == pytest.approx(f1_score(y, pred), abs=1e-15)
        for rate in (d.accuracy, d.sensitivity, d.specificity, d.ppv, d.npv):
            lower, upper = wilson_roots(rate.successes, rate.trials)
            assert rate.lower == pytest.approx(lower, abs=1e-12)
            assert rate.upper == pytest.approx(upper, abs=1e-12)


def wilson_roots(x: int, n: int) -> tuple[float, float]:
    """Wilson interval as the roots in p of (p̂ − p)² = z²·p(1 − p)/n."""
    z2 = stats.norm.ppf(0.975) ** 2
    phat = x / n
    a, b, c = 1 + z2 / n, -(2 * phat + z2 / n), phat ** 2
    disc = np.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


def test_wilson_edge_cases() -> None:
    for x, n in [(0, 10), (10, 10), (1, 3), (7, 19)]:
        rate = val.wilson(x, n)
        lower, upper = wilson_roots(x, n)
        assert rate.lower == pytest.approx(max(lower, 0.0), abs=1e-12)
        assert rate.upper == pytest.approx(min(upper, 1.0), abs=1e-12)
    assert np.isnan(val.wilson(0, 0).value)


def test_combine_confusion_refuses_an_off_grid_threshold(sites) -> None:
    with pytest.raises(ValueError, match="not an edge"):
        val.combine_confusion(hists(sites), EDGES, 0.1234)


@pytest.mark.parametrize("n_bins", [5, 10, 20, 40])
def test_calibration_curve_and_brier_equal_sklearn(sites, pooled, n_bins: int) -> None:
    for key in ("s1", "s2"):
        score, y = pooled[key], pooled["y"]
        sums = [val.local_score_sums(s[key], s["y"], EDGES) for s in sites]
        curve = val.combine_calibration(hists(sites, key), [s for s, _ in sums], EDGES, n_bins)
        prob_true, prob_pred = calibration_curve(y, score, n_bins=n_bins, strategy="uniform")
        np.testing.assert_allclose(curve.prob_true, prob_true, rtol=0, atol=1e-12)
        np.testing.assert_allclose(curve.prob_pred, prob_pred, rtol=0, atol=1e-12)
        assert curve.count.sum() == len(y)
        brier = val.combine_brier(hists(sites, key), [s for s, _ in sums], [q for _, q in sums])
        assert brier == pytest.approx(brier_score_loss(y, score), abs=1e-12)


def test_calibration_bins_must_be_unions_of_grid_bins(sites) -> None:
    sums = [val.local_score_sums(s["s1"], s["y"], EDGES)[0] for s in sites]
    with pytest.raises(ValueError, match="unions"):
        val.combine_calibration(hists(sites), sums, EDGES, n_bins=7)


def test_brier_is_exact_for_raw_scores() -> None:
    rng = np.random.default_rng(0)
    score, y = rng.uniform(size=300), rng.integers(0, 2, size=300)
    parts = np.array_split(np.arange(300), 3)
    counts = [val.local_histogram(score[i], y[i], EDGES) for i in parts]
    sums = [val.local_score_sums(score[i], y[i], EDGES) for i in parts]
    brier = val.combine_brier(counts, [s for s, _ in sums], [q for _, q in sums])
    assert brier == pytest.approx(brier_score_loss(y, score), abs=1e-12)


def test_calibration_slope_equals_unpenalised_logistic_regression(sites, pooled) -> None:
    # C=inf is sklearn 1.8+'s spelling of penalty=None (deprecated there)
    for key in ("s1", "s2"):
        score, y = pooled[key], pooled["y"]
        logit = np.log(score / (1 - score))
        reference = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12,
                                       max_iter=1000).fit(logit[:, None], y)
        fit = val.combine_calibration_slope(hists(sites, key), EDGES)
        assert fit.intercept == pytest.approx(reference.intercept_[0], abs=1e-6)
        assert fit.slope == pytest.approx(reference.coef_[0, 0], abs=1e-6)
        # in-sample recalibration of a logistic model's own scores: slope ≈ 1, intercept ≈ 0
        assert abs(fit.slope - 1) < 0.1 and abs(fit.intercept) < 0.1


def test_f1_interval_is_the_multinomial_delta_method_and_covers() -> None:
    """F1's interval against (1) the delta method computed numerically (gradient of F1 by
    finite differences, multinomial covariance of the four cells) and (2) its coverage of
    the true F1 over 20,000 simulated confusion matrices (n = 400)."""
    from shared.validation import f1_interval

    def f1_of(p: np.ndarray) -> float:
        return 2 * p[3] / (2 * p[3] + p[1] + p[2])

    counts = np.array([150, 30, 25, 95])  # TN, FP, FN, TP
    n, p = counts.sum(), counts / counts.sum()
    grad = np.array([(f1_of(p + h) - f1_of(p - h)) / 2e-7 for h in np.eye(4) * 1e-7])
    covariance = (np.diag(p) - np.outer(p, p)) / n
    se = float(np.sqrt(grad @ covariance @ grad))
    rate = f1_interval(tp=95, fp=30, fn=25)
    assert rate.value == pytest.approx(f1_of(p), abs=1e-15)
    assert rate.upper - rate.value == pytest.approx(1.959963985 * se, rel=1e-6)
    assert rate.value - rate.lower == pytest.approx(1.959963985 * se, rel=1e-6)

    rng = np.random.default_rng(0)
    truth = f1_of(p)
    draws = rng.multinomial(400, p, size=20_000)
    covered = [(r.lower <= truth <= r.upper) for r in
               (f1_interval(int(d[3]), int(d[1]), int(d[2])) for d in draws)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.01)
    # why it was replaced: Wilson on 2TP of 2TP + FP + FN under-covers (about 0.92 here)
    old = [val.wilson(int(2 * d[3]), int(2 * d[3] + d[1] + d[2])) for d in draws[:5000]]
    assert np.mean([r.lower <= truth <= r.upper for r in old]) < 0.935
