"""Survival stage queries (client.stages.survival): Kaplan–Meier, Cox rounds, C-index."""

from __future__ import annotations

from shared import schema
from shared.queries.common import COMMON, MAX_GRID, MAX_NAMES, NAME, RUNS
from shared.queries.params import Param, declared

MAX_TERMS = 64  # design columns of a Cox model
MAX_TIME = 1e7  # a time on any survival grid (27,000 years in days): finite, never negative
# A coefficient or centre beyond these is no honest Newton point; the site then bounds each β
# per SD of its own columns (policy max_coefficient, client.stages.survival._check_points).
MAX_COEFFICIENT = 1e6
MAX_CENTER = 1e12
BASE = (
    RUNS,
    Param("threshold.*", "float", "a model's decision threshold (predicted:<model>)",
          lo=0.0, hi=1.0),
    Param("time_bin", "float", "the time bin the server assumes (must be the site's)", lo=0),
    Param("exact_times", "bool", "asks for exact times (refused unless time_bin is 0)"),
)
SETUP = (
    Param("group", "str", "the grouping column of the Kaplan–Meier curves ('' = none)",
          pattern=f"(?:{NAME})?"),
    Param("covariates", "names", "the Cox model's covariates", pattern=NAME,
          max_items=MAX_NAMES),
)
DESIGN = (
    Param("terms", "names", "the Cox model's terms", pattern=NAME, max_items=MAX_NAMES),
    Param("cohort", "names", "the covariates that define the Cox cohort (complete cases)",
          pattern=NAME, max_items=MAX_NAMES),
    Param("kind.*", "str", "a term's kind", choices=("numeric", "categorical")),
    Param("levels.*", "names", "a categorical term's non-reference levels", pattern=NAME,
          max_items=MAX_TERMS),
    Param("center", "floats", "the centre of each design column (checked near the site's "
          "values)", lo=-MAX_CENTER, hi=MAX_CENTER, max_items=MAX_TERMS),
)
BETA = Param("beta", "floats", "the fitted coefficients (gentle and spread at the site)",
             lo=-MAX_COEFFICIENT, hi=MAX_COEFFICIENT, max_items=MAX_TERMS)
SCORE_GRID = (
    BETA,
    Param("time_edges", "floats", "time edges of the event table (the table's memory is "
          "checked)", lo=-MAX_TIME, hi=MAX_TIME, max_items=MAX_GRID),
    Param("score_edges", "floats", "score edges of the event table", lo=-MAX_CENTER,
          hi=MAX_CENTER, max_items=MAX_GRID),
)
QUERY_TYPES = (
    declared(schema.SURVIVAL_SETUP, *BASE, *SETUP, common=COMMON),
    declared(schema.SURVIVAL_COX, *BASE, *DESIGN,
             Param("grid", "floats", "the global event-time grid (increasing, on the site's "
                   "time_bin)", lo=0, hi=MAX_TIME, max_items=MAX_GRID),
             Param("betas", "array", "candidate coefficient vectors (each gentle and spread "
                   "at the site; the sums' memory is checked)", lo=-MAX_COEFFICIENT,
                   hi=MAX_COEFFICIENT, max_items=64 * MAX_TERMS),
             common=COMMON),
    declared(schema.SURVIVAL_EVENTS, *BASE, *DESIGN, BETA, common=COMMON),
    declared(schema.SURVIVAL_PAIRS, *BASE, *DESIGN, BETA,
             Param("event_time", "floats", "the other sites' event times", lo=0,
                   hi=MAX_TIME, max_items=MAX_GRID),
             Param("event_score", "floats", "the other sites' event scores",
                   max_items=MAX_GRID),
             common=COMMON),
    declared(schema.SURVIVAL_HISTOGRAMS, *BASE, *DESIGN, *SCORE_GRID, common=COMMON),
    declared(schema.SURVIVAL_BOUNDS, *BASE, *DESIGN, *SCORE_GRID,
             Param("cells", "array", "the other sites' table rectangles", max_items=4 * MAX_GRID),
             Param("counts", "ints", "the rectangles' event counts", lo=0,
                   max_items=MAX_GRID),
             common=COMMON),
)
