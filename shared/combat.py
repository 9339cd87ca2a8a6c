"""Federated ComBat harmonization (Johnson, Li & Rabinovic 2007, as neuroCombat 0.2.12
computes it), and the one-way ANOVA of site that measures what it removes.

The model, per feature g and patient j of site (batch) i, with covariates x_j:

    y_ij = α_g + x_j'β_g + γ_ig + δ_ig ε_ij

Only two steps pool patients across sites, and both need only sums:
1. the least-squares fit of y on [site indicators, covariates]: B̂ = (Σ X'X)⁻¹ Σ X'y, whence
   the grand mean α̂ = Σ_i (n_i / n) B̂_i (`local_design_sums` → `combine_fit`);
2. the pooled variance σ̂² = Σ (y − X B̂)² / n (`local_residual_squares` →
   `combine_variance`).
Everything else neuroCombat does is per batch, so it stays at the site: the standardized
data z = (y − α̂ − x'β̂) / σ̂, the site's own γ̂_i (mean of z) and δ̂²_i (variance of z), the
empirical-Bayes priors across features of the site's own γ̂/δ̂ (γ̄, τ², a, b), the
posterior γ*, δ* and the adjustment y* = σ̂ (z − γ*) / √δ* + α̂ + x'β̂
(`local_adjustment`). An external site harmonizes the same way against the training
sites' B̂ and σ̂²: its own location and scale under their model, estimated at the site.

These are written here by hand, not taken from neuroCombat, because neuroCombat needs the
pooled matrix; tests/test_combat.py checks each site's harmonized rows against
`neuroCombat(eb, parametric)` on the pooled rows.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

CONVERGENCE = 1e-4  # neuroCombat's it_sol `conv`: relative change of γ*, δ*


@dataclass(frozen=True)
class ComBatFit:
    """The pooled estimates a site needs to harmonize: `beta` ((batches + covariates) × p),
    `grand_mean` (p), `var_pooled` (p; None until step 2)."""

    beta: np.ndarray
    grand_mean: np.ndarray
    var_pooled: np.ndarray | None = None

    def covariate_effect(self, covariates: np.ndarray) -> np.ndarray:
        """x'β̂ for each row (n × p): the part of the mean ComBat keeps."""
        n_batch = self.beta.shape[0] - covariates.shape[1]
        return covariates @ self.beta[n_batch:]


def design(n: int, batch: int, n_batch: int, covariates: np.ndarray | None = None
           ) -> np.ndarray:
    """A site's rows of the pooled design: its own site indicator, then the covariates
    (continuous columns as they are, categorical ones one-hot without the first level)."""
    indicators = np.zeros((n, n_batch))
    indicators[:, batch] = 1.0
    extra = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, dtype=float)
    return np.hstack([indicators, extra.reshape(n, -1)])


def local_design_sums(y: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    """Site half of step 1. Crosses the wire: X'X (k × k: the site's patient count and its
    covariates' sums and cross-products) and X'y (k × p: the features' sums, and their sums
    weighted by each covariate). Aggregates over the site's patients, like the cohort
    stage's sums; never a row."""
    return {"xtx": x.T @ x, "xty": x.T @ y}


def combine_fit(xtx: np.ndarray, xty: np.ndarray, n_batch: int) -> ComBatFit:
    """Server half of step 1, from the sites' summed X'X and X'y: B̂ and the grand mean
    (the site effects weighted by the sites' patient counts, the diagonal of X'X)."""
    beta = np.linalg.solve(xtx, xty)
    counts = np.diag(xtx)[:n_batch]
    grand_mean = (counts / counts.sum()) @ beta[:n_batch]
    return ComBatFit(beta=beta, grand_mean=grand_mean)


def local_residual_squares(y: np.ndarray, x: np.ndarray, fit: ComBatFit) -> np.ndarray:
    """Site half of step 2. Crosses the wire: per feature the sum over the site's patients
    of the squared residual of the pooled fit: one number per feature."""
    return np.sum((y - x @ fit.beta) ** 2, axis=0)


def combine_variance(ssr: np.ndarray, n: int) -> np.ndarray:
    """Server half of step 2: σ̂² = Σ residual² / n. A feature with no residual variance
    gets 1, as in neuroCombat (whose median of a boolean mask is 1)."""
    var = np.asarray(ssr, dtype=float) / n
    return np.where(var == 0, 1.0, var)


@dataclass(frozen=True)
class SiteAdjustment:
    """What a site estimated of its own batch (it keeps all of it): γ̂, δ̂², the priors and
    the posterior γ*, δ*."""

    gamma_hat: np.ndarray
    delta_hat: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray
    gamma_bar: float
    t2: float
    a_prior: float | None
    b_prior: float | None


def local_adjustment(y: np.ndarray, covariates: np.ndarray, fit: ComBatFit, *,
                     eb: bool = True, parametric: bool = True, mean_only: bool = False,
                     ) -> tuple[np.ndarray, SiteAdjustment]:
    """The site's harmonized rows (n × p) and its batch estimates, under the pooled `fit`
    (with `var_pooled`). Sends nothing: the harmonized table stays at the site."""
    if fit.var_pooled is None:
        raise ValueError("the fit has no pooled variance yet (step 2)")
    if len(y) < 2:
        raise ValueError("ComBat needs at least two patients per site")
    mean = fit.grand_mean + fit.covariate_effect(covariates)
    sd = np.sqrt(fit.var_pooled)
    z = (y - mean) / sd
    est = _batch_estimates(z, eb=eb, parametric=parametric, mean_only=mean_only)
    adjusted = (z - est.gamma_star) / np.sqrt(est.delta_star) * sd + mean
    return adjusted, est


def _batch_estimates(z: np.ndarray, *, eb: bool, parametric: bool,
                     mean_only: bool) -> SiteAdjustment:
    """The site's γ̂, δ̂² per feature over its patients with a value (a missing value stays
    missing), and the priors over the features it has values of."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature no patient here has
        gamma_hat = np.nanmean(z, axis=0)
        delta_hat = np.ones(z.shape[1]) if mean_only else np.nanvar(z, axis=0, ddof=1)
    delta_hat = np.where(delta_hat == 0, 1.0, delta_hat)
    known = np.isfinite(gamma_hat) & np.isfinite(delta_hat)
    gamma_bar, t2 = float(gamma_hat[known].mean()), float(gamma_hat[known].var(ddof=1))
    a = b = None
    if not mean_only:
        m, s2 = float(delta_hat[known].mean()), float(delta_hat[known].var(ddof=1))
        a, b = (2 * s2 + m ** 2) / s2, (m * s2 + m ** 3) / s2
    if not eb:
        gamma_star, delta_star = gamma_hat, delta_hat
    elif mean_only and parametric:
        gamma_star = _posterior_mean(gamma_hat, gamma_bar, 1, 1, t2)
        delta_star = np.ones_like(delta_hat)
    elif parametric:
        gamma_star, delta_star = _parametric(z, gamma_hat, delta_hat, gamma_bar, t2, a, b)
    else:
        gamma_star, delta_star = _non_parametric(z, gamma_hat, delta_hat)
    return SiteAdjustment(gamma_hat, delta_hat, gamma_star, delta_star, gamma_bar, t2, a, b)


def _posterior_mean(g_hat: np.ndarray, g_bar: float, n: np.ndarray | int, d_star: np.ndarray
                    | int, t2: float) -> np.ndarray:
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _parametric(z: np.ndarray, g_hat: np.ndarray, d_hat: np.ndarray, g_bar: float,
                t2: float, a: float | None, b: float | None) -> tuple[np.ndarray, np.ndarray]:
    """neuroCombat's `it_sol`: alternate the posterior mean of γ and variance of δ² until
    neither changes by more than CONVERGENCE relatively."""
    assert a is not None and b is not None
    n = np.sum(~np.isnan(z), axis=0)
    g_old, d_old = g_hat.copy(), d_hat.copy()
    while True:
        g_new = _posterior_mean(g_hat, g_bar, n, d_old, t2)
        sum2 = np.nansum((z - g_new) ** 2, axis=0)
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):  # γ̂ = 0: one site alone
            change = max(_largest(np.abs(g_new - g_old) / g_old),
                         _largest(np.abs(d_new - d_old) / d_old))
        g_old, d_old = g_new, d_new
        if not change > CONVERGENCE:
            return g_new, d_new


def _largest(values: np.ndarray) -> float:
    """The largest relative change over the features this site has values of (nan, which
    ends the iteration as in neuroCombat, when there is none)."""
    known = values[np.isfinite(values)]
    return float(known.max()) if known.size else float("nan")


def _non_parametric(z: np.ndarray, g_hat: np.ndarray, d_hat: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """neuroCombat's `int_eprior`: each feature's γ*, δ* as the likelihood-weighted mean of
    the other features' γ̂, δ̂² at this site."""
    n, p = z.shape
    gamma_star, delta_star = np.empty(p), np.empty(p)
    for g in range(p):
        others = np.arange(p) != g
        gs, ds = g_hat[others], d_hat[others]
        sum2 = np.sum((z[:, g][None, :] - gs[:, None]) ** 2, axis=1)
        likelihood = np.nan_to_num(1 / (2 * math.pi * ds) ** (n / 2) * np.exp(-sum2 / (2 * ds)))
        gamma_star[g] = np.sum(gs * likelihood) / np.sum(likelihood)
        delta_star[g] = np.sum(ds * likelihood) / np.sum(likelihood)
    return gamma_star, delta_star


# --- the site effect, before and after -------------------------------------------------

@dataclass(frozen=True)
class SiteAnova:
    """One-way ANOVA of site, per feature: F, its p-value and the degrees of freedom."""

    f: np.ndarray
    p: np.ndarray
    df_between: int
    df_within: int


def local_site_moments(y: np.ndarray) -> dict[str, np.ndarray]:
    """Site half. Crosses the wire: the site's patient count, per feature its mean and its
    sum of squared deviations from that mean (n, Σx, Σx² in a numerically stable form)."""
    mean = y.mean(axis=0)
    return {"n": np.array([len(y)]), "mean": mean, "m2": np.sum((y - mean) ** 2, axis=0)}


def combine_site_anova(n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> SiteAnova:
    """Server half: `scipy.stats.f_oneway` of the features grouped by site, from each site's
    (n, mean, m2) stacked over sites (n: k; mean, m2: k × p)."""
    from scipy import stats  # server half only

    n = np.asarray(n, dtype=float).reshape(-1)
    grand = (n @ mean) / n.sum()
    between = n @ (mean - grand) ** 2
    within = np.sum(m2, axis=0)
    df_b, df_w = len(n) - 1, int(n.sum()) - len(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (between / df_b) / (within / df_w)
    return SiteAnova(f=f, p=stats.f.sf(f, df_b, df_w), df_between=df_b, df_within=df_w)
