"""Federated ComBat (`shared.combat`) against neuroCombat on the pooled rows, and the ANOVA
of site against scipy.

Wisconsin's 30 features split into 4 non-IID sites, each site's features then shifted and
scaled by its own "scanner" (a per-site, per-feature offset and gain), so that ComBat has
real site effects to remove. The federated halves see only each site's rows; neuroCombat
sees the pooled matrix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from scipy import stats

from shared import combat
from tests.splits import non_iid_split, wisconsin

FEATURES = [c for c in wisconsin().columns if c != "label"]


def scanner_sites(n_sites: int = 4, seed: int = 3) -> list[pd.DataFrame]:
    rng = np.random.default_rng(seed)
    parts = non_iid_split(wisconsin(), by="mean radius", n_sites=n_sites, seed=seed)
    out = []
    for part in parts:
        part = part.copy()
        x = part[FEATURES].to_numpy()
        gain = rng.uniform(0.6, 1.6, len(FEATURES))
        offset = rng.normal(0, 0.5, len(FEATURES)) * x.std(axis=0)
        part[FEATURES] = x * gain + offset
        part["age"] = rng.normal(55, 10, len(part)).round(1)
        out.append(part)
    return out


def federated(sites: list[pd.DataFrame], covariates: list[str], **options
              ) -> list[np.ndarray]:
    """The two pooled steps over the sites' sums, then each site's own adjustment."""
    k = len(sites)
    ys = [s[FEATURES].to_numpy() for s in sites]
    xs = [combat.design(len(s), i, k, s[covariates].to_numpy() if covariates else None)
          for i, s in enumerate(sites)]
    sums = [combat.local_design_sums(y, x) for y, x in zip(ys, xs, strict=True)]
    fit = combat.combine_fit(sum(s["xtx"] for s in sums), sum(s["xty"] for s in sums), k)
    ssr = sum(combat.local_residual_squares(y, x, fit) for y, x in zip(ys, xs, strict=True))
    fit = combat.ComBatFit(fit.beta, fit.grand_mean,
                           combat.combine_variance(ssr, sum(len(y) for y in ys)))
    return [combat.local_adjustment(y, x[:, k:], fit, **options)[0]
            for y, x in zip(ys, xs, strict=True)]


def pooled(sites: list[pd.DataFrame], covariates: list[str], **options) -> list[np.ndarray]:
    frame = pd.concat(sites, ignore_index=True)
    covars = pd.DataFrame({"batch": np.repeat(np.arange(len(sites)), [len(s) for s in sites])})
    for c in covariates:
        covars[c] = frame[c].to_numpy()
    data = neuroCombat(frame[FEATURES].to_numpy().T, covars, "batch",
                       continuous_cols=covariates, **options)["data"].T
    cuts = np.cumsum([len(s) for s in sites])[:-1]
    return np.split(data, cuts)


@pytest.mark.parametrize("options", [
    {"eb": True, "parametric": True},
    {"eb": False},
    {"eb": True, "parametric": False},
    {"eb": True, "parametric": True, "mean_only": True},
], ids=["eb-parametric", "no-eb", "eb-non-parametric", "mean-only"])
@pytest.mark.parametrize("covariates", [[], ["age"]], ids=["no-covariate", "age"])
def test_each_sites_harmonized_rows_equal_neurocombat_on_the_pooled_rows(
        options: dict, covariates: list[str]) -> None:
    sites = scanner_sites()
    ours = federated(sites, covariates, **options)
    theirs = pooled(sites, covariates, **options)
    for mine, ref in zip(ours, theirs, strict=True):
        scale = np.abs(ref).max(axis=0)
        np.testing.assert_allclose(mine / scale, ref / scale, rtol=0, atol=1e-6)
    # and the harmonization did something: site means moved
    before = [s[FEATURES].to_numpy().mean(axis=0) for s in sites]
    assert not np.allclose(ours[0].mean(axis=0), before[0])


def test_an_external_site_harmonizes_against_the_training_estimates() -> None:
    """The held-back site standardizes with the training sites' B̂ and σ̂², then estimates
    its own γ̂, δ̂² and EB posterior: the direct computation, written out here."""
    sites = scanner_sites(5)
    train, external = sites[:4], sites[4]
    k = len(train)
    ys = [s[FEATURES].to_numpy() for s in train]
    xs = [combat.design(len(s), i, k) for i, s in enumerate(train)]
    pooled_y, pooled_x = np.vstack(ys), np.vstack(xs)
    beta = np.linalg.lstsq(pooled_x, pooled_y, rcond=None)[0]
    counts = pooled_x.sum(axis=0)
    grand = counts @ beta / counts.sum()
    var = np.mean((pooled_y - pooled_x @ beta) ** 2, axis=0)
    fit = combat.ComBatFit(beta, grand, var)
    y = external[FEATURES].to_numpy()
    mine, est = combat.local_adjustment(y, np.zeros((len(y), 0)), fit)
    z = (y - grand) / np.sqrt(var)
    g_hat, d_hat = z.mean(axis=0), z.var(axis=0, ddof=1)
    # neuroCombat's own batch step on this site's standardized data alone
    from neuroCombat.neuroCombat import it_sol
    m, s2 = d_hat.mean(), d_hat.var(ddof=1)
    a, b = (2 * s2 + m ** 2) / s2, (m * s2 + m ** 3) / s2
    g_star, d_star = it_sol(z.T, g_hat, d_hat, g_hat.mean(), g_hat.var(ddof=1), a, b)
    direct = (z - g_star) / np.sqrt(d_star) * np.sqrt(var) + grand
    np.testing.assert_allclose(mine, direct, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(est.gamma_hat, g_hat, rtol=1e-12)
    # a training site's fit treats its own rows the same way
    assert est.a_prior == pytest.approx(a)


def test_the_anova_of_site_equals_scipy_f_oneway_on_the_pooled_rows() -> None:
    sites = scanner_sites()
    parts = [combat.local_site_moments(s[FEATURES].to_numpy()) for s in sites]
    result = combat.combine_site_anova(np.concatenate([p["n"] for p in parts]),
                                       np.stack([p["mean"] for p in parts]),
                                       np.stack([p["m2"] for p in parts]))
    ref = stats.f_oneway(*[s[FEATURES].to_numpy() for s in sites])
    np.testing.assert_allclose(result.f, ref.statistic, rtol=1e-9)
    np.testing.assert_allclose(result.p, ref.pvalue, rtol=1e-9, atol=1e-300)
    assert result.df_between == 3 and result.df_within == sum(len(s) for s in sites) - 4
    # harmonized rows: the site effect is gone (F ≈ 0 with eb=False: site means equal)
    harmonized = federated(sites, [], eb=False)
    parts = [combat.local_site_moments(h) for h in harmonized]
    after = combat.combine_site_anova(np.concatenate([p["n"] for p in parts]),
                                      np.stack([p["mean"] for p in parts]),
                                      np.stack([p["m2"] for p in parts]))
    assert np.sum(result.p < 0.05) > 20 and np.all(after.p > 0.99)
