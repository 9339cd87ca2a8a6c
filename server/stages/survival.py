"""Survival stage, server side: Kaplan–Meier, log-rank, Efron Cox with stepwise AIC and
Harrell's C-index over the sites with role `survival` (the workflow passes only those).

Rounds (queries carry `needs: survival`; what each site sends is in client/stages/survival.py):

1. `survival_setup`: each site's time policy, its binned time tables (all patients and per
   level of `survival-group`), what each of `survival-covariates` is, and the binned event
   times of its Cox cohort. The sites must agree on `time_bin` (and the time unit): a mix
   fails the stage with a reason naming every site's value. Kaplan–Meier and the log-rank
   test come from these tables alone.
2. `survival_cox`, one round per Newton iteration: risk-set and tied-death sums at every
   global event time, for every model still being fitted — the full model, then each
   stepwise step's candidates in one batch.
3. C-index of each reported model: `survival_events` + `survival_pairs` (exact) when every
   site allows event queries, else `survival_histograms` + `survival_bounds` (a bound).

Everything after round 1 is one fit over one site set (`on_stable_sites`): if a site drops
or stops answering, the fit starts again on the others and `restarts` says so.

Model outputs of earlier stages: `predicted:<model>` (as the group or a covariate) is the
model's predicted label at each site — score ≥ the validation stage's training-site Youden
threshold (`survival.thresholds`; 0.5 when the validation stage did not run) — and
`score:<model>` its probability; the sites read them from their own prediction files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from server.core.progress import report_round
from server.core.transport import (
    Reply,
    SiteSetChanged,
    StageError,
    StudyError,
    TooFewReplies,
    Transport,
    ask_same_sites,
    on_stable_sites,
)
from server.core.transport import answered as answered_ok
from server.stages.survival_design import (
    MODEL_PREFIXES,
    Design,
    agree_design,
    check_covariate_kinds,
    split_spec,
)
from shared import concordance as cindex
from shared import cox
from shared import kaplan_meier as km
from shared.config import NO_EARLIER, Earlier, StudyConfig, query_needs
from shared.schema import (
    STATUS_DROPPED,
    SURVIVAL_BOUNDS,
    SURVIVAL_COX,
    SURVIVAL_EVENTS,
    SURVIVAL_HISTOGRAMS,
    SURVIVAL_PAIRS,
    SURVIVAL_SETUP,
    nest,
)

log = logging.getLogger("feddlr")

HISTOGRAM_LEVELS = 4  # finest C-index grid: 16 time blocks × 16 score bins


class _Rounds:
    """Numbers the stage's rounds in the progress log."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, replies: dict[str, Reply], what: str) -> None:
        self.count += 1
        report_round(f"survival {what}", self.count, 0, replies)


def model_query(config: StudyConfig, groups: list[str], terms: list[str],
                earlier: Earlier) -> dict[str, Any]:
    """Query keys for model outputs: the prediction runs to read and, per `predicted:` model,
    its threshold (the validation stage's, unless `survival-thresholds` sets it)."""
    models = [n.split(":", 1)[1] for n in (*groups, *terms) if n.startswith(MODEL_PREFIXES)]
    if not models:
        return {}
    query: dict[str, Any] = {"runs": earlier.runs(config), "needs": query_needs("survival")}
    for name in (*groups, *terms):
        if name.startswith("predicted:"):
            model = name.split(":", 1)[1]
            query[f"threshold.{model}"] = earlier.threshold(config, model)
    return query


def needs_label(config: StudyConfig) -> bool:
    """Whether the survival stage reads the task label: only to group or adjust by `label`
    (`her2_class` and model outputs come from their own columns and files)."""
    names = [g.strip() for g in config.survival_group.split(",")]
    names += [split_spec(t)[0] for t in config.survival_covariates]
    return "label" in names


def run_survival(transport: Transport, config: StudyConfig, sites: list[str],
                 earlier: Earlier = NO_EARLIER) -> dict[str, Any]:
    if not sites:
        raise StageError("no usable site has role 'survival'")
    rounds = _Rounds()
    groups = [g.strip() for g in config.survival_group.split(",") if g.strip()]
    group = groups[0] if groups else ""
    terms = list(dict.fromkeys(config.survival_covariates))
    names = list(dict.fromkeys(split_spec(t)[0] for t in terms))  # `column:reference`
    task = config.task if needs_label(config) else ""  # "": the sites need no label columns
    base = {"task": task, "needs": "survival", **model_query(config, groups, terms, earlier)}
    setup = transport.ask(SURVIVAL_SETUP, {**base, "group": group, "covariates": names}, sites)
    rounds(setup, "setup")
    answered = answered_ok(setup, sites, min_replies=config.min_replies,
                           what="the survival setup")
    time_bin, time_unit = _agreed_time_policy(setup, answered)
    result: dict[str, Any] = {
        "task": task or None,
        "time_bin": time_bin,
        "time_unit": time_unit,
        "group": group or None,
        "groups": groups,
        "sites": {s: {"status": setup[s].status, "reason": setup[s].reason} for s in sites},
        "thresholds": {k.split(".", 1)[1]: v for k, v in base.items()
                       if k.startswith("threshold.")},
    }
    result["km"], result["logrank"] = _kaplan_meier(setup, answered, group)
    result["logrank_by"] = {group: result["logrank"]} if group else {}
    for other in groups[1:]:  # e.g. true and predicted label: one more KM round each
        more = transport.ask(SURVIVAL_SETUP, {**base, "group": other, "covariates": []},
                             answered)
        rounds(more, f"setup ({other})")
        curves, result["logrank_by"][other] = _kaplan_meier(
            more, [s for s in answered if more[s].ok], other)
        result["km"].update({k: v for k, v in curves.items() if k != "all"})
    if terms:
        check_covariate_kinds(names, setup, answered)
        base = {**base, "time_bin": time_bin}
        cox_sites = [s for s in answered if "cox.setup.totals" in setup[s].payload]
        exits = _pooled_exits(result["km"]["all"])

        def fit(used: list[str]) -> dict[str, Any]:
            design = agree_design(terms, setup, used)  # agreed over exactly the sites of the fit
            out: dict[str, Any] = {"design": design.describe()}
            used = [s for s in used if s not in design.without]
            if not design.columns or not used:
                out["cox"] = {"error": "no covariate is available at the Cox sites"
                              if not design.columns else "no site has every covariate"}
                return out
            return {**out, **_cox_stage(transport, config, base, setup, used, design, exits,
                                        rounds)}

        if not cox_sites:
            result["cox"] = {"error": "no site released its Cox cohort (policy: fewer than "
                             "min_patients complete cases, or 1–2 events, or no grouping of "
                             "its times the policy allows)",
                             "sites_missing": answered,
                             "site_reasons": {s: str(setup[s].payload["refused.cox.setup"])
                                              for s in answered
                                              if "refused.cox.setup" in setup[s].payload}}
        else:
            try:
                models, restarts = on_stable_sites(fit, cox_sites, min_sites=config.min_sites,
                                                   stage="survival",
                                                   min_replies=config.min_replies)
            except (TooFewReplies, StudyError) as err:  # fewer Cox sites than min-replies (e.g.
                # every one refused a Newton step steeper than its max_coefficient on separable
                # data), or below min-sites: no Cox model, the curves stand
                models, restarts = {"cox": {"error": str(err), "sites_missing": answered}}, []
            for key in ("cox", "cox_stepwise"):
                if "sites_used" in models.get(key, {}):
                    models[key]["sites_missing"] = [s for s in answered
                                                    if s not in models[key]["sites_used"]]
            result.update(models)
            result["restarts"] = restarts
            for restart in restarts:
                for s, reason in restart["dropped"].items():
                    result["sites"][s] = {"status": "dropped" if "dropped" in str(reason)
                                          else "failed", "reason": f"Cox fit: {reason}"}
    return result


# --------------------------------------------------------------------------- round 1


def _agreed_time_policy(setup: dict[str, Reply], sites: list[str]) -> tuple[float, str]:
    bins = {s: float(setup[s].payload["site.time_bin"]) for s in sites}
    units = {s: str(setup[s].payload["site.time_unit"]) for s in sites}
    if len(set(bins.values())) > 1:
        shown = ", ".join(f"{s}: {b:g}" for s, b in sorted(bins.items()))
        raise StageError(f"survival sites disagree on privacy.time_bin ({shown}); every "
                         "survival site must round times to the same time_bin, so the "
                         "hospitals have to agree on one before the survival stage can run")
    if len(set(units.values())) > 1:
        shown = ", ".join(f"{s}: {u}" for s, u in sorted(units.items()))
        raise StageError(f"survival sites disagree on time_unit ({shown}); every survival "
                         "site must report times in the same unit")
    return next(iter(bins.values())), next(iter(units.values()))


def _table(reply: Reply, name: str) -> km.TimeTable | None:
    part = nest(reply.payload, name)
    if "time" not in part:
        return None
    return km.TimeTable(np.asarray(part["time"], dtype=np.float64),
                        np.asarray(part["at_risk"], dtype=np.int64),
                        np.asarray(part["events"], dtype=np.int64))


def _curve(tables: dict[str, km.TimeTable], sites: list[str]) -> dict[str, Any]:
    """The pooled curve over the sites that released `tables`; `sites_missing` are those of
    `sites` (the ones that hold such patients) whose policy refused theirs."""
    if not tables:
        return {"time": [], "survival": [], "ci_lower": [], "ci_upper": [], "at_risk": [],
                "events": [], "n": 0, "n_events": 0, "sites_used": [], "sites_missing": sites,
                "reason": "no site released this table (policy: min_patients / events)"}
    pooled = km.combine_time_tables(list(tables.values()))
    fit = km.kaplan_meier(pooled)
    return {
        "time": fit.time, "survival": fit.survival, "ci_lower": fit.ci_lower,
        "ci_upper": fit.ci_upper, "at_risk": fit.at_risk, "events": fit.events,
        "n": pooled.n, "n_events": int(pooled.events.sum()),
        "sites_used": list(tables), "sites_missing": [s for s in sites if s not in tables],
    }


def _kaplan_meier(setup: dict[str, Reply], sites: list[str],
                  group: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    overall = {s: t for s in sites if (t := _table(setup[s], "km.all")) is not None}
    curves = {"all": _curve(overall, sites)}
    if not group:
        return curves, None
    per_site: dict[str, dict[str, km.TimeTable]] = {}
    listed: dict[str, list[str]] = {}
    complete: list[str] = []
    problems: dict[str, str] = {}
    for s in sites:
        payload = setup[s].payload
        names = payload.get("group.levels")
        if names is None:
            problems[s] = str(payload.get("group.error") or payload.get("refused.group")
                              or f"no column {group!r}")
            continue
        names = [names] if isinstance(names, str) else [str(v) for v in names]
        tables = {level: _table(setup[s], f"km.g{i}") for i, level in enumerate(names)}
        per_site[s] = {level: t for level, t in tables.items() if t is not None}
        listed[s] = names
        if all(t is not None for t in tables.values()):
            complete.append(s)
    levels = sorted({v for names in listed.values() for v in names})
    for level in levels:
        tables = {s: per_site[s][level] for s in per_site if level in per_site[s]}
        holders = [s for s in sites if level in listed.get(s, [])] + list(problems)
        curves[f"{group}={level}"] = _curve(tables, [s for s in sites if s in holders])
    logrank: dict[str, Any] = {"groups": [f"{group}={v}" for v in levels],
                               "sites_used": complete,
                               "sites_missing": [s for s in sites if s not in complete]}
    if problems:
        logrank["site_problems"] = problems
    tested = [v for v in levels if any(v in per_site[s] for s in complete)]
    if len(tested) >= 2:
        tables = [km.combine_time_tables([per_site[s][v] for s in complete
                                          if v in per_site[s]]) for v in tested]
        test = km.logrank(tables)
        logrank.update(groups=[f"{group}={v}" for v in tested], statistic=test.statistic,
                       p_value=test.p_value, df=test.df)
    else:
        logrank.update(statistic=None, p_value=None, df=None,
                       reason="fewer than two groups released")
    return curves, logrank


def _pooled_exits(curve: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    at_risk = np.asarray(curve["at_risk"], dtype=np.int64)
    return np.asarray(curve["time"], dtype=np.float64), -np.diff(np.append(at_risk, 0))


# --------------------------------------------------------------------------- Cox


def _cox_stage(transport: Transport, config: StudyConfig, base: dict[str, Any],
               setup: dict[str, Reply], sites: list[str], design: Design,
               exits: tuple[np.ndarray, np.ndarray], rounds: _Rounds) -> dict[str, Any]:
    """Full model, stepwise search and C-indexes over exactly `sites`."""
    grid = np.unique(np.concatenate(
        [np.asarray(setup[s].payload["cox.setup.event_times"], dtype=np.float64).reshape(-1)
         for s in sites]))
    totals = np.sum([np.asarray(setup[s].payload["cox.setup.totals"]) for s in sites], axis=0)
    query = {**base, **design.query(), "grid": grid}
    p = len(design.columns)
    first: dict[str, cox.RiskSetSums] = {}
    small: dict[str, int] = {}

    def evaluate(betas: np.ndarray) -> cox.RiskSetSums:
        replies = ask_same_sites(transport, SURVIVAL_COX, dict(query, betas=betas), sites)
        rounds(replies, "cox")
        _require(replies, "cox.s0", SURVIVAL_COX)
        small.update({s: int(replies[s].payload.get("risk_sets.small_differences", 0))
                      for s in sites if not small})
        sums = cox.combine_risk_set_sums([_sums(replies[s]) for s in sites])
        if "zero" not in first and not np.any(betas):
            first["zero"] = sums
        return sums

    def fit_terms(models: list[tuple[int, ...]], starts: list) -> list[cox.CoxFit]:
        columns = [cox.columns_of(m, design.term_columns) for m in models]
        return cox.fit_models(evaluate, columns, p, starts)

    all_terms = tuple(range(len(design.terms)))
    full = fit_terms([all_terms], [None])[0]
    moments = _score_moments(first.get("zero"))
    common = {"n": int(totals[0]), "events": int(totals[1]), "sites_used": list(sites),
              "risk_sets": risk_set_summary(setup, sites, small)}
    out = {"cox": {**_model_entry(full, design, all_terms), **common}}
    out["cox"].update(_concordance(transport, base, design, full, setup, sites, exits,
                                   moments, rounds))
    if config.stepwise != "none":
        search = cox.stepwise(fit_terms, design.term_columns, design.terms, config.stepwise,
                              full=full)
        entry = {**_model_entry(search.fit, design, search.terms), **common,
                 "direction": config.stepwise,
                 "selected": [design.terms[t] for t in search.terms],
                 "steps": search.steps}
        entry.update(_concordance(transport, base, design, search.fit, setup, sites, exits,
                                  moments, rounds))
        out["cox_stepwise"] = entry
    return out


def risk_set_summary(setup: dict[str, Reply], sites: list[str],
                     small: dict[str, int]) -> dict[str, Any]:
    """Per site the time bin its Cox risk sets are on (raised at a site whose policy sets
    `allow_risk_set_differences: false`) and how many successive risk sets it released
    that differ by fewer than its min_difference patients (0 at such a site)."""
    bins = {s: float(setup[s].payload.get("cox.setup.time_bin",
                                          setup[s].payload["site.time_bin"])) for s in sites}
    return {"time_bin": bins, "small_differences": dict(small),
            "small_differences_total": int(sum(small.values()))}


def _require(replies: dict[str, Reply], key: str, action: str) -> None:
    """Every site of a fit must answer every round: one that fails or refuses is dropped
    from the fit (which then restarts on the others)."""
    bad = {s: (r.reason or "; ".join(str(v) for k, v in r.payload.items()
                                     if k.startswith("refused.")) or r.status)
           for s, r in replies.items() if not r.ok or key not in r.payload}
    if bad:
        raise SiteSetChanged(action, {s: f"{replies[s].status}: {why}" for s, why in bad.items()},
                             failed=[s for s in bad if replies[s].status != STATUS_DROPPED])


def _sums(reply: Reply) -> cox.RiskSetSums:
    part = nest(reply.payload, "cox")
    return cox.RiskSetSums(**{name: np.asarray(part[name]) for name in cox.RiskSetSums.FIELDS})


def _model_entry(fit: cox.CoxFit, design: Design, terms: Iterable[int]) -> dict[str, Any]:
    s = cox.summarize(fit, design.columns)
    names = s.covariates
    as_map = lambda values: {n: float(v) for n, v in zip(names, values, strict=True)}  # noqa: E731
    return {
        "covariates": names,
        "terms": [design.terms[t] for t in terms],
        "coef": as_map(s.coef), "se": as_map(s.se), "z": as_map(s.z),
        "hazard_ratio": as_map(s.hazard_ratio), "ci_lower": as_map(s.ci_lower),
        "ci_upper": as_map(s.ci_upper), "p_value": as_map(s.p_value),
        "log_likelihood": s.log_likelihood, "aic": s.aic,
        "converged": fit.converged, "iterations": fit.iterations,
        **({"message": fit.message} if fit.message else {}),
    }


def _score_moments(sums: cox.RiskSetSums | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and covariance of the design over the first risk set (β = 0): nearly the whole
    cohort, enough to place the C-index score grid."""
    if sums is None or sums.s0.shape[1] == 0:
        return None
    s0, s1, s2 = sums.s0[0, 0], sums.s1[0, 0], sums.s2[0, 0]
    mean = s1 / s0
    return mean, s2 / s0 - np.outer(mean, mean)


# --------------------------------------------------------------------------- C-index


def _full_beta(fit: cox.CoxFit, p: int) -> np.ndarray:
    beta = np.zeros(p)
    beta[list(fit.columns)] = fit.beta
    return beta


def _concordance(transport: Transport, base: dict[str, Any], design: Design, fit: cox.CoxFit,
                 setup: dict[str, Reply], sites: list[str],
                 exits: tuple[np.ndarray, np.ndarray],
                 moments: tuple[np.ndarray, np.ndarray] | None,
                 rounds: _Rounds) -> dict[str, Any]:
    beta = _full_beta(fit, len(design.columns))
    query = {**base, **design.query(), "beta": beta}
    if all(bool(setup[s].payload.get("site.allow_event_queries")) for s in sites):
        return _exact_concordance(transport, query, sites, rounds)
    return _bounded_concordance(transport, query, sites, beta, exits, moments, rounds)


def _counts(reply: Reply, name: str) -> cindex.PairCounts:
    part = nest(reply.payload, name)
    return cindex.PairCounts(int(part["concordant"]), int(part["tied"]), int(part["comparable"]))


def _exact_concordance(transport: Transport, query: dict[str, Any], sites: list[str],
                       rounds: _Rounds) -> dict[str, Any]:
    replies = ask_same_sites(transport, SURVIVAL_EVENTS, query, sites)
    rounds(replies, "c-index events")
    _require(replies, "cindex.events.time", SURVIVAL_EVENTS)
    events = {s: (np.asarray(replies[s].payload["cindex.events.time"], dtype=np.float64),
                  np.asarray(replies[s].payload["cindex.events.score"], dtype=np.float64))
              for s in sites}
    per_site = {}
    for s in sites:
        others = [o for o in sites if o != s]
        per_site[s] = dict(query,
                           event_time=np.concatenate([events[o][0] for o in others] or [[]]),
                           event_score=np.concatenate([events[o][1] for o in others] or [[]]))
    cross = ask_same_sites(transport, SURVIVAL_PAIRS, per_site, sites)
    rounds(cross, "c-index pairs")
    _require(cross, "cindex.cross.comparable", SURVIVAL_PAIRS)
    parts = [_counts(replies[s], "cindex.within") for s in sites]
    parts += [_counts(cross[s], "cindex.cross") for s in sites]
    value = cindex.concordance(parts)
    total = sum(parts, cindex.PairCounts(0, 0, 0))
    return {"concordance": value, "concordance_method": "exact (event queries)",
            "concordance_bound": [value, value], "concordance_pairs": total.comparable}


def _bounded_concordance(transport: Transport, query: dict[str, Any], sites: list[str],
                         beta: np.ndarray, exits: tuple[np.ndarray, np.ndarray],
                         moments: tuple[np.ndarray, np.ndarray] | None,
                         rounds: _Rounds) -> dict[str, Any]:
    if moments is not None:
        mean, cov = moments
        score_mean = float(mean @ beta)
        score_sd = float(np.sqrt(max(beta @ cov @ beta, 0.0)))
    else:
        score_mean, score_sd = 0.0, 1.0
    time_edges, score_edges = cindex.grid_edges(exits[0], exits[1], score_mean, score_sd,
                                                HISTOGRAM_LEVELS)
    q = dict(query, time_edges=time_edges, score_edges=score_edges)
    replies = ask_same_sites(transport, SURVIVAL_HISTOGRAMS, q, sites)
    rounds(replies, "c-index tables")
    _require(replies, "cindex.within.comparable", SURVIVAL_HISTOGRAMS)
    tables = {s: (np.asarray(replies[s].payload["cindex.table.cells"]).reshape(-1, 4),
                  np.asarray(replies[s].payload["cindex.table.counts"]).reshape(-1))
              for s in sites if "cindex.table.counts" in replies[s].payload}
    used = [s for s in sites if s in tables]
    missing = [s for s in sites if s not in tables]
    if missing:  # its events cannot be placed against the others: left out of the C-index
        log.warning("survival: the C-index event table of %s was refused by its policy; the "
                    "C-index is over the other sites", ", ".join(missing))
    per_site = {}
    for s in used:
        others = [o for o in used if o != s]
        per_site[s] = dict(q, cells=np.concatenate([tables[o][0] for o in others]
                                                   or [np.zeros((0, 4), dtype=np.int64)]),
                           counts=np.concatenate([tables[o][1] for o in others]
                                                 or [np.zeros(0, dtype=np.int64)]))
    cross = ask_same_sites(transport, SURVIVAL_BOUNDS, per_site, used) if used else {}
    if cross:
        rounds(cross, "c-index bounds")
        _require(cross, "cindex.bound.totals", SURVIVAL_BOUNDS)
    within = [_counts(replies[s], "cindex.within") for s in used]
    parts = [cindex.BoundCounts(*np.asarray(cross[s].payload["cindex.bound.totals"],
                                            dtype=np.float64)) for s in used]
    bound = cindex.combine_bounds(within, parts)
    return {"concordance": bound.estimate, "concordance_method": "histogram bound",
            "concordance_bound": [bound.lower, bound.upper],
            "concordance_cells": {s: len(tables[s][1]) for s in used},
            "concordance_sites_missing": missing}
