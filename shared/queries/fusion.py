"""Fusion stage queries (client.stages.fusion): a logistic head on the CNNs' scores."""

from __future__ import annotations

from shared import schema
from shared.queries.common import COMMON, MAX_NAMES, NAME, RUNS
from shared.queries.params import Param, declared
from shared.queries.radiomics import FINITE

MODELS = Param("fusion-models", "names", "the models whose scores are fused", pattern=NAME,
               max_items=MAX_NAMES)
QUERY_TYPES = (
    declared(schema.FUSION_SETUP, RUNS, common=COMMON),
    declared(schema.FUSION_STEP, RUNS, MODELS,
             Param("solvers", "names", "the solver queries in this message (q.<key>.*)",
                   pattern=r"[A-Za-z0-9_.-]{1,80}", max_items=64, value=False),
             Param("q.*.step", "str", "the solver step", pattern=r"glm\.[a-z_]{1,40}"),
             Param("q.*.loss", "str", "the GLM loss", choices=("logistic", "squared")),
             Param("q.*.hessian", "bool", "also return X'WX"),
             Param("q.*.trace", "bool", "also return the Hessian's diagonal"),
             Param("q.*.points", "array", "coefficient vectors (intercept first; the site: "
                   "each <= max_coefficient per SD of its model's scores here, weights "
                   "spread, shared.glm.require_bounded)", lo=-FINITE, hi=FINITE,
                   max_items=64 * (MAX_NAMES + 1)),
             common=COMMON),
    declared(schema.FUSION_SCORE, RUNS, MODELS,
             Param("intercept", "float", "the head's intercept", lo=-FINITE, hi=FINITE),
             Param("coef", "floats", "the head's coefficients (the site: <= max_coefficient "
                   "per SD of its model's scores here)", lo=-FINITE, hi=FINITE,
                   max_items=MAX_NAMES),
             common=COMMON),
)
