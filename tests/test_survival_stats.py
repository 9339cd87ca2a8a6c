"""Federated survival statistics against lifelines on the pooled rows (real data: lifelines'
GBSG2, 686 breast-cancer patients, split into non-IID sites), with the same time binning
applied to the pooled rows: Kaplan–Meier and its CI, log-rank, Efron Cox, stepwise AIC,
C-index (exact and bounded)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test, multivariate_logrank_test
from lifelines.utils import concordance_index

from shared import concordance as cindex
from shared import cox
from shared import kaplan_meier as km
from tests.splits import gbsg2, non_iid_split

TOL = 1e-6  # the bar; the achieved differences are ~1e-12 (see test bodies)
NUMERIC = ["age", "tsize", "pnodes", "progrec", "estrec"]
CATEGORICAL = {"horTh": ["no", "yes"], "menostat": ["Post", "Pre"],
               "tgrade": ["I", "II", "III"]}  # first level = reference
TERMS = ["age", "tsize", "pnodes", "progrec", "estrec", "horTh", "menostat", "tgrade"]
LIFELINES_TIGHT = {"precision": 1e-12, "r_precision": 1e-16, "step_size": 1.0,
                   "max_steps": 200}


def binned_sites(time_bin: float, n_sites: int = 3, by: str = "age",
                 seed: int = 1) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """GBSG2 split into sites, each with its times rounded up; and the pooled binned rows."""
    frame = gbsg2()
    frame["t"] = km.bin_times(frame["time"].to_numpy(float), time_bin)
    sites = non_iid_split(frame, by=by, n_sites=n_sites, seed=seed)
    return sites, pd.concat(sites, ignore_index=True)


# --------------------------------------------------------------------------- design


def design(frame: pd.DataFrame, terms: list[str] = TERMS) -> pd.DataFrame:
    """Dummy-coded design (reference = first level), as the survival stage codes it."""
    columns = {}
    for term in terms:
        if term in CATEGORICAL:
            for level in CATEGORICAL[term][1:]:
                columns[f"{term}={level}"] = (frame[term] == level).astype(float)
        else:
            columns[term] = frame[term].astype(float)
    return pd.DataFrame(columns, index=frame.index)


def term_columns(terms: list[str] = TERMS) -> list[tuple[int, ...]]:
    out, start = [], 0
    for term in terms:
        width = len(CATEGORICAL[term]) - 1 if term in CATEGORICAL else 1
        out.append(tuple(range(start, start + width)))
        start += width
    return out


class Federation:
    """The server loop of the survival stage over in-memory sites: every Newton round
    computes each site's half (`local_risk_set_sums`) and adds them up."""

    def __init__(self, sites: list[pd.DataFrame], terms: list[str] = TERMS) -> None:
        self.sites = sites
        self.terms = terms
        self.columns = list(design(sites[0], terms).columns)
        pooled = pd.concat(sites, ignore_index=True)
        self.center = design(pooled, terms).mean().to_numpy()
        self.x = [design(s, terms).to_numpy() - self.center for s in sites]
        self.grid = np.unique(np.concatenate([s.t[s.cens == 1].to_numpy() for s in sites]))
        self.rounds = 0

    def evaluate(self, betas: np.ndarray) -> cox.RiskSetSums:
        self.rounds += 1
        return cox.combine_risk_set_sums([
            cox.local_risk_set_sums(s.t.to_numpy(), s.cens.to_numpy(), x, self.grid, betas)
            for s, x in zip(self.sites, self.x, strict=True)])

    def fit(self, columns: tuple[int, ...] | None = None) -> cox.CoxFit:
        columns = tuple(range(len(self.columns))) if columns is None else columns
        return cox.fit_models(self.evaluate, [columns], len(self.columns))[0]

    def fit_terms(self, models: list[tuple[int, ...]], starts: list) -> list[cox.CoxFit]:
        cols = [cox.columns_of(m, term_columns(self.terms)) for m in models]
        return cox.fit_models(self.evaluate, cols, len(self.columns), starts)

    def scores(self, fit: cox.CoxFit) -> list[np.ndarray]:
        beta = np.zeros(len(self.columns))
        beta[list(fit.columns)] = fit.beta
        return [(x * beta).sum(axis=1) for x in self.x]


def lifelines_cox(pooled: pd.DataFrame, terms: list[str]) -> CoxPHFitter:
    data = design(pooled, terms).assign(T=pooled.t, E=pooled.cens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter().fit(data, "T", "E", fit_options=LIFELINES_TIGHT)


def null_log_likelihood(pooled: pd.DataFrame) -> float:
    """The Efron partial log-likelihood with no covariates (lifelines' `_ll_null_`)."""
    return float(lifelines_cox(pooled, ["age"])._ll_null_)


def reference_stepwise(pooled: pd.DataFrame, terms: list[str], direction: str = "both",
                       cache: dict | None = None) -> tuple[list[str], list[tuple[str, str, float]]]:
    """R step() semantics as a loop over pooled lifelines fits: start full; at each step
    fit every single drop (and re-add); take the lowest AIC if strictly below the current;
    ties by candidate order (drops, then adds, each in covariate order)."""
    cache = {} if cache is None else cache

    def aic(model: tuple[str, ...]) -> float:
        if model not in cache:
            if model:
                fit = lifelines_cox(pooled, list(model))
                cache[model] = -2 * fit.log_likelihood_ + 2 * len(fit.params_)
            else:
                cache[model] = -2 * null_log_likelihood(pooled)
        return cache[model]

    current = tuple(terms)
    path = [("start", "", aic(current))]
    while True:
        candidates = [("drop", t, tuple(u for u in current if u != t)) for t in current]
        if direction == "both":
            candidates += [("add", t, tuple(u for u in terms if u in current or u == t))
                           for t in terms if t not in current]
        if not candidates:
            break
        values = [aic(model) for _, _, model in candidates]
        best = int(np.argmin(values))
        if not values[best] < aic(current):
            break
        action, term, current = candidates[best]
        path.append((action, term, values[best]))
    return list(current), path


# --------------------------------------------------------------------------- binning


def test_times_are_rounded_up_to_the_bin() -> None:
    times = np.array([0.0, 1.0, 29.0, 30.0, 30.5, 59.999, 60.0, 0.3])
    np.testing.assert_array_equal(km.bin_times(times, 30),
                                  [0, 30, 30, 30, 60, 60, 60, 30])
    np.testing.assert_array_equal(km.bin_times(times, 0), times)
    assert km.bin_times(np.array([0.3]), 0.1)[0] == pytest.approx(0.3)  # no float creep


# --------------------------------------------------------------------------- Kaplan–Meier


@pytest.mark.parametrize("time_bin", [0, 30])
def test_kaplan_meier_and_ci_match_lifelines_at_every_time(time_bin: float) -> None:
    sites, pooled = binned_sites(time_bin)
    assert len({round(s.age.mean()) for s in sites}) == 3  # the sites really differ
    groups = {"all": [np.ones(len(s), bool) for s in sites]}
    for level in CATEGORICAL["tgrade"]:
        groups[f"tgrade={level}"] = [(s.tgrade == level).to_numpy() for s in sites]
    for name, masks in groups.items():
        tables = [km.local_time_table(s.t[m], s.cens[m]) for s, m in zip(sites, masks,
                                                                          strict=True)]
        ours = km.kaplan_meier(km.combine_time_tables(tables))
        rows = pooled if name == "all" else pooled[pooled.tgrade == name.split("=")[1]]
        ref = KaplanMeierFitter().fit(rows.t, rows.cens)
        np.testing.assert_array_equal(ours.time, ref.timeline)
        np.testing.assert_array_equal(ours.at_risk, ref.event_table["at_risk"])
        np.testing.assert_array_equal(ours.events, ref.event_table["observed"])
        np.testing.assert_allclose(ours.survival, ref.survival_function_.iloc[:, 0],
                                   rtol=TOL, atol=1e-12)
        ci = ref.confidence_interval_.to_numpy()
        np.testing.assert_allclose(ours.ci_lower, ci[:, 0], rtol=TOL, atol=1e-12)
        np.testing.assert_allclose(ours.ci_upper, ci[:, 1], rtol=TOL, atol=1e-12)


def test_a_site_time_table_is_binned_and_cumulative() -> None:
    table = km.local_time_table(np.array([30, 30, 60, 90, 90, 90.0]),
                                np.array([1, 0, 1, 0, 1, 1]))
    np.testing.assert_array_equal(table.time, [30, 60, 90])
    np.testing.assert_array_equal(table.at_risk, [6, 4, 3])
    np.testing.assert_array_equal(table.events, [1, 1, 2])


# --------------------------------------------------------------------------- log-rank


def grouped_tables(sites: list[pd.DataFrame], column: str) -> list[km.TimeTable]:
    return [km.combine_time_tables([km.local_time_table(s.t[s[column] == level],
                                                        s.cens[s[column] == level])
                                    for s in sites])
            for level in CATEGORICAL[column]]


@pytest.mark.parametrize("time_bin", [0, 30])
def test_two_group_logrank_matches_lifelines(time_bin: float) -> None:
    sites, pooled = binned_sites(time_bin, by="pnodes")
    ours = km.logrank(grouped_tables(sites, "horTh"))
    a, b = pooled[pooled.horTh == "no"], pooled[pooled.horTh == "yes"]
    ref = logrank_test(a.t, b.t, a.cens, b.cens)
    assert ours.df == 1
    assert ours.statistic == pytest.approx(ref.test_statistic, rel=TOL)
    assert ours.p_value == pytest.approx(ref.p_value, rel=TOL)


def test_multivariate_logrank_matches_lifelines() -> None:
    sites, pooled = binned_sites(30, n_sites=4, by="tsize", seed=2)
    ours = km.logrank(grouped_tables(sites, "tgrade"))
    ref = multivariate_logrank_test(pooled.t, pooled.tgrade, pooled.cens)
    assert ours.df == 2
    assert ours.statistic == pytest.approx(ref.test_statistic, rel=TOL)
    assert ours.p_value == pytest.approx(ref.p_value, rel=TOL)


# --------------------------------------------------------------------------- Cox


@pytest.fixture(scope="module")
def federation() -> tuple[Federation, pd.DataFrame]:
    sites, pooled = binned_sites(30, by="age", seed=1)
    return Federation(sites), pooled


def test_cox_efron_matches_lifelines(federation) -> None:
    fed, pooled = federation
    fit = fed.fit()
    assert fit.converged and fed.rounds <= 10
    ours = cox.summarize(fit, fed.columns)
    ref = lifelines_cox(pooled, TERMS)
    assert ours.covariates == list(ref.params_.index)
    summary = ref.summary
    np.testing.assert_allclose(ours.coef, ref.params_, rtol=TOL)
    np.testing.assert_allclose(ours.se, ref.standard_errors_, rtol=TOL)
    np.testing.assert_allclose(ours.p_value, summary["p"], rtol=TOL)
    np.testing.assert_allclose(ours.hazard_ratio, summary["exp(coef)"], rtol=TOL)
    np.testing.assert_allclose(ours.ci_lower, summary["exp(coef) lower 95%"], rtol=TOL)
    np.testing.assert_allclose(ours.ci_upper, summary["exp(coef) upper 95%"], rtol=TOL)
    assert ours.log_likelihood == pytest.approx(ref.log_likelihood_, rel=TOL)
    assert ours.aic == pytest.approx(ref.AIC_partial_, rel=TOL)
    # achieved: ~1e-13 relative on every number (tighter than the 1e-6 asserted)
    assert np.max(np.abs(ours.coef / ref.params_.to_numpy() - 1)) < 1e-9


def test_cox_with_exact_times_and_ties(federation) -> None:
    sites, pooled = binned_sites(0, by="estrec", seed=3)
    fed = Federation(sites, ["age", "pnodes", "horTh", "tgrade"])
    ours = cox.summarize(fed.fit(), fed.columns)
    ref = lifelines_cox(pooled, ["age", "pnodes", "horTh", "tgrade"])
    np.testing.assert_allclose(ours.coef, ref.params_, rtol=TOL)
    np.testing.assert_allclose(ours.se, ref.standard_errors_, rtol=TOL)
    assert ours.log_likelihood == pytest.approx(ref.log_likelihood_, rel=TOL)


def test_stepwise_aic_matches_a_pooled_loop_over_lifelines_fits(federation) -> None:
    fed, pooled = federation
    rounds, cache = fed.rounds, {}
    for direction in ("backward", "both"):
        search = cox.stepwise(fed.fit_terms, term_columns(), TERMS, direction)
        selected, path = reference_stepwise(pooled, TERMS, direction, cache)
        assert [TERMS[t] for t in search.terms] == selected
        assert [(s["action"], s["covariate"] or "") for s in search.steps] == \
            [(a, t) for a, t, _ in path]
        np.testing.assert_allclose([s["aic"] for s in search.steps], [v for *_, v in path],
                                   rtol=TOL)
        ref = lifelines_cox(pooled, selected)
        np.testing.assert_allclose(search.fit.beta, ref.params_, rtol=TOL)
    assert len(path) >= 3  # the search did take steps
    assert fed.rounds - rounds < 60  # candidates of a step share their rounds


def test_stepwise_follows_r_step_semantics_on_a_known_aic_table() -> None:
    """Drops then re-adds, ties to the first candidate (drops, then adds, in covariate order)
    and to the current model (a candidate must be strictly lower)."""
    aic = {"abcd": 100, "bcd": 98, "acd": 99, "abd": 99, "abc": 99, "cd": 97, "bd": 97,
           "bc": 98, "d": 96, "c": 97.5, "": 97, "ad": 95, "a": 95, "abd_": 99}
    names = ["a", "b", "c", "d"]
    asked: list[str] = []

    def fit_terms(models: list[tuple[int, ...]], starts: list) -> list[cox.CoxFit]:
        fits = []
        for model in models:
            key = "".join(names[t] for t in model)
            asked.append(key)
            value = aic.get(key, 110.0)
            fits.append(cox.CoxFit(model, np.zeros(len(model)),
                                   -(value - 2 * len(model)) / 2, np.zeros((0, 0)), 1, True))
        return fits

    both = cox.stepwise(fit_terms, [(0,), (1,), (2,), (3,)], names, "both")
    assert [(s["action"], s["covariate"]) for s in both.steps] == [
        ("start", None), ("drop", "a"), ("drop", "b"), ("drop", "c"), ("add", "a")]
    assert both.terms == (0, 3) and both.fit.aic == 95  # {a} ties at 95: not strictly lower
    backward = cox.stepwise(fit_terms, [(0,), (1,), (2,), (3,)], names, "backward")
    assert backward.terms == (3,) and [s["covariate"] for s in backward.steps][-1] == "c"
    none = cox.stepwise(fit_terms, [(0,), (1,), (2,), (3,)], names, "none")
    assert none.terms == (0, 1, 2, 3) and len(none.steps) == 1


def test_stepwise_can_reach_the_empty_model() -> None:
    sites, _ = binned_sites(30)
    rng = np.random.default_rng(0)
    for s in sites:
        s["noise"] = rng.normal(size=len(s))  # unrelated to survival: dropped
    pooled = pd.concat(sites, ignore_index=True)
    fed = Federation(sites, ["noise"])
    search = cox.stepwise(fed.fit_terms, [(0,)], ["noise"], "both")
    selected, path = reference_stepwise(pooled, ["noise"])
    assert search.terms == () and selected == []
    assert search.fit.aic == pytest.approx(path[-1][2], rel=TOL)
    assert search.fit.aic == pytest.approx(-2 * null_log_likelihood(pooled), rel=TOL)


# --------------------------------------------------------------------------- C-index


def exact_concordance(sites: list[pd.DataFrame], scores: list[np.ndarray]) -> float:
    """The exact protocol: within-site counts, then each site against the others' events."""
    parts = []
    for i, (s, r) in enumerate(zip(sites, scores, strict=True)):
        parts.append(cindex.local_pair_counts(s.t.to_numpy(), s.cens.to_numpy(), r))
        others = [j for j in range(len(sites)) if j != i]
        event_t = np.concatenate([sites[j].t.to_numpy()[sites[j].cens == 1] for j in others])
        event_r = np.concatenate([scores[j][sites[j].cens.to_numpy() == 1] for j in others])
        parts.append(cindex.local_cross_counts(s.t.to_numpy(), s.cens.to_numpy(), r,
                                               event_t, event_r))
    return cindex.concordance(parts)


def bounded_concordance(sites: list[pd.DataFrame], scores: list[np.ndarray],
                        min_count: int, levels: int = 4) -> cindex.Bound:
    """The histogram protocol with each site cutting its event table at `min_count`."""
    pooled = km.combine_time_tables([km.local_time_table(s.t, s.cens) for s in sites])
    exits = -np.diff(np.append(pooled.at_risk, 0))
    allr = np.concatenate(scores)
    te, se = cindex.grid_edges(pooled.time, exits, allr.mean(), allr.std(), levels)
    tables = [cindex.local_event_partition(s.t.to_numpy(), s.cens.to_numpy(), r, te, se,
                                           min_count) for s, r in zip(sites, scores, strict=True)]
    for _, counts in tables:
        assert np.all(counts >= min_count)  # what the guard will check
    within, cross = [], []
    for i, (s, r) in enumerate(zip(sites, scores, strict=True)):
        within.append(cindex.local_pair_counts(s.t.to_numpy(), s.cens.to_numpy(), r))
        others = [tables[j] for j in range(len(sites)) if j != i]
        cross.append(cindex.local_bound_counts(
            s.t.to_numpy(), s.cens.to_numpy(), r, te, se,
            np.concatenate([c for c, _ in others]), np.concatenate([n for _, n in others])))
    return cindex.combine_bounds(within, cross)


def test_exact_concordance_matches_lifelines(federation) -> None:
    fed, pooled = federation
    fit = fed.fit()
    ours = exact_concordance(fed.sites, fed.scores(fit))
    ref = lifelines_cox(pooled, TERMS)
    assert ours == pytest.approx(ref.concordance_index_, rel=1e-12)
    scores = np.concatenate(fed.scores(fit))
    assert ours == pytest.approx(concordance_index(pooled.t, -scores, pooled.cens), rel=1e-12)


def test_exact_concordance_with_tied_scores_and_times() -> None:
    sites, pooled = binned_sites(90, n_sites=4, by="progrec", seed=4)
    scores = [np.round(s.pnodes.to_numpy() / 4.0) for s in sites]  # many tied scores
    ours = exact_concordance(sites, scores)
    ref = concordance_index(pooled.t, -np.concatenate(scores), pooled.cens)
    assert ours == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("min_count", [1, 3, 10])
def test_concordance_bound_contains_the_exact_value(federation, min_count: int) -> None:
    fed, pooled = federation
    fit = fed.fit()
    truth = lifelines_cox(pooled, TERMS).concordance_index_
    bound = bounded_concordance(fed.sites, fed.scores(fit), min_count)
    assert bound.lower <= truth <= bound.upper
    assert bound.lower <= bound.estimate <= bound.upper
    assert bound.upper - bound.lower < 0.5
    tied = [np.round(r * 2) for r in fed.scores(fit)]  # ties across sites and bins
    truth_tied = concordance_index(pooled.t, -np.concatenate(tied), pooled.cens)
    tied_bound = bounded_concordance(fed.sites, tied, min_count)
    assert tied_bound.lower <= truth_tied <= tied_bound.upper


def test_bound_narrows_as_the_cell_rule_relaxes(federation) -> None:
    fed, _ = federation
    scores = fed.scores(fed.fit())
    widths = [b.upper - b.lower for b in (bounded_concordance(fed.sites, scores, m)
                                          for m in (1, 3, 10))]
    assert widths[0] < widths[1] < widths[2]
