"""Validation and score-refinement queries (client.stages.validation, client.stages.refine)."""

from __future__ import annotations

from shared import schema
from shared.queries.common import COMMON, EXTRACTION, MAX_GRID, MAX_NAMES, NAME, RUNS
from shared.queries.params import Param, declared

KEY_BOUND = float(2**62)  # above every score key of [0, 1] (shared.refine.keys)
MODELS = Param("models", "names", "the models to validate ([] = every one the site has)",
               pattern=NAME, max_items=MAX_NAMES)
BASE = (
    Param("bins", "int", "score histogram bins of the uniform grid (a site bins in at most "
          "n // min_cell_count of them: every k-th edge, shared.roc.site_edges)",
          lo=2, hi=MAX_GRID),
    Param("subgroups", "names", "clinical columns whose levels are validated apart",
          pattern=NAME, max_items=MAX_NAMES),
    MODELS,
    RUNS,
)
GRIDS = (
    Param("grid.models", "names", "the models the score grids are for", pattern=NAME,
          max_items=MAX_NAMES),
    Param("grid.e*", "floats", "a model's score grid edges: strictly increasing, from 0 to 1 "
          "or the float above it (shared.roc.checked_grid; a site bins in at most "
          "n // min_cell_count of its bins)", lo=0.0, hi=2.0, max_items=MAX_GRID),
)
MOMENTS = (
    Param("sets", "names", "the validation sets (pooled, training, external, site:<id>)",
          pattern=NAME, max_items=MAX_NAMES),
    Param("s*.models", "names", "the models of one set, two or more, each once",
          pattern=NAME, max_items=MAX_NAMES),
    Param("s*.d10", "array", "the set's pooled DeLong placement deviations V10 − AUC, models "
          "× bins: non-decreasing per model, spanning at most 1 (shared.validation."
          "check_placements); evaluated per released cell", lo=-1.0, hi=1.0,
          max_items=MAX_NAMES * MAX_GRID),
    Param("s*.d01", "array", "the set's pooled DeLong placement deviations V01 − AUC, models "
          "× bins: non-increasing per model, spanning at most 1; evaluated per released cell",
          lo=-1.0, hi=1.0, max_items=MAX_NAMES * MAX_GRID),
)
REFINE = (
    Param("refine.models", "names", "the models whose mixed bins are refined",
          pattern=NAME, max_items=MAX_NAMES),
    Param("r.*.rounds", "int", "refinement rounds so far, this one included", lo=1, hi=16),
    Param("r.*.grid", "floats", "the model's first-round score grid (as grid.e*)", lo=0.0,
          hi=2.0, max_items=MAX_GRID),
    Param("r.*.lo", "floats", "lower score keys (float64 bit patterns) of the bins refined",
          lo=0, hi=KEY_BOUND, max_items=MAX_GRID),
    Param("r.*.hi", "floats", "upper score keys of the bins refined", lo=0, hi=KEY_BOUND,
          max_items=MAX_GRID),
)
QUERY_TYPES = (
    declared(schema.VALIDATION_RANGES, *BASE, common=COMMON),
    declared(schema.VALIDATION_SCORES, *BASE, *GRIDS, common=COMMON),
    declared(schema.VALIDATION_MOMENTS, *BASE, *GRIDS, *MOMENTS, common=COMMON),
    declared(schema.SCORES_REFINE, *BASE, *GRIDS, *REFINE, common=(*COMMON, *EXTRACTION)),
)
