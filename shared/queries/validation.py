"""Validation and score-refinement queries (client.validation, client.refine)."""

from __future__ import annotations

from shared import schema
from shared.queries.common import COMMON, EXTRACTION, MAX_GRID, MAX_NAMES, NAME, RUNS
from shared.queries.params import Param, declared

MODELS = Param("models", "names", "the models to validate ([] = every one the site has)",
               pattern=NAME, max_items=MAX_NAMES)
BASE = (
    Param("bins", "int", "score histogram bins", lo=2, hi=MAX_GRID),
    Param("subgroups", "names", "clinical columns whose levels are validated apart",
          pattern=NAME, max_items=MAX_NAMES),
    MODELS,
    RUNS,
)
GRIDS = (
    Param("grid.models", "names", "the models the score grids are for", pattern=NAME,
          max_items=MAX_NAMES),
    Param("grid.e*", "floats", "a model's score grid edges", max_items=MAX_GRID),
)
MOMENTS = (
    Param("sets", "names", "the validation sets (pooled, training, external, site:<id>)",
          pattern=NAME, max_items=MAX_NAMES),
    Param("s*.models", "names", "the models of one set", pattern=NAME, max_items=MAX_NAMES),
    Param("s*.d10", "array", "DeLong placement values V10 per model and bin",
          max_items=MAX_NAMES * MAX_GRID),
    Param("s*.d01", "array", "DeLong placement values V01 per model and bin",
          max_items=MAX_NAMES * MAX_GRID),
)
REFINE = (
    Param("refine.models", "names", "the models whose mixed bins are refined",
          pattern=NAME, max_items=MAX_NAMES),
    Param("r.*.rounds", "int", "refinement rounds so far", lo=0, hi=16),
    Param("r.*.grid", "floats", "the model's score grid", max_items=MAX_GRID),
    Param("r.*.lo", "floats", "lower edges of the bins refined", max_items=MAX_GRID),
    Param("r.*.hi", "floats", "upper edges of the bins refined", max_items=MAX_GRID),
)
QUERY_TYPES = (
    declared(schema.VALIDATION_RANGES, *BASE, common=COMMON),
    declared(schema.VALIDATION_SCORES, *BASE, *GRIDS, common=COMMON),
    declared(schema.VALIDATION_MOMENTS, *BASE, *GRIDS, *MOMENTS, common=COMMON),
    declared(schema.SCORES_REFINE, *BASE, *GRIDS, *REFINE, common=(*COMMON, *EXTRACTION)),
)
