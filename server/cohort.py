"""Cohort stage, server side: per-site and pooled cohort table by label, with tests.

Round 1 collects label counts, group sums and level tables; round 2 the sums of squares
around the pooled group means. Everything pooled is exact against the pooled rows for the
sites whose statistics the guard released; a covariate missing a site's piece says which.

Round 2 depends on the site set (the pooled means), so it runs in `on_stable_sites`: when a
site drops in round 2, the pooled tables are recomputed on the survivors (their round-1
sums still hold; round 2 is asked again around the survivors' means) and `restarts` says so.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from server.progress import report_round
from server.transport import Reply, StageError, Transport, ask_same_sites, on_stable_sites
from shared import cohort, schema
from shared.config import StudyConfig
from shared.schema import COHORT_SQUARES, COHORT_SUMS, nest

log = logging.getLogger("feddlr")

GROUP_NAMES = {
    "her2-positive": ["HER2-negative", "HER2-positive"],
    "her2-low": ["HER2-zero", "HER2-low"],
    "label": ["label 0", "label 1"],
}


def run_cohort(transport: Transport, config: StudyConfig, sites: list[str]) -> dict[str, Any]:
    query = {"task": config.task, "covariates": list(config.cohort_covariates)}
    first = transport.ask(COHORT_SUMS, query, sites)
    report_round("cohort", 1, 2, first)
    answered = [s for s in sites if first[s].ok]
    if len(answered) < config.min_replies:
        raise StageError(f"{len(answered)} site(s) answered round 1 of {len(sites)} asked, "
                         f"min-replies is {config.min_replies}")
    numeric, categorical = _split_covariates(config.cohort_covariates, first, answered)

    def tables(used: list[str]) -> dict[str, Any]:
        """The pooled cohort table over exactly `used` (round 2 asked of them alone)."""
        means = {name: _pooled_means(first, used, name) for name in numeric}
        asked = {f"means.{name}": m[1] for name, m in means.items() if m[2]}
        second = ask_same_sites(transport, COHORT_SQUARES, dict(query, **asked), used) \
            if asked else {}
        if second:
            report_round("cohort", 2, 2, second)
        out: dict[str, Any] = {"n": _label_counts(first, used), "covariates": {}}
        for name in numeric:
            out["covariates"][name] = _numeric_table(name, first, second, used, means[name])
        for name in categorical:
            out["covariates"][name] = _categorical_table(name, first, used)
        return out

    pooled, restarts = on_stable_sites(tables, answered, min_sites=config.min_sites,
                                       stage="cohort")
    site_info = {s: {"status": first[s].status, "reason": first[s].reason} for s in sites}
    for restart in restarts:
        for s, reason in restart["dropped"].items():
            site_info[s] = {"status": schema.STATUS_DROPPED,
                            "reason": f"dropped in round 2 ({reason}); tables recomputed "
                                      "without it"}
    used = [s for s in answered if site_info[s]["status"] == schema.STATUS_OK]
    return {"task": config.task, "groups": GROUP_NAMES[config.task], **pooled,
            "sites": site_info, "sites_used": used, "restarts": restarts}


def _split_covariates(names: tuple[str, ...], replies: dict[str, Reply],
                      sites: list[str]) -> tuple[list[str], list[str]]:
    numeric, categorical = [], []
    for name in names:
        kinds = set()
        for s in sites:
            payload = replies[s].payload
            for kind in ("numeric", "categorical"):
                if any(k.startswith((f"{kind}.{name}.", f"refused.{kind}.{name}"))
                       for k in payload):
                    kinds.add(kind)
        if kinds == {"numeric"}:
            numeric.append(name)
        elif kinds == {"categorical"}:
            categorical.append(name)
        elif kinds:
            log.warning("cohort: covariate %s is numeric at some sites and text at others; "
                        "skipped", name)
    return numeric, categorical


def _label_counts(replies: dict[str, Reply], sites: list[str]) -> dict[str, Any]:
    per_site = {}
    for s in sites:
        counts = replies[s].payload.get("labels.n")
        per_site[s] = None if counts is None else [int(c) for c in counts]
    released = [c for c in per_site.values() if c is not None]
    pooled = np.sum(released, axis=0).tolist() if released else None
    missing = [s for s, c in per_site.items() if c is None]
    return {"pooled": pooled, "sites": per_site, "sites_missing": missing}


def _group_sums(reply: Reply, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(n, Σx) per group from a site, or None when any group was refused."""
    parts = [nest(reply.payload, f"numeric.{name}.g{g}") for g in (0, 1)]
    if any("n" not in p for p in parts):
        return None
    return (np.array([p["n"] for p in parts], dtype=np.int64),
            np.array([p["sum"] for p in parts], dtype=np.float64))


def _pooled_means(replies: dict[str, Reply], sites: list[str],
                  name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    sums = {s: _group_sums(replies[s], name) for s in sites}
    used = [s for s, v in sums.items() if v is not None]
    n, mean = cohort.combine_means([sums[s][0] for s in used], [sums[s][1] for s in used])
    return n, mean, used


def _numeric_table(name: str, first: dict[str, Reply], second: dict[str, Reply],
                   sites: list[str], means: tuple[np.ndarray, np.ndarray, list[str]]) -> dict:
    n, mean, used = means
    squares = {}
    for s in used:
        reply = second.get(s)
        parts = [nest(reply.payload, f"squares.{name}.g{g}") for g in (0, 1)] if reply else []
        if reply is not None and reply.ok and all("ss" in p for p in parts):
            squares[s] = np.array([p["ss"] for p in parts], dtype=np.float64)
    complete = [s for s in used if s in squares]
    if not complete:  # every site refused (or lacks) this covariate's sums or squares
        return {"type": "numeric", "n": None, "mean": None, "sd": None, "t_test": None,
                "welch": None, "sites_missing": list(sites), "sites": {},
                "reason": "no site released its sums and squares (site policy)"}
    if complete != used:  # a site released sums but not squares: pool the others exactly,
        n, new_mean, _ = _pooled_means(first, complete, name)  # re-centring their squares
        squares = {s: cohort.recenter_squares(squares[s], *_group_sums(first[s], name), mean,
                                              new_mean) for s in complete}
        mean = new_mean
    pooled = cohort.combine_moments(n, mean, [squares[s] for s in complete])
    entry = {"type": "numeric", **_moments_entry(pooled),
             "sites_missing": [s for s in sites if s not in complete], "sites": {}}
    for s in complete:
        site_n, site_sum = _group_sums(first[s], name)
        entry["sites"][s] = _moments_entry(cohort.site_moments(site_n, site_sum, squares[s], mean))
    return entry


def _moments_entry(m: cohort.GroupMoments) -> dict[str, Any]:
    student, welch = cohort.student_t(m), cohort.welch_t(m)
    return {
        "n": [int(v) for v in m.n],
        "mean": [float(v) for v in m.mean],
        "sd": [float(v) for v in m.sd],
        "t_test": {"statistic": student.statistic, "p_value": student.p_value, "df": student.df},
        "welch": {"statistic": welch.statistic, "p_value": welch.p_value, "df": welch.df},
    }


def _categorical_table(name: str, replies: dict[str, Reply], sites: list[str]) -> dict:
    tables = {}
    for s in sites:
        part = nest(replies[s].payload, f"categorical.{name}")
        if "table" in part:
            levels = part["levels"] if isinstance(part["levels"], list) else [part["levels"]]
            tables[s] = ([str(v) for v in levels], np.asarray(part["table"]).reshape(-1, 2))
    levels, pooled = cohort.combine_level_counts(list(tables.values()))
    entry = {"type": "categorical", **_table_entry(levels, pooled),
             "sites_missing": [s for s in sites if s not in tables], "sites": {}}
    for s, (site_levels, table) in tables.items():
        entry["sites"][s] = _table_entry(site_levels, table)
    return entry


def _table_entry(levels: list[str], table: np.ndarray) -> dict[str, Any]:
    test = cohort.chi_square(table)
    return {
        "levels": levels,
        "counts": np.asarray(table).astype(int).tolist(),
        "chi2": {"statistic": test.statistic, "p_value": test.p_value, "dof": test.dof,
                 "yates": test.yates},
    }
