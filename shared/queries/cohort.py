"""Cohort table queries (client.stages.cohort): moments and label-stratified histograms."""

from __future__ import annotations

from shared import schema
from shared.queries.common import COMMON, MAX_GRID, MAX_NAMES, NAME
from shared.queries.params import Param, declared

COVARIATES = Param("covariates", "names", "the clinical columns of the table",
                   pattern=NAME, max_items=MAX_NAMES)
QUERY_TYPES = (
    declared(schema.COHORT_SUMS, COVARIATES, common=COMMON),
    declared(schema.COHORT_SQUARES, COVARIATES,
             Param("means.*", "floats", "a numeric column's pooled mean per label",
                   max_items=2), common=COMMON),
    declared(schema.COHORT_HISTOGRAMS, COVARIATES,
             Param("edges.*", "floats", "a numeric column's histogram edges",
                   max_items=MAX_GRID), common=COMMON),
)
