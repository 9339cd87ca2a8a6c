"""Radiomics stage queries (client.stages.radiomics, client.stages.rounds,
client.stages.harmonize)."""

from __future__ import annotations

from shared import schema
from shared.queries.common import COMMON, EXTRACTION, MAX_FEATURES, MAX_GRID, NAME
from shared.queries.params import Param, declared

FINITE = 1e300  # numbers bounded by it are finite; the site's own bounds come from its data

SOLVERS = Param("solvers", "names", "the solver queries in this message (q.<key>.*)",
                pattern=r"[A-Za-z0-9_.-]{1,80}", max_items=512, value=False)
ROWS = (
    Param("q.*.rows", "str", "which rows: train, train-fold or readers",
          choices=("train", "train-fold", "readers"), rows=True),
    Param("q.*.fold", "int", "the CV fold held out (rows train-fold)", lo=0, hi=1000,
          rows=True),
)
COLUMNS = Param("q.*.columns", "ints", "feature columns, by index into the agreed names",
                lo=0, hi=MAX_FEATURES, max_items=MAX_FEATURES)
STANDARDIZED = (
    Param("q.*.center", "floats", "the z-score centre of each column (the site: one per "
          "column, within its range widened by that range and 20 scales)", lo=-FINITE,
          hi=FINITE, max_items=MAX_FEATURES),
    Param("q.*.scale", "floats", "the z-score scale of each column (the site: >= its SD / "
          "max_coefficient; a tiny scale is a steep point)", lo=0, hi=FINITE,
          max_items=MAX_FEATURES),
)
STEP = (
    Param("q.*.step", "str", "the solver step (shared.federated)",
          pattern=r"(standardize|glm|icc)\.[a-z_]{1,40}"),
    Param("q.*.mean", "floats", "column means (second standardization pass)", lo=-FINITE,
          hi=FINITE, max_items=MAX_FEATURES),
    Param("q.*.shift", "floats", "column shifts (ICC sums)", lo=-FINITE, hi=FINITE,
          max_items=2 * MAX_FEATURES),
    Param("q.*.loss", "str", "the GLM loss", choices=("logistic", "squared")),
    Param("q.*.hessian", "bool", "also return X'WX"),
    Param("q.*.trace", "bool", "also return the Hessian's diagonal"),
    Param("q.*.points", "array", "the coefficient vectors (intercept first) evaluated (the "
          "site: each coefficient <= max_coefficient per SD of its column here, the "
          "gradient's and Hessian's weights spread, shared.glm.require_bounded)",
          lo=-FINITE, hi=FINITE, max_items=64 * (MAX_FEATURES + 1)),
)
SCREEN = (
    Param("q.*.method", "str", "screening statistic", choices=("chi2", "mi")),
    Param("q.*.cuts", "floats", "bin cuts for mutual information (the site: increasing, "
          "at most n // min_cell_count bins)", lo=-FINITE, hi=FINITE, max_items=MAX_GRID),
)
SCORE = (
    Param("n_models", "int", "fold models in the query (fold<k>.*)", lo=1, hi=1000),
    Param("bins", "int", "score histogram bins", lo=2, hi=MAX_GRID),
    Param("fold*.intercept", "float", "a fold model's intercept", lo=-FINITE, hi=FINITE),
    Param("fold*.coef", "floats", "a fold model's coefficients (the site: <= "
          "max_coefficient per SD of its z-scores here)", lo=-FINITE, hi=FINITE,
          max_items=MAX_FEATURES),
    Param("fold*.columns", "ints", "a fold model's columns", lo=0, hi=MAX_FEATURES,
          max_items=MAX_FEATURES),
    Param("fold*.center", "floats", "a fold model's centre (checked as q.*.center)",
          lo=-FINITE, hi=FINITE, max_items=MAX_FEATURES),
    Param("fold*.scale", "floats", "a fold model's scale (checked as q.*.scale)", lo=0,
          hi=FINITE, max_items=MAX_FEATURES),
)
COMBAT = (
    Param("step", "str", "the ComBat step", choices=("sums", "residuals", "adjust")),
    Param("columns", "ints", "feature columns harmonized", lo=0, hi=MAX_FEATURES,
          max_items=MAX_FEATURES),
    Param("names", "names", "the columns' names", pattern=NAME, max_items=MAX_FEATURES,
          value=False),
    Param("covariates", "names", "clinical covariates ComBat keeps", pattern=NAME,
          max_items=64),
    Param("batch", "int", "this site's batch index (-1: an external site)", lo=-1,
          hi=10_000),
    Param("n_batch", "int", "batches (training sites)", lo=1, hi=10_000),
    Param("beta", "array", "the pooled regression coefficients", max_items=10**7),
    Param("grand_mean", "floats", "the grand mean per feature", max_items=MAX_FEATURES),
    Param("var_pooled", "floats", "the pooled variance per feature", max_items=MAX_FEATURES),
    Param("eb", "bool", "empirical Bayes"),
    Param("parametric", "bool", "parametric priors"),
)
QUERY_TYPES = (
    declared(schema.RADIOMICS_EXTRACT, common=(*COMMON, *EXTRACTION)),
    declared(schema.RADIOMICS_COLUMNS,
             Param("names", "names", "the agreed feature names", pattern=NAME,
                   max_items=MAX_FEATURES, value=False),
             Param("cv-folds", "int", "the study's CV folds", lo=2, hi=100),
             Param("seed", "int", "the fold draw's seed", lo=0, hi=2**32 - 1),
             common=(*COMMON, *EXTRACTION)),
    declared(schema.RADIOMICS_STEP, SOLVERS, *ROWS, COLUMNS, *STANDARDIZED, *STEP,
             common=(*COMMON, *EXTRACTION)),
    declared(schema.RADIOMICS_SCREEN, SOLVERS, *ROWS, COLUMNS, *STANDARDIZED, *SCREEN,
             common=(*COMMON, *EXTRACTION)),
    declared(schema.RADIOMICS_SCORE, *SCORE, common=(*COMMON, *EXTRACTION)),
    declared(schema.RADIOMICS_COMBAT, *COMBAT, common=(*COMMON, *EXTRACTION)),
)
