"""Federated radiomics statistics against pooled scikit-learn (real data, non-IID sites).

Wisconsin breast-cancer features (image-derived) are split into unequal sites by tumour
area; every federated statistic is driven round by round through `run_rounds` (the
in-process harness) and compared with scikit-learn, or a textbook formula, on the pooled rows.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.feature_selection import SelectPercentile, chi2
from sklearn.linear_model import Lasso, LogisticRegression
from sklearn.metrics import log_loss, mutual_info_score
from sklearn.preprocessing import StandardScaler

from shared import folds, glm, icc, lasso, logistic, quadratic, screening, standardize
from shared.federated import Refused, SiteFn, hessian_allowed, run_rounds, sum_replies
from tests.splits import non_iid_split, wisconsin

RATIO = 0.33  # site.yaml default max_feature_ratio


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return wisconsin()


@pytest.fixture(scope="module")
def features(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c != "label"]


@pytest.fixture(scope="module")
def sites(frame: pd.DataFrame) -> list[pd.DataFrame]:
    parts = non_iid_split(frame, by="mean area", n_sites=4, seed=1)
    assert len({round(s["label"].mean(), 2) for s in parts}) == 4  # the sites really differ
    return parts


@pytest.fixture(scope="module")
def scaling(sites: list[pd.DataFrame], features: list[str]) -> standardize.Scaling:
    fns = [partial(standardize.site_reply, s[features].to_numpy(float)) for s in sites]
    solver = run_rounds(standardize.Standardize(), fns)
    assert solver.rounds == 2
    return solver.result


@pytest.fixture(scope="module")
def site_z(sites: list[pd.DataFrame], features: list[str],
           scaling: standardize.Scaling) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each site's z-scores on the federated pooled scaling, and its labels."""
    return [(scaling.transform(s[features].to_numpy(float)), s["label"].to_numpy())
            for s in sites]


@pytest.fixture(scope="module")
def pooled_z(sites: list[pd.DataFrame], features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The pooled rows in site order, standardized by scikit-learn, and their labels."""
    pooled = pd.concat(sites, ignore_index=True)
    return StandardScaler().fit_transform(pooled[features]), pooled["label"].to_numpy()


def glm_sites(parts: list[tuple[np.ndarray, np.ndarray]],
              ratio: float | None = None) -> list[SiteFn]:
    return [partial(glm.local_terms, x, y, max_feature_ratio=ratio) for x, y in parts]


def fit(solver: glm.Newton, parts: list[tuple[np.ndarray, np.ndarray]],
        ratio: float | None = None) -> glm.Fit:
    result = run_rounds(solver, glm_sites(parts, ratio)).fit
    assert result.converged
    return result


# --- standardization --------------------------------------------------------------------

def test_standardization_matches_standard_scaler(frame: pd.DataFrame, features: list[str],
                                                 scaling: standardize.Scaling,
                                                 site_z: list, pooled_z: tuple) -> None:
    ref = StandardScaler().fit(frame[features])
    np.testing.assert_allclose(scaling.mean, ref.mean_, rtol=1e-9)
    np.testing.assert_allclose(scaling.var, ref.var_, rtol=1e-9)
    np.testing.assert_allclose(scaling.scale, ref.scale_, rtol=1e-9)
    assert scaling.keep.all() and not scaling.dropped
    np.testing.assert_allclose(np.vstack([z for z, _ in site_z]), pooled_z[0], atol=1e-9)


def test_constant_and_missing_features(sites: list[pd.DataFrame], features: list[str]) -> None:
    parts = [s[features[:5]].copy() for s in sites]
    for part in parts:
        part["constant"] = 7.25
        part.iloc[::5, 1] = np.nan
    fns = [partial(standardize.site_reply, p.to_numpy(float)) for p in parts]
    scaling = run_rounds(standardize.Standardize(), fns).result
    pooled = pd.concat(parts, ignore_index=True)
    ref = StandardScaler().fit(pooled)
    np.testing.assert_allclose(scaling.mean, ref.mean_, rtol=1e-9)
    np.testing.assert_allclose(scaling.scale, ref.scale_, rtol=1e-9)
    np.testing.assert_array_equal(scaling.n, pooled.notna().sum().to_numpy())
    assert scaling.keep.tolist() == [True] * 5 + [False]
    assert "constant" in scaling.dropped[5]
    assert scaling.transform(pooled.to_numpy(float)).shape == (len(pooled), 5)


# --- ICC(2,1) ---------------------------------------------------------------------------

def textbook_icc(long: pd.DataFrame) -> float:
    """ICC(2,1) from the two-way ANOVA of a long table (patient, reader, value)."""
    n, k = long["patient"].nunique(), long["reader"].nunique()
    grand = long["value"].mean()
    ss_rows = k * ((long.groupby("patient")["value"].mean() - grand) ** 2).sum()
    ss_cols = n * ((long.groupby("reader")["value"].mean() - grand) ** 2).sum()
    ss_error = ((long["value"] - grand) ** 2).sum() - ss_rows - ss_cols
    msr, msc, mse = ss_rows / (n - 1), ss_cols / (k - 1), ss_error / ((n - 1) * (k - 1))
    return (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)


def two_readers(frame: pd.DataFrame, features: list[str], seed: int = 5) -> np.ndarray:
    """Reader 2 = reader 1 + noise and a bias, both scaled to each feature's sd; the noise
    level varies by feature so the ICCs fall on both sides of 0.75."""
    rng = np.random.default_rng(seed)
    first = frame[features].to_numpy(float)
    sd = first.std(axis=0)
    noise = np.linspace(0.05, 1.5, len(features))
    second = first + sd * (noise * rng.normal(size=first.shape) + 0.2 * rng.normal(size=sd.shape))
    second[rng.random(first.shape) < 0.03] = np.nan  # a reader-2 value missing now and then
    return np.stack([first, second])


def federated_icc(readers: np.ndarray, sizes: list[int]) -> icc.MeanSquares:
    cuts = np.cumsum(sizes)[:-1]
    fns = [partial(icc.site_reply, part) for part in np.split(readers, cuts, axis=1)]
    solver = run_rounds(icc.ICC(), fns)
    assert solver.rounds == 2
    return solver.result


def test_icc_matches_textbook_anova(frame: pd.DataFrame, features: list[str],
                                    sites: list[pd.DataFrame]) -> None:
    ordered = pd.concat(sites, ignore_index=True)
    readers = two_readers(ordered, features)
    result = federated_icc(readers, [len(s) for s in sites])
    expected = []
    for j, name in enumerate(features):
        long = pd.DataFrame({
            "patient": np.tile(np.arange(len(ordered)), 2),
            "reader": np.repeat([1, 2], len(ordered)),
            "value": readers[:, :, j].ravel(),
        })
        complete = long.groupby("patient")["value"].transform("count") == 2
        expected.append(textbook_icc(long[complete]))
        assert result.n[j] == complete.sum() // 2, name
    np.testing.assert_allclose(result.icc, expected, rtol=1e-9)
    kept = icc.icc_filter(result.icc, 0.75)
    assert 0 < kept.keep.sum() < len(features)  # the filter bites on both sides
    assert all(("<= 0.75" in kept.dropped[j]) == (result.icc[j] <= 0.75)
               for j in np.flatnonzero(~kept.keep))


def test_icc_shrout_fleiss_example() -> None:
    """Shrout & Fleiss (1979), Table 2: 6 targets × 4 judges, ICC(2,1) = 0.29."""
    ratings = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8],
                        [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float)
    readers = ratings.T[:, :, None]  # (judges, targets, 1 feature)
    result = federated_icc(readers, [2, 4])
    assert result.icc[0] == pytest.approx(0.2898, abs=5e-5)
    assert icc.icc_filter(result.icc).dropped == {0: "ICC 0.290 <= 0.75"}


# --- logistic regression ----------------------------------------------------------------

@pytest.mark.parametrize("C", [0.1, 0.5])
def test_l2_logistic_matches_lbfgs(C: float, site_z: list, pooled_z: tuple) -> None:
    ours = fit(logistic.solver(C, "l2", 30), site_z)
    ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-12, max_iter=100_000).fit(*pooled_z)
    np.testing.assert_allclose(ours.coef, ref.coef_[0], atol=1e-6)
    assert ours.intercept == pytest.approx(ref.intercept_[0], abs=1e-6)
    assert ours.rounds <= 12


def test_l2_logistic_to_newton_cholesky_precision(site_z: list, pooled_z: tuple) -> None:
    """lbfgs stops near 1e-6 at larger C (its ftol); scikit-learn's own Newton solver gets
    the optimum to rounding, and so do we."""
    ours = fit(logistic.solver(1.0, "l2", 30), site_z)
    ref = LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-12,
                             max_iter=1000).fit(*pooled_z)
    np.testing.assert_allclose(ours.coef, ref.coef_[0], atol=1e-9)
    assert ours.intercept == pytest.approx(ref.intercept_[0], abs=1e-9)


def l1_objective(z: np.ndarray, y: np.ndarray, C: float, intercept: float,
                 coef: np.ndarray) -> float:
    proba = expit(intercept + z @ coef)
    return C * log_loss(y, proba, normalize=False) + np.abs(coef).sum()


def l1_kkt_violation(z: np.ndarray, y: np.ndarray, C: float, intercept: float,
                     coef: np.ndarray) -> float:
    """Optimality of C·Σlogloss + ‖w‖₁: intercept gradient 0, g_j = −sign(w_j) on the
    support, |g_j| <= 1 off it."""
    residual = expit(intercept + z @ coef) - y
    gradient = C * (z.T @ residual)
    on = coef != 0
    off_violation = np.maximum(np.abs(gradient[~on]) - 1.0, 0.0)
    return max(abs(C * residual.sum()), *np.abs(gradient[on] + np.sign(coef[on])),
               *off_violation)


@pytest.fixture(scope="module", params=[0.1, 0.2])
def l1_reference(request: pytest.FixtureRequest, pooled_z: tuple) -> LogisticRegression:
    return LogisticRegression(C=request.param, l1_ratio=1.0, solver="saga", tol=1e-12,
                              max_iter=1_000_000).fit(*pooled_z)


def test_l1_logistic_matches_saga(l1_reference: LogisticRegression, site_z: list,
                                  pooled_z: tuple) -> None:
    C = l1_reference.C
    ours = fit(logistic.solver(C, "l1", 30), site_z)
    np.testing.assert_allclose(ours.coef, l1_reference.coef_[0], atol=1e-6)
    assert ours.intercept == pytest.approx(l1_reference.intercept_[0], abs=1e-6)
    np.testing.assert_array_equal(ours.coef != 0, l1_reference.coef_[0] != 0)
    assert 0 < (ours.coef != 0).sum() < 30
    assert l1_kkt_violation(*pooled_z, C, ours.intercept, ours.coef) < 1e-8
    saga = l1_objective(*pooled_z, C, l1_reference.intercept_[0], l1_reference.coef_[0])
    assert l1_objective(*pooled_z, C, ours.intercept, ours.coef) <= saga + 1e-9
    assert ours.rounds <= 12


def with_tiny_site(parts: list[tuple[np.ndarray, np.ndarray]],
                   size: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same patients with `size` of the first site's moved into a site of their own."""
    (x, y), rest = parts[0], parts[1:]
    return [(x[:size], y[:size]), (x[size:], y[size:]), *rest]


def test_tiny_site_refuses_hessian(site_z: list) -> None:
    parts = with_tiny_site(site_z)
    assert not hessian_allowed(30, len(parts[0][1]), RATIO)
    with pytest.raises(Refused, match="max_feature_ratio"):
        run_rounds(logistic.solver(0.1, "l1", 30), glm_sites(parts, RATIO))


@pytest.mark.parametrize("C", [0.1, 1.0])
def test_l1_gradient_fallback_reaches_newton_optimum(C: float, site_z: list,
                                                     pooled_z: tuple) -> None:
    parts = with_tiny_site(site_z)
    hessian = all(hessian_allowed(30, len(y), RATIO) for _, y in parts)
    assert not hessian  # the tiny site's policy forces gradient-only rounds
    newton = fit(logistic.solver(C, "l1", 30), parts)  # what lenient sites would allow
    fallback = fit(logistic.solver(C, "l1", 30, hessian=hessian), parts, RATIO)
    assert fallback.mode == "gradient"
    np.testing.assert_allclose(fallback.coef, newton.coef, atol=1e-6)
    assert fallback.intercept == pytest.approx(newton.intercept, abs=1e-6)
    assert l1_kkt_violation(*pooled_z, C, fallback.intercept, fallback.coef) < 1e-6
    assert fallback.rounds <= 300


@pytest.mark.parametrize("C", [0.1, 1.0])
def test_probe_points_reach_the_optimum_in_half_the_rounds(C: float, site_z: list,
                                                          pooled_z: tuple) -> None:
    """Gradient-only rounds with probe points per query (glm.PROBES): the optimum of Newton
    rounds (and scikit-learn's), in at most half the rounds of one point per query."""
    parts = with_tiny_site(site_z)
    newton = fit(logistic.solver(C, "l1", 30), parts)
    plain = fit(logistic.solver(C, "l1", 30, hessian=False), parts, RATIO)
    probing = fit(logistic.solver(C, "l1", 30, hessian=False, probes=glm.PROBES), parts, RATIO)
    np.testing.assert_allclose(probing.coef, newton.coef, atol=1e-6)
    assert probing.intercept == pytest.approx(newton.intercept, abs=1e-6)
    assert l1_kkt_violation(*pooled_z, C, probing.intercept, probing.coef) < 1e-6
    assert probing.rounds <= plain.rounds / 2, (probing.rounds, plain.rounds)


def test_a_site_bounds_the_points_of_one_query(site_z: list) -> None:
    parts = with_tiny_site(site_z, size=20)  # max(2, ⌊0.33 × 20⌋) = 6 points per query
    assert glm.max_points(20, RATIO) == 6 < glm.PROBES + 1
    solver = logistic.solver(0.1, "l1", 30, hessian=False, probes=glm.PROBES)
    with pytest.raises(Refused, match=f"{glm.PROBES + 1} points in one query refused: more than 6"):
        run_rounds(solver, glm_sites(parts, RATIO))
    fit(logistic.solver(0.1, "l1", 30, hessian=False, probes=5), parts, RATIO)  # 6 points


def test_l1_fista_reaches_newton_optimum(site_z: list) -> None:
    parts = with_tiny_site(site_z)
    newton = fit(logistic.solver(0.1, "l1", 30), parts)
    fista = fit(glm.ProximalGradient(logistic.objective(0.1, "l1"), 30), parts, RATIO)
    np.testing.assert_allclose(fista.coef, newton.coef, atol=1e-6)
    assert fista.intercept == pytest.approx(newton.intercept, abs=1e-6)


def test_l2_gradient_fallback(site_z: list, pooled_z: tuple) -> None:
    parts = with_tiny_site(site_z)
    ours = fit(logistic.solver(0.5, "l2", 30, hessian=False), parts, RATIO)
    ref = LogisticRegression(C=0.5, solver="newton-cholesky", tol=1e-12).fit(*pooled_z)
    np.testing.assert_allclose(ours.coef, ref.coef_[0], atol=1e-6)


# --- squared-loss Lasso -----------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.005, 0.02])
def test_squared_lasso_matches_sklearn_in_one_round(alpha: float, site_z: list,
                                                    pooled_z: tuple) -> None:
    ours = fit(lasso.solver(alpha, 30), site_z)
    ref = Lasso(alpha=alpha, tol=1e-12, max_iter=1_000_000).fit(*pooled_z)
    assert ours.rounds == 1
    np.testing.assert_allclose(ours.coef, ref.coef_, atol=1e-6)
    assert ours.intercept == pytest.approx(ref.intercept_, abs=1e-6)
    np.testing.assert_array_equal(lasso.selected(ours.coef), ref.coef_ != 0)
    assert 0 < lasso.selected(ours.coef).sum() < 30

    fallback = fit(lasso.solver(alpha, 30, hessian=False), with_tiny_site(site_z), RATIO)
    np.testing.assert_allclose(fallback.coef, ours.coef, atol=1e-6)


# --- the server's L1 quadratic ----------------------------------------------------------

@pytest.mark.parametrize("fallback", [False, True])
def test_l1_quadratic_meets_kkt(fallback: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature-sign search, and the coordinate-descent fallback used when it cannot finish,
    both reach the optimum; a duplicated column makes the Hessian singular."""
    if fallback:
        monkeypatch.setattr(quadratic, "_feature_sign", lambda *args, **kw: None)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 12))
    a = np.column_stack([a, a[:, 3]])
    h, b = a.T @ a, a.T @ (a[:, :4] @ [2.0, -1.0, 0.5, 0.0] + rng.normal(size=60))
    penalty = np.full(13, 8.0)
    penalty[0] = 0.0  # an unpenalized coordinate, like the intercept
    z = quadratic.l1_quadratic(h, b, penalty)
    assert quadratic.kkt_violation(h, b, penalty, z) < 1e-8
    assert 1 < np.count_nonzero(z) < 13


# --- screening --------------------------------------------------------------------------

def federated_chi2(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    reply = sum_replies([screening.local_class_sums(x, y) for x, y in parts])
    return screening.combine_chi2(reply["count"], reply["sum"])


def test_chi2_matches_sklearn_on_shared_unit_range(site_z: list, pooled_z: tuple) -> None:
    z, y = pooled_z
    with pytest.raises(ValueError):
        chi2(z, y)  # z-scores are negative: scikit-learn refuses them too
    statistic, p_value = federated_chi2([(screening.unit_range(x), yy) for x, yy in site_z])
    ref_statistic, ref_p = chi2(screening.unit_range(z), y)
    np.testing.assert_allclose(statistic, ref_statistic, rtol=1e-9)
    np.testing.assert_allclose(p_value, ref_p, rtol=1e-9, atol=1e-300)


def test_chi2_matches_sklearn_on_raw_nonnegative_features(sites: list[pd.DataFrame],
                                                          frame: pd.DataFrame,
                                                          features: list[str]) -> None:
    statistic, _ = federated_chi2([(s[features].to_numpy(float), s["label"].to_numpy())
                                   for s in sites])
    np.testing.assert_allclose(statistic, chi2(frame[features], frame["label"])[0], rtol=1e-9)
    with pytest.raises(ValueError, match="non-negative"):
        screening.local_class_sums(-np.ones((3, 2)), np.array([0, 1, 0]))


def test_binned_mutual_information_matches_sklearn(site_z: list, pooled_z: tuple) -> None:
    cuts = screening.grid()
    reply = sum_replies([screening.local_binned_counts(x, y, cuts) for x, y in site_z])
    ours = screening.mutual_information(reply["count"])
    z, y = pooled_z
    bins = np.digitize(z, cuts, right=True)  # independent binning of the pooled rows
    expected = [mutual_info_score(y, bins[:, j]) for j in range(z.shape[1])]
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-14)
    assert reply["count"].sum() == z.size


@pytest.mark.parametrize("percentile", [10, 25, 50, 90])
def test_select_percentile_ties_as_sklearn(percentile: float) -> None:
    scores = np.array([3.0, 1.0, 3.0, np.nan, 2.0, 3.0, 0.5, 2.0, 3.0, 1.0, 2.0, 0.1])
    x = np.zeros((4, len(scores)))
    selector = SelectPercentile(lambda *_: scores, percentile=percentile).fit(x, [0, 1, 0, 1])
    np.testing.assert_array_equal(screening.select_percentile(scores, percentile),
                                  selector.get_support())


# --- folds ------------------------------------------------------------------------------

def test_stratified_folds_per_site(sites: list[pd.DataFrame]) -> None:
    labels = [s["label"].to_numpy() for s in sites]
    assigned = [folds.stratified_folds(y, 10, seed=3, site_id=f"site-{i}")
                for i, y in enumerate(labels)]
    for y, f in zip(labels, assigned, strict=True):
        for label in (0, 1):
            counts = np.bincount(f[y == label], minlength=10)
            assert counts.max() - counts.min() <= 1
        overall = np.bincount(f, minlength=10)
        assert overall.max() - overall.min() <= 1
    pooled = pd.crosstab(np.concatenate(assigned), np.concatenate(labels))
    assert (pooled.max() - pooled.min()).max() <= len(sites)
    again = folds.stratified_folds(labels[0], 10, seed=3, site_id="site-0")
    np.testing.assert_array_equal(again, assigned[0])
    other = folds.stratified_folds(labels[0], 10, seed=4, site_id="site-0")
    assert not np.array_equal(other, assigned[0])


def test_sum_replies_needs_the_same_keys() -> None:
    with pytest.raises(ValueError, match="disagree"):
        sum_replies([{"a": np.ones(2)}, {"b": np.ones(2)}])
