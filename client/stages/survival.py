"""Survival stage, site side: binned time tables, Cox risk-set sums, C-index pieces.

Every query of this stage carries `needs: survival`, so the site loads `dfs_time` and
`dfs_event` and excludes (and counts, naming them only in its own log) the patients whose
survival data are bad; none of them is sent anything about.

Disclosure policy of this stage (the site's `privacy:` block; a query cannot lower it):

1. **Time binning first.** Each time is rounded UP to a multiple of `time_bin` when it is
   read, before anything is computed from it (`time_bin: 0` = the hospital releases exact
   times). Every time that leaves the site is on that grid. A query that asks for other
   times — a `time_bin` different from the site's (0 = raw times) or `exact_times` — is
   refused as a whole (status `refused`), so the server cannot ask for finer times.
2. **min_patients** applies to every table: a time table or Cox/C-index statistic is
   computed over the site's patients of one group (or its whole survival cohort) and is
   refused when they are fewer than `min_patients`.
3. **min_cell_count** applies to the margins of every time-indexed table — its patients
   and its events (`totals`) — so a group with one or two events at a site (where a single
   relapse could be linked to a group attribute) is refused. It does **not** apply cell by
   cell along the time axis: per-time event and at-risk counts of 1 or 2 are what a
   Kaplan–Meier curve is made of, and refusing them would refuse every curve. Along time
   the control is the binning of point 1; the site chooses how coarse.
4. **Cox risk-set sums** are released on the global event-time grid only (not at the
   site's censoring times), over the site's own reading of the covariates (a numeric column
   stays numeric whatever `kind.<term>` says; the patients of a level held by fewer than
   min_cell_count sit out of the Cox cohort; a numeric column is never sent as level
   names), at points it bounds (each β gentle per SD of its columns and its weights e^{x'β}
   spread over ≥ min_patients; the centre near its values; the grid on its time bin) and
   within its memory bound (computed before anything is allocated). Under the default
   `allow_risk_set_differences: false` its times are grouped into runs
   (`shared.cox.released_times`) so that two successive released risk sets differ by 0 or
   ≥ min_difference patients, and the deaths at a released time and each categorical
   level among both number 0 or ≥ min_cell_count: no released sum or difference of sums is
   one patient's covariates, DFS bin and event. The pooled fit is exact on those times
   (lifelines on the pooled rows with each site's released times), not on the 30-day ones:
   with 40 patients a site releases few runs (one, with three categorical covariates).
   A site that sets `allow_risk_set_differences: true` releases on its own time_bin: exact
   Cox on it, and when a single patient leaves its risk set between two consecutive global
   event times, the difference of the two released sums is her (centred) covariate vector.
   Residual risk either way: many Cox queries at different gentle β over the same runs
   (each released: the same patient set) constrain the covariates within a run further.
   Every statistic over a set of the site's survival patients is one ledger family, so two
   Cox cohorts that differ by covariate completeness are not both released.
5. **C-index across sites**: the (binned time, score) of each event leaves the site only
   when its policy sets `allow_event_queries` (the server uses that mode only when every
   site does); otherwise it releases its events as a 2-D (time × score) count table over
   rectangles of the server's grid, cut no finer than its min_cell_count allows and under
   the full cell rule, and counts its own patients against the other sites' tables (which
   the server forwards pooled, without saying which site each rectangle came from; totals
   only come back). Within-site pair counts are totals.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from client.egress.guard import PolicyRefusal, Statistic
from client.site.session import SiteSession
from client.stages.validation import runs_of, site_scores
from shared import concordance as cindex
from shared import cox, disclosure
from shared.kaplan_meier import bin_times, local_time_table
from shared.labels import LabelError, her2_low_status
from shared.queries import bounds
from shared.schema import Payload

NEEDS = "survival"
MAX_GROUP_LEVELS = 12
HER2_CLASS = "her2_class"  # derived: zero / low / positive (ASCO/CAP 2018, shared.labels)
HER2_CLASS_ORDER = ("zero", "low", "positive")
MODEL_PREFIXES = ("predicted:", "score:")  # a model's predicted label / its probability
# Every statistic over a set of this site's survival patients (Kaplan–Meier tables, the
# covariate sums of the setup, Cox sums, C-index pieces) is one ledger family: two of them
# over sets differing by a few patients (a Cox cohort of the patients with a HER2 class next
# to one of all patients) would give those patients away, whatever the covariates are.
COHORT_FAMILY = "survival.km"
MAX_EXPONENT = 500.0  # |x'β| above this overflows e^{x'β} in the sums


# --------------------------------------------------------------------------- handlers


def survival_setup(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 1: the site's time policy, Kaplan–Meier tables (all, per group), what each
    covariate is (numeric: n and Σx for centring; categorical: its level names) and the
    binned event times of the Cox cohort (patients with every covariate this site has).
    """
    times, events = _times(session, query)
    policy, config = session.site.config.privacy, session.site.config
    ids = np.asarray(session.site.clinical.index.astype(str))
    out = [Statistic("site", {"time_bin": float(policy.time_bin), "time_unit": config.time_unit,
                              "allow_event_queries": bool(policy.allow_event_queries)}, n=None)]
    out.append(_km_statistic("km.all", times, events, ids, policy.time_bin))
    group = str(query.get("group", "") or "")
    if group:
        out += _group_statistics(session, group, times, events, query, ids)
    names = _list(query.get("covariates"))
    if names:
        out += _setup_covariates(session, names, query, times, events, ids)
    return out


def survival_cox(session: SiteSession, query: Payload) -> list[Statistic]:
    """A Newton round: risk-set and tied-death sums on the global event-time grid, for each
    candidate β in the query (see shared.cox.local_risk_set_sums for what they reveal).

    Before anything is computed: the memory the sums take (policy max_query_memory_mb), the
    grid (increasing, on the site's time bin), the design (`design_matrix`), and every β:
    gentle (policy max_coefficient per SD of the site's columns) and with weights e^{x'β}
    spread over ≥ min_patients of the Cox cohort (Kish's effective sample size)."""
    policy = session.site.config.privacy
    grid = np.asarray(query["grid"], dtype=np.float64).reshape(-1)
    betas = np.atleast_2d(np.asarray(query["betas"], dtype=np.float64))
    if betas.ndim != 2:
        raise PolicyRefusal(f"betas must be a matrix (candidates × columns), not of shape "
                            f"{betas.shape}")
    bounds.require_memory(cox.risk_set_elements(len(session.site.clinical), grid.size,
                                                *betas.shape),
                          policy.max_query_memory_mb, "survival_cox")
    _check_grid(grid, policy.time_bin)
    times, events, x, ids = _cox_data(session, query)
    if betas.shape[1] != x.shape[1]:
        raise PolicyRefusal(f"betas have {betas.shape[1]} columns, the design has {x.shape[1]}")
    _check_points(x, betas, session, "survival_cox")
    sums = cox.local_risk_set_sums(times, events, x, grid, betas)
    values = dict(sums.as_dict())
    values["totals"] = _totals(events)
    small = disclosure.small_risk_set_differences(times, grid, policy.difference)
    return [Statistic("cox", values, n=len(times), counts=("totals",), patients=ids,
                      family=COHORT_FAMILY),
            Statistic("risk_sets", {"small_differences": small}, n=None)]


def survival_events(session: SiteSession, query: Payload) -> list[Statistic]:
    """Exact C-index, first round: the (binned time, score) of each of the site's events,
    and its within-site pair counts. Only under `allow_event_queries`."""
    _require_event_queries(session)
    times, events, scores, ids = _scores(session, query)
    pairs = cindex.local_pair_counts(times, events, scores)
    return _on_cohort([
        Statistic("cindex.events", {"time": times[events], "score": scores[events]},
                  n=len(times), counts=()),
        _pairs_statistic("cindex.within", pairs, times, events),
    ], ids, query)


def survival_pairs(session: SiteSession, query: Payload) -> list[Statistic]:
    """Exact C-index, second round: totals of this site's patients paired with the other
    sites' events in the query. Only under `allow_event_queries`."""
    _require_event_queries(session)
    times, events, scores, ids = _scores(session, query)
    pairs = cindex.local_cross_counts(times, events, scores,
                                      np.asarray(query["event_time"], dtype=np.float64),
                                      np.asarray(query["event_score"], dtype=np.float64))
    return _on_cohort([_pairs_statistic("cindex.cross", pairs, times, events)], ids, query)


def survival_histograms(session: SiteSession, query: Payload) -> list[Statistic]:
    """Bounded C-index, first round: within-site pair counts and the site's events as a
    count table over rectangles of the server's grid, cut no finer than this site's
    min_cell_count allows (the guard then checks every cell)."""
    time_edges, score_edges = (np.asarray(query[k]).reshape(-1)
                               for k in ("time_edges", "score_edges"))
    cells = (time_edges.size + 2) * (score_edges.size + 2)  # the count table, its running sums
    bounds.require_memory([4 * cells], session.site.config.privacy.max_query_memory_mb,
                          "survival_histograms")
    times, events, scores, ids = _scores(session, query)
    cells, counts = cindex.local_event_partition(
        times, events, scores, np.asarray(query["time_edges"], dtype=np.float64),
        np.asarray(query["score_edges"], dtype=np.float64),
        session.site.config.privacy.min_cell_count)
    return _on_cohort([
        _pairs_statistic("cindex.within", cindex.local_pair_counts(times, events, scores),
                         times, events),
        Statistic("cindex.table", {"cells": cells, "counts": counts}, n=len(times),
                  counts=("counts",)),
    ], ids, query)


def survival_bounds(session: SiteSession, query: Payload) -> list[Statistic]:
    """Bounded C-index, second round: this site's patients, exactly, against the other
    sites' event tables in the query; seven totals (shared.concordance.BoundCounts)."""
    rectangles = np.asarray(query["cells"]).size // 4
    # about twelve (rectangle × patient) masks and products, one byte each
    bounds.require_memory([12 * rectangles * len(session.site.clinical)],
                          session.site.config.privacy.max_query_memory_mb, "survival_bounds",
                          itemsize=1)
    times, events, scores, ids = _scores(session, query)
    bound = cindex.local_bound_counts(
        times, events, scores, np.asarray(query["time_edges"], dtype=np.float64),
        np.asarray(query["score_edges"], dtype=np.float64),
        np.asarray(query["cells"], dtype=np.int64).reshape(-1, 4),
        np.asarray(query["counts"], dtype=np.int64).reshape(-1))
    return _on_cohort([Statistic("cindex.bound", {"totals": bound.as_array(),
                                                  "cohort": _totals(events)},
                                 n=len(times), counts=("cohort",))], ids, query)


def _on_cohort(stats: list[Statistic], ids: list[str], query: Payload) -> list[Statistic]:
    """Statistics over the Cox cohort, for the ledger: one family with every statistic
    over this site's survival patients (`COHORT_FAMILY`), whatever β or grid they are on."""
    del query  # the family is the patient set's, not the query's parameters
    return [replace(s, patients=ids, family=COHORT_FAMILY) for s in stats]


# --------------------------------------------------------------------------- data


def column(session: SiteSession, name: str, query: Payload) -> pd.Series | None:
    """A covariate or grouping column by name (index: the site's patients; missing values
    as NaN/None): a clinical.csv column, `label` (the task label), `her2_class`, or a
    model's output at this site: `score:<model>` its probability, `predicted:<model>` 1
    where it is ≥ the query's `threshold.<model>`, else 0 (from the site's own prediction
    files; a patient without a score has a missing value)."""
    rows = session.site.clinical
    if name.startswith(MODEL_PREFIXES):
        return _model_output(session, name, query)
    if name == "label":
        return pd.Series(session.labels(), index=rows.index, dtype=np.float64)
    if name == HER2_CLASS:
        if "her2_ihc" not in rows:
            return None
        ish = rows["her2_ish"] if "her2_ish" in rows else pd.Series(None, index=rows.index)
        return pd.Series([_her2_class(i, s) for i, s in zip(rows["her2_ihc"], ish, strict=True)],
                         index=rows.index, dtype=object)
    if name not in rows.columns or name in (
            "patient_id", "dfs_time", "dfs_event", "target"):
        return None
    values = rows[name]
    if _is_numeric(values):
        return pd.to_numeric(values, errors="coerce")
    return values.where(values.notna(), None).astype(object)


def _model_output(session: SiteSession, name: str, query: Payload) -> pd.Series | None:
    kind, _, model = name.partition(":")
    found = site_scores(session, runs_of(query), [model])
    if model not in found:
        return None
    scores = pd.Series(found[model].score, index=found[model].patients)
    scores = scores.reindex(session.site.clinical.index)
    if kind == "score":
        return scores
    threshold = float(query[f"threshold.{model}"])
    return (scores >= threshold).astype(np.float64).where(scores.notna())


def _her2_class(ihc: object, ish: object) -> str | None:
    try:
        return her2_low_status(ihc, ish)
    except LabelError:
        return None


def _times(session: SiteSession, query: Payload) -> tuple[np.ndarray, np.ndarray]:
    """Binned times and event flags of the site's survival cohort, after the time check."""
    policy = session.site.config.privacy
    if "time_bin" in query and float(query["time_bin"]) != float(policy.time_bin):
        asked = float(query["time_bin"])
        what = "exact times" if asked == 0 else f"time_bin {asked:g}"
        raise PolicyRefusal(f"query asks for {what}; this site's policy releases survival "
                            f"times only rounded up to time_bin {policy.time_bin:g}")
    if query.get("exact_times") and policy.time_bin > 0:
        raise PolicyRefusal(f"query asks for exact times; this site's policy releases survival "
                            f"times only rounded up to time_bin {policy.time_bin:g}")
    rows = session.site.clinical
    times = bin_times(rows["dfs_time"].to_numpy(dtype=np.float64), policy.time_bin)
    events = rows["dfs_event"].to_numpy(dtype=np.int64).astype(bool)
    return times, events


@dataclass(frozen=True)
class Covariates:
    """The covariates a query names, read as this site holds them (never as the query
    says) over its survival patients: `present` marks the Cox cohort (every covariate the
    site has known, and no level held by fewer than min_cell_count of the cohort)."""

    present: np.ndarray
    numeric: dict[str, np.ndarray]  # a numeric column's values (NaN = missing)
    text: dict[str, np.ndarray]  # a categorical column's level names (str)
    levels: dict[str, list[str]]  # the levels held by ≥ min_cell_count of the cohort
    merged: dict[str, str]  # a categorical column with rarer levels: why they sit out
    missing: list[str]  # named, but not a column of this site

    def level_matrix(self) -> np.ndarray:
        """One 0/1 column per counted level of every categorical covariate, over the cohort."""
        columns = [(self.text[name][self.present] == level).astype(np.float64)
                   for name in self.text for level in self.levels[name]]
        n = int(self.present.sum())
        return np.column_stack(columns) if columns else np.zeros((n, 0))


def covariates(session: SiteSession, names: list[str], query: Payload,
               events: np.ndarray) -> Covariates:
    """Each named covariate as its own column type at this site; the patients of a level
    held by fewer than min_cell_count of the cohort, or with 1 … min_cell_count−1 deaths
    in it, sit out of the cohort (as if the value were missing: a level of one patient
    makes her dummy column her row, one death of a level makes a tied-death sum hers),
    until every level left is held by ≥ min_cell_count with 0 or ≥ min_cell_count deaths."""
    present = np.ones(len(session.site.clinical), dtype=bool)
    numeric: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for name in dict.fromkeys(names):
        values = column(session, name, query)
        if values is None:
            missing.append(name)
            continue
        present &= values.notna().to_numpy()
        if name == "label" or _is_numeric(values):
            numeric[name] = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        else:
            text[name] = np.array([str(v) for v in values], dtype=object)
    cells = session.site.config.privacy.min_cell_count
    own_bins = session.site.config.privacy.allow_risk_set_differences  # no runs
    merged: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name, values in text.items():
            levels, counts = np.unique(values[present].astype(str), return_counts=True)
            rare = levels[counts < cells]
            if not own_bins:  # the level's tied-death sums are released by runs: 0 or ≥ cells
                died = np.array([np.sum(events[present] & (values[present] == v))
                                 for v in levels])
                rare = levels[(counts < cells) | ((died > 0) & (died < cells))]
            if rare.size:
                present &= ~np.isin(values.astype(str), rare)
                merged[name] = (f"levels held by fewer than min_cell_count ({cells}) patients "
                                "here, or with fewer such deaths, are left out of the Cox "
                                "cohort")
                changed = True
    levels = {name: sorted({str(v) for v in values[present]}) for name, values in text.items()}
    return Covariates(present, numeric, text, levels, merged, missing)


def _setup_covariates(session: SiteSession, names: list[str], query: Payload,
                      times: np.ndarray, events: np.ndarray, ids: np.ndarray
                      ) -> list[Statistic]:
    """What each covariate is at this site, over the Cox cohort (the patients with every
    covariate this site has): numeric with its n and Σx (for centring), or categorical with
    the names of the levels ≥ min_cell_count of them hold (a numeric column is never sent
    as level names). Then the Cox cohort's event times on its released time step."""
    cov = covariates(session, names, query, events)
    present = cov.present
    n, members = int(present.sum()), list(ids[present])
    out = [Statistic(f"design.{name}", {"kind": "missing"}, n=None) for name in cov.missing]
    for name in names:
        if name in cov.numeric:
            values = {"kind": "numeric", "n": n, "sum": float(cov.numeric[name][present].sum())}
        elif name in cov.text:
            values = {"kind": "categorical", "levels": cov.levels[name]}
            if name in cov.merged:
                values["merged"] = cov.merged[name]
        else:
            continue
        out.append(Statistic(f"design.{name}", values, n=n, patients=members,
                             family=COHORT_FAMILY))
    try:
        binned, step = cox_times(session, times[present], events[present], cov.level_matrix())
    except PolicyRefusal as err:  # no Cox here; the Kaplan–Meier tables still leave
        return [*out, Statistic("cox.setup", {}, n=n, refused=str(err))]
    cohort_events = events[present]
    out.append(Statistic("cox.setup", {
        "event_times": np.unique(binned[cohort_events]),
        "totals": np.array([n, cohort_events.sum()], dtype=np.int64),
        "time_bin": float(step),
    }, n=n, counts=("totals",), patients=members, family=COHORT_FAMILY,
        grid=float(step)))  # its event times: a coarser KM table
    return out


def design_matrix(session: SiteSession, query: Payload,
                  events: np.ndarray) -> tuple[np.ndarray, Covariates]:
    """(x, covariates): the centred design over the Cox cohort.

    The Cox cohort is the patients with every covariate of `cohort` and `terms` that this
    site has (`covariates`; the server names the covariates of the setup round, so the
    cohort is the same in every round). Each term is read as the site holds it: a
    `kind.<term>` that says otherwise, or levels for a numeric column, are refused. A
    categorical term has one dummy column per level of `levels.<term>` (a level the site
    does not count is a column of zeros); `center` is checked against the site's columns."""
    terms = _list(query.get("terms"))
    cov = covariates(session, [*_list(query.get("cohort")), *terms], query, events)
    columns = []
    for term in terms:
        if term in cov.missing:
            raise ValueError(f"covariate {term!r} is not available at this site")
        kind = "numeric" if term in cov.numeric else "categorical"
        asked = query.get(f"kind.{term}")
        if asked is not None and str(asked) != kind:
            raise PolicyRefusal(f"covariate {term!r} is {kind} at this site; the query calls "
                                f"it {asked} (a site reads each column as its own type)")
        if kind == "numeric":
            if f"levels.{term}" in query:
                raise PolicyRefusal(f"covariate {term!r} is numeric at this site; its values "
                                    "are not levels")
            columns.append(cov.numeric[term])
        else:
            columns += [(cov.text[term] == level).astype(np.float64)
                        for level in _list(query.get(f"levels.{term}"))]
    x = np.column_stack(columns)[cov.present] if columns else np.zeros((int(cov.present.sum()), 0))
    center = np.asarray(query.get("center", np.zeros(x.shape[1])), dtype=np.float64)
    if center.shape != (x.shape[1],):
        raise PolicyRefusal(f"center has shape {center.shape}; the design has {x.shape[1]} "
                            "columns")
    _check_center(center, x)
    return x - center, cov


CENTER_REACH = 10.0  # a centre lies within this many times a column's scale of its values


def _check_center(center: np.ndarray, x: np.ndarray) -> None:
    """A centre within reach of the site's values of its column: the pooled mean of any
    honest split is (a site whose column is constant 0 included), a far one would only
    lose the sums' precision or overflow e^{x'β}. A centre adds no information (the server
    knows it), so the bound is loose: CENTER_REACH × max(range, |min|, |max|, 1)."""
    if not np.all(np.isfinite(center)):
        raise PolicyRefusal("center holds a value that is not finite")
    if not len(x):
        return
    lo, hi = x.min(axis=0), x.max(axis=0)
    reach = CENTER_REACH * np.maximum.reduce([hi - lo, np.abs(lo), np.abs(hi),
                                              np.ones_like(lo)])
    if np.any(center < lo - reach) or np.any(center > hi + reach):
        raise PolicyRefusal(f"center lies further than {CENTER_REACH:g} times a column's scale "
                            "from this site's values of it")


def _check_grid(grid: np.ndarray, time_bin: float) -> None:
    """A Cox grid is the union of the sites' binned event times: finite, increasing, and on
    this site's time bin (finer points would only split no risk set here, but say the
    server is not asking what a study asks)."""
    if not np.all(np.isfinite(grid)) or np.any(grid < 0) or np.any(np.diff(grid) <= 0):
        raise PolicyRefusal("the Cox grid must be finite, ≥ 0 and strictly increasing")
    if time_bin > 0:
        ratio = grid / time_bin
        if not np.allclose(ratio, np.round(ratio), rtol=0, atol=1e-9):
            raise PolicyRefusal(f"the Cox grid has times that are not multiples of this "
                                f"site's time_bin ({time_bin:g})")


def _check_points(x: np.ndarray, betas: np.ndarray, session: SiteSession, what: str) -> None:
    """Each candidate β: gentle (max_coefficient per SD of the site's design columns), no
    overflow of e^{x'β}, and weights spread over ≥ min_patients of the Cox cohort (a steep
    β makes one patient's row the whole risk-set sum)."""
    policy = session.site.config.privacy
    sd = x.std(axis=0) if len(x) else np.ones(x.shape[1])
    bounds.require_gentle(betas, sd, policy.max_coefficient, what)
    if not len(x):
        return
    scores = x @ np.atleast_2d(betas).T  # (n, m)
    if np.any(np.abs(scores) > MAX_EXPONENT):
        raise PolicyRefusal(f"{what}: x'β beyond ±{MAX_EXPONENT:g} at this site (e^{{x'β}} "
                            "would overflow)")
    # e^{x'β} over n patients with a linear predictor of sd σ has an effective sample size
    # of about n·e^{-σ²}: a real fit (hazard ratios up to ~3 per sd of x'β) keeps more than
    # n / 3, while a crafted β that puts the sums on one or two patients does not.
    spread = max(2.0, min(float(policy.min_patients), len(x) / 3))
    for lp in scores.T:
        bounds.require_spread(np.exp(lp - lp.max()), spread, what)


def _cox_data(session: SiteSession, query: Payload
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Times (`cox_times`), events, centred design and patient ids of the Cox cohort."""
    times, events = _times(session, query)
    x, cov = design_matrix(session, query, events)
    present = cov.present
    ids = list(session.site.clinical.index.astype(str)[present])
    binned, _ = cox_times(session, times[present], events[present], cov.level_matrix())
    return binned, events[present], x, ids


def cox_times(session: SiteSession, times: np.ndarray, events: np.ndarray,
              levels: np.ndarray) -> tuple[np.ndarray, float]:
    """The Cox cohort's binned times and their bin.

    Under `allow_risk_set_differences: false` (the default) the binned times are grouped
    into runs (`shared.cox.released_times`) so that, on any grid, two successive risk sets
    differ by 0 or ≥ min_difference patients, the deaths at a time are 0 or ≥
    min_cell_count, and so are each categorical level's patients among both: then no
    released sum or difference of sums is one patient's covariates, DFS bin and event. The
    bin reported stays the site's time_bin (the runs' ends are on it). When no grouping
    does, the Cox queries are refused. Under `true` the site's own time_bin is used: the
    pooled fit is exact on it, and a bin's single leaver is her row (the site accepts
    that)."""
    policy = session.site.config.privacy
    if policy.allow_risk_set_differences:
        return times, float(policy.time_bin)
    released = cox.released_times(times, events, levels, policy.difference,
                                  policy.min_cell_count)
    if released is None:
        raise PolicyRefusal(f"the Cox cohort's risk sets cannot differ by ≥ min_difference "
                            f"({policy.difference}) patients with deaths and levels in cells of "
                            f"≥ min_cell_count ({policy.min_cell_count}) at any grouping of "
                            "its times (allow_risk_set_differences is false)")
    return released, float(policy.time_bin)


def _scores(session: SiteSession, query: Payload
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Binned times, events, risk scores x'β and ids of the Cox cohort. The score is summed
    element-wise (not by BLAS) so that equal rows give equal scores at every site. β is
    checked as a Newton round's is."""
    times, events, x, ids = _cox_data(session, query)
    beta = np.asarray(query["beta"], dtype=np.float64).reshape(-1)
    if beta.shape != (x.shape[1],):
        raise PolicyRefusal(f"beta has {beta.size} values, the design has {x.shape[1]} columns")
    _check_points(x, beta, session, "the C-index's β")
    return times, events, (x * beta).sum(axis=1), ids


def _require_event_queries(session: SiteSession) -> None:
    if not session.site.config.privacy.allow_event_queries:
        raise PolicyRefusal("event queries are not allowed by this site's policy "
                            "(privacy.allow_event_queries is false)")


# --------------------------------------------------------------------------- statistics


def _totals(events: np.ndarray) -> np.ndarray:
    return np.array([len(events), int(np.sum(events))], dtype=np.int64)


def _km_statistic(name: str, times: np.ndarray, events: np.ndarray, ids: np.ndarray,
                  time_bin: float) -> Statistic:
    """A Kaplan–Meier time table. Every group's table is one family with the site's whole
    cohort: a group of all patients but a few, next to the whole table, is refused."""
    table = local_time_table(times, events)
    return Statistic(name, {"time": table.time, "at_risk": table.at_risk,
                            "events": table.events, "totals": _totals(events)},
                     n=len(times), counts=("totals",), patients=list(ids),
                     family="survival.km", grid=float(time_bin))


def _group_statistics(session: SiteSession, group: str, times: np.ndarray,
                      events: np.ndarray, query: Payload, ids: np.ndarray) -> list[Statistic]:
    values = column(session, group, query)
    if values is None:
        return [Statistic("group", {"missing": True}, n=None)]
    text = np.array([_level_text(v) for v in values], dtype=object)
    known = np.array([v is not None for v in text], dtype=bool)
    levels = sorted({str(v) for v in text[known]})
    if len(levels) > MAX_GROUP_LEVELS:
        return [Statistic("group", {"error": f"{group!r} has more than {MAX_GROUP_LEVELS} "
                                             "values here; not a grouping column"}, n=None)]
    # a level names a value only when ≥ min_cell_count patients hold it (a rarer one, of a
    # numeric column above all, would name one patient's value); its patients join no group
    cells = session.site.config.privacy.min_cell_count
    held = {level: int(np.sum(text[known] == level)) for level in levels}
    values = {"levels": [v for v in levels if held[v] >= cells]}
    if len(values["levels"]) < len(levels):
        values["merged"] = (f"values held by fewer than min_cell_count ({cells}) patients "
                            "here are in no group")
    levels = values["levels"]
    out = [Statistic("group", values, n=int(known.sum()), patients=list(ids[known]),
                     family=f"survival.group:{group}")]
    time_bin = session.site.config.privacy.time_bin
    for i, level in enumerate(levels):
        mask = known & (text == level)
        out.append(_km_statistic(f"km.g{i}", times[mask], events[mask], ids[mask], time_bin))
    return out


def _pairs_statistic(name: str, pairs: cindex.PairCounts, times: np.ndarray,
                     events: np.ndarray) -> Statistic:
    return Statistic(name, {"concordant": int(pairs.concordant), "tied": int(pairs.tied),
                            "comparable": int(pairs.comparable), "totals": _totals(events)},
                     n=len(times), counts=("totals",))


def _level_text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _is_numeric(values: pd.Series) -> bool:
    present = values.dropna()
    present = present[present.astype(str).str.strip() != ""]
    return len(present) > 0 and pd.to_numeric(present, errors="coerce").notna().all()


def _list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]
