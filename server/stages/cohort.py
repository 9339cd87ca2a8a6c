"""Cohort stage, server side: per-site and pooled cohort table by label, with tests.

Round 1 collects label counts, group sums, whole-number flags and level tables; round 2 the
sums of squares around the pooled group means; round 3 each numeric covariate's label
histograms on a grid built from the pooled mean and sd, for median (Q1, Q3) and the
Mann–Whitney U test. Moments are exact against the pooled rows for the sites whose
statistics the guard released; quantiles and U are exact when every released cell holds
one value, else bounded (`shared.cohort.combine_quantiles`, `combine_mann_whitney`). A
covariate missing a site's piece says which.

Rounds 2 and 3 depend on the site set (the pooled means, the grid), so they run in
`on_stable_sites`: when a site drops in either, the pooled tables are recomputed on the
survivors (their round-1 sums still hold; rounds 2 and 3 are asked again) and `restarts`
says so.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from server.core.progress import report_round
from server.core.transport import (
    Reply,
    StageError,
    Transport,
    answered,
    ask_same_sites,
    on_stable_sites,
)
from shared import cohort, schema
from shared.config import StudyConfig
from shared.schema import COHORT_HISTOGRAMS, COHORT_SQUARES, COHORT_SUMS, nest

log = logging.getLogger("feddlr")

NUMERIC_TESTS = ("t_test", "welch", "mann_whitney")
QUANTILE_KEYS = {"q1": 0, "median": 1, "q3": 2}  # index into cohort.QUANTILES
GROUP_NAMES = {
    "her2-positive": ["HER2-negative", "HER2-positive"],
    "her2-low": ["HER2-zero", "HER2-low"],
    "label": ["label 0", "label 1"],
}


def run_cohort(transport: Transport, config: StudyConfig, sites: list[str]) -> dict[str, Any]:
    query = {"task": config.task, "covariates": list(config.cohort_covariates)}
    first = transport.ask(COHORT_SUMS, query, sites)
    report_round("cohort", 1, 3, first)
    ok = answered(first, sites, min_replies=config.min_replies, what="round 1")
    numeric, categorical = _split_covariates(config.cohort_covariates, first, ok)
    left_out = {name: "no site has a value of it in clinical.csv"  # said, never dropped silently
                for name in config.cohort_covariates if name not in (*numeric, *categorical)}

    def tables(used: list[str]) -> dict[str, Any]:
        """The pooled cohort table over exactly `used` (rounds 2 and 3 asked of them alone)."""
        means = {name: _pooled_means(first, used, name) for name in numeric}
        asked = {f"means.{name}": m[1] for name, m in means.items() if m[2]}
        second = ask_same_sites(transport, COHORT_SQUARES, dict(query, **asked), used) \
            if asked else {}
        if second:
            report_round("cohort", 2, 3, second)
        out: dict[str, Any] = {"n": _label_counts(first, used), "covariates": {}}
        for name in numeric:
            out["covariates"][name] = _numeric_table(name, first, second, used, means[name])
        _rank_round(transport, query, {name: out["covariates"][name] for name in numeric},
                    first, used)
        for name in categorical:
            out["covariates"][name] = _categorical_table(name, first, used)
        return out

    pooled, restarts = on_stable_sites(tables, ok, min_sites=config.min_sites,
                                       stage="cohort", min_replies=config.min_replies)
    site_info = {s: {"status": first[s].status, "reason": first[s].reason} for s in sites}
    for restart in restarts:
        for s, reason in restart["dropped"].items():
            round_no = 3 if restart["action"] == COHORT_HISTOGRAMS else 2
            site_info[s] = {"status": schema.STATUS_DROPPED,
                            "reason": f"dropped in round {round_no} ({reason}); tables "
                                      "recomputed without it"}
    used = [s for s in ok if site_info[s]["status"] == schema.STATUS_OK]
    return {"task": config.task, "groups": GROUP_NAMES[config.task], **pooled,
            "sites": site_info, "sites_used": used, "restarts": restarts, "left_out": left_out}


def _split_covariates(names: tuple[str, ...], replies: dict[str, Reply],
                      sites: list[str]) -> tuple[list[str], list[str]]:
    numeric, categorical = [], []
    for name in names:
        kinds: dict[str, list[str]] = {}
        for s in sites:
            payload = replies[s].payload
            for kind in ("numeric", "categorical"):
                if any(k.startswith((f"{kind}.{name}.", f"refused.{kind}.{name}"))
                       for k in payload):
                    kinds.setdefault(kind, []).append(s)
        if set(kinds) == {"numeric"}:
            numeric.append(name)
        elif set(kinds) == {"categorical"}:
            categorical.append(name)
        elif kinds:  # one site reads it otherwise: neither reading is dropped or guessed
            raise StageError(f"covariate {name!r} is numeric at {', '.join(kinds['numeric'])} "
                             f"and text at {', '.join(kinds['categorical'])}; the sites must "
                             "read it alike (`feddlr check-site` at each)")
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
                "welch": None, "tests": list(NUMERIC_TESTS), "sites_missing": list(sites),
                "sites": {}, "reason": "no site released its sums and squares (site policy)"}
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
        "tests": list(NUMERIC_TESTS),
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
        "tests": ["chi2"],
    }


def _rank_round(transport: Transport, query: dict[str, Any], numeric: dict[str, dict],
                first: dict[str, Reply], used: list[str]) -> None:
    """Round 3: each site's label histograms on every numeric covariate's grid (asked of
    exactly `used`); adds median (Q1, Q3) and Mann–Whitney U to the `numeric` entries."""
    grids = {name: _grid(entry, first, used, name) for name, entry in numeric.items()}
    grids = {name: edges for name, edges in grids.items() if edges is not None}
    asked = {f"edges.{name}": edges for name, edges in grids.items()}
    third = ask_same_sites(transport, COHORT_HISTOGRAMS, dict(query, **asked), used) \
        if grids else {}
    if third:
        report_round("cohort", 3, 3, third)
    for name, entry in numeric.items():
        _add_ranks(entry, name, first, third, used, grids.get(name))


def _grid(entry: dict, first: dict[str, Reply], sites: list[str], name: str) -> np.ndarray | None:
    """The shared grid of a numeric covariate from its pooled moments; unit bins only when
    every site that said has whole-number values."""
    if entry.get("n") is None:
        return None
    moments = cohort.GroupMoments(np.asarray(entry["n"]), np.asarray(entry["mean"]),
                                  np.asarray(entry["sd"]))
    flags = [_is_integer(first[s], name) for s in sites]
    released = [f for f in flags if f is not None]
    return cohort.grid_edges(*cohort.pooled_spread(moments), bool(released) and all(released))


def _is_integer(reply: Reply, name: str) -> bool | None:
    flag = reply.payload.get(f"integer.{name}.flag")
    return None if flag is None else bool(flag)


def _site_cells(reply: Reply | None, name: str, edges: np.ndarray,
                integer: bool) -> list[cohort.CellRanges] | None:
    """A site's cells of both label groups, or None when it sent no histogram of one."""
    if reply is None or not reply.ok:
        return None
    parts = [nest(reply.payload, f"hist.{name}.g{g}") for g in (0, 1)]
    if any("count" not in p for p in parts):
        return None
    return [cohort.cell_ranges((p["first"], p["last"], p["count"]), edges, integer)
            for p in parts]


def _add_ranks(entry: dict, name: str, first: dict[str, Reply], third: dict[str, Reply],
               sites: list[str], edges: np.ndarray | None) -> None:
    """Add median (Q1, Q3) and Mann–Whitney U, pooled and per site, to a numeric entry."""
    cells = {} if edges is None else {
        s: _site_cells(third.get(s), name, edges, bool(_is_integer(first[s], name)))
        for s in sites}
    cells = {s: c for s, c in cells.items() if c is not None}
    entry["histograms_missing"] = [s for s in sites if s not in cells]
    entry["grid"] = None if edges is None else _grid_entry(edges)
    pooled = [cohort.pool_cells([c[g] for c in cells.values()]) for g in (0, 1)]
    entry.update(_ranks_entry(pooled) if cells else _no_ranks())
    for s, site_entry in entry["sites"].items():
        site_entry.update(_ranks_entry(cells[s]) if s in cells else _no_ranks())


def _ranks_entry(groups: list[cohort.CellRanges]) -> dict[str, Any]:
    bounds = [cohort.combine_quantiles(g) if g.n else [] for g in groups]
    out: dict[str, Any] = {}
    for key, i in QUANTILE_KEYS.items():
        per_group = [b[i] if b else None for b in bounds]
        out[key] = [_finite(b.estimate) if b else None for b in per_group]
        out[f"{key}_bound"] = [[_finite(b.lower), _finite(b.upper)] if b else None
                               for b in per_group]
    out["quantiles_exact"] = all(b.exact for group in bounds for b in group) \
        and all(bounds)
    test = cohort.combine_mann_whitney(*groups)
    out["mann_whitney"] = {
        "u": _finite(test.u), "p_value": _finite(test.p_value), "exact": test.exact,
        "u_bound": [_finite(v) for v in test.u_bound],
        "p_bound": [_finite(v) for v in test.p_bound],
        "tie_term_bound": [_finite(v) for v in test.tie_bound],
        "n": list(test.n), "u_of": "label 1 vs label 0",
        **({} if test.exact else {"reason": _inexact_reason(test)}),
    }
    return out


def _inexact_reason(test: cohort.MannWhitney) -> str:
    if min(test.n) == 0:
        return "a label group has no released patients"
    return ("cells of more than one value (merged bins, fractional values or the open end "
            "bins): U and the tie term are bounded, so p is")


def _no_ranks() -> dict[str, Any]:
    out: dict[str, Any] = {key: None for key in QUANTILE_KEYS}
    out.update({f"{key}_bound": None for key in QUANTILE_KEYS})
    return {**out, "quantiles_exact": False, "mann_whitney": None}


def _grid_entry(edges: np.ndarray) -> dict[str, Any]:
    inner = edges[1:-1]
    widths = np.diff(inner)
    return {"lower": float(inner[0]), "upper": float(inner[-1]), "bins": len(widths),
            "unit": bool(np.allclose(widths, 1.0)), "open_ends": True}


def _finite(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None
