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
   site's censoring times). Residual risk, stated plainly: when a single patient leaves a
   site's risk set between two consecutive global event times, the difference of the two
   released sums is that patient's (centred) covariate vector at that binned time. Exact
   pooled Cox needs these per-time sums (DESIGN.md); removing the residual risk needs
   secure aggregation across sites, which this version does not have. A hospital that
   cannot accept it sets a coarser `time_bin` or leaves `survival` out of its roles.
5. **C-index across sites**: the (binned time, score) of each event leaves the site only
   when its policy sets `allow_event_queries` (the server uses that mode only when every
   site does); otherwise it releases its events as a 2-D (time × score) count table over
   rectangles of the server's grid, cut no finer than its min_cell_count allows and under
   the full cell rule, and counts its own patients against the other sites' tables (which
   the server forwards pooled, without saying which site each rectangle came from; totals
   only come back). Within-site pair counts are totals.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from client.guard import PolicyRefusal, Statistic
from client.session import SiteSession
from client.validation import runs_of, site_scores
from shared import concordance as cindex
from shared import cox, disclosure
from shared.kaplan_meier import bin_times, local_time_table
from shared.labels import LabelError, her2_low_status
from shared.schema import Payload

NEEDS = "survival"
MAX_GROUP_LEVELS = 12
HER2_CLASS = "her2_class"  # derived: zero / low / positive (ASCO/CAP 2018, shared.labels)
HER2_CLASS_ORDER = ("zero", "low", "positive")
MODEL_PREFIXES = ("predicted:", "score:")  # a model's predicted label / its probability


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
    terms = _list(query.get("covariates"))
    present = np.ones(len(times), dtype=bool)
    for name in terms:
        values = column(session, name, query)
        if values is None:  # the server keeps the covariate only if other sites have it;
            out.append(Statistic(f"design.{name}", {"kind": "missing"}, n=None))
            continue  # then this site sits out of the Cox fit (no complete case)
        mask = values.notna().to_numpy()
        present &= mask
        if name == "label" or _is_numeric(values):
            x = pd.to_numeric(values[mask]).to_numpy(dtype=np.float64)
            out.append(Statistic(f"design.{name}", {"kind": "numeric", "n": int(mask.sum()),
                                                    "sum": float(x.sum())}, n=int(mask.sum()),
                                 patients=list(ids[mask]), family=f"survival.sum:{name}"))
        else:
            levels = sorted({str(v) for v in values[mask]})
            out.append(Statistic(f"design.{name}", {"kind": "categorical", "levels": levels},
                                 n=int(mask.sum()), patients=list(ids[mask]),
                                 family=f"survival.levels:{name}"))
    if terms:
        binned, step = cox_times(session, times[present])
        cohort_events = events[present]
        out.append(Statistic("cox.setup", {
            "event_times": np.unique(binned[cohort_events]),
            "totals": np.array([present.sum(), cohort_events.sum()], dtype=np.int64),
            "time_bin": float(step),
        }, n=int(present.sum()), counts=("totals",), patients=list(ids[present]),
            family="survival.km", grid=float(step)))  # its event times: a coarser KM table
    return out


def survival_cox(session: SiteSession, query: Payload) -> list[Statistic]:
    """A Newton round: risk-set and tied-death sums on the global event-time grid, for each
    candidate β in the query (see shared.cox.local_risk_set_sums for what they reveal)."""
    times, events, x, ids = _cox_data(session, query)
    grid = np.asarray(query["grid"], dtype=np.float64)
    betas = np.atleast_2d(np.asarray(query["betas"], dtype=np.float64))
    sums = cox.local_risk_set_sums(times, events, x, grid, betas)
    values = dict(sums.as_dict())
    values["totals"] = _totals(events)
    small = disclosure.small_risk_set_differences(
        times, grid, session.site.config.privacy.difference)
    return [Statistic("cox", values, n=len(times), counts=("totals",), patients=ids,
                      family=disclosure.query_family("survival.cox", query)),
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
    """Statistics over the Cox cohort, for the ledger: each a family of its own name and
    the query's parameters (β, the other sites' events or tables, the grid)."""
    return [replace(s, patients=ids, family=disclosure.query_family(f"survival.{s.name}", query))
            for s in stats]


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


def design_matrix(session: SiteSession, query: Payload) -> tuple[np.ndarray, np.ndarray]:
    """(x, mask): the centred design over the Cox cohort.

    The Cox cohort is the patients with every covariate of `cohort` that this site has (the
    covariates asked for in the setup round, so the cohort is the same in every round). The
    query names the model's terms (`terms`), each term's kind (`kind.<term>`: numeric or
    categorical), the non-reference levels of each categorical term (`levels.<term>`, one
    dummy column each, in order) and the centre of every column (`center`)."""
    rows = session.site.clinical
    columns, present = [], np.ones(len(rows), dtype=bool)
    for name in _list(query.get("cohort")):
        values = column(session, name, query)
        if values is not None:
            present &= values.notna().to_numpy()
    for term in _list(query.get("terms")):
        values = column(session, term, query)
        if values is None:
            raise ValueError(f"covariate {term!r} is not available at this site")
        present &= values.notna().to_numpy()
        if str(query[f"kind.{term}"]) == "numeric":
            columns.append(pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64))
        else:
            text = np.array([str(v) for v in values], dtype=object)
            columns += [(text == level).astype(np.float64)
                        for level in _list(query.get(f"levels.{term}"))]
    x = np.column_stack(columns) if columns else np.zeros((len(rows), 0))
    center = np.asarray(query.get("center", np.zeros(x.shape[1])), dtype=np.float64)
    if center.shape != (x.shape[1],):
        raise ValueError(f"center has shape {center.shape}; the design has {x.shape[1]} columns")
    return x[present] - center, present


def _cox_data(session: SiteSession, query: Payload
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Times (`cox_times`), events, centred design and patient ids of the Cox cohort."""
    times, events = _times(session, query)
    x, present = design_matrix(session, query)
    ids = list(session.site.clinical.index.astype(str)[present])
    return cox_times(session, times[present])[0], events[present], x, ids


def cox_times(session: SiteSession, times: np.ndarray) -> tuple[np.ndarray, float]:
    """The Cox cohort's binned times and their bin. Under `allow_risk_set_differences:
    false` the site's bin is raised (`shared.disclosure.coarsened_time_bin`) until no two
    successive released risk sets can differ by fewer than min_difference patients; when
    no bin does, the Cox queries are refused."""
    policy = session.site.config.privacy
    if policy.allow_risk_set_differences:
        return times, float(policy.time_bin)
    step = disclosure.coarsened_time_bin(times, policy.time_bin, policy.difference)
    if step is None:
        raise PolicyRefusal(f"allow_risk_set_differences is false and the Cox cohort's "
                            f"risk sets cannot differ by ≥ min_difference "
                            f"({policy.difference}) patients at any time bin")
    return bin_times(times, step), step


def _scores(session: SiteSession, query: Payload
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Binned times, events, risk scores x'β and ids of the Cox cohort. The score is summed
    element-wise (not by BLAS) so that equal rows give equal scores at every site."""
    times, events, x, ids = _cox_data(session, query)
    beta = np.asarray(query["beta"], dtype=np.float64)
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
    out = [Statistic("group", {"levels": levels}, n=int(known.sum()), patients=list(ids[known]),
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
