"""CNN stage queries (client.stages.training): setup, the weight rounds, scoring, DSFR features.

The round parameters are `shared.training_params.TrainParams`' fields, declared there once
with their ranges (their run-config keys', `query_bounds`; checked by TrainParams.validate);
here each becomes a query parameter of its type and range. The site's own rules on a round
(min_batch_size, the patients behind an update) are checked in client/stages/training_round.py
against its data.
"""

from __future__ import annotations

from dataclasses import fields

from shared import schema
from shared.dp import MODES, Q_CLIP, Q_MODE, Q_SIGMA
from shared.queries.common import COMMON, EXTRACTION, MAX_NAMES
from shared.queries.params import Param, declared
from shared.training_params import TrainParams, query_bounds

_TYPES = {"int": "int", "float": "float", "bool": "bool", "str": "str"}
# How each field changes what a site releases: all of them change its update, except these.
_NOT_VALUE = frozenset({"device", "amp", "deterministic", "wire"})

ROUND = tuple(
    Param(f.name, _TYPES.get(str(f.type), "names"), f"TrainParams.{f.name}",
          default=f.default, value=f.name not in _NOT_VALUE,
          lo=query_bounds(f.name)[0], hi=query_bounds(f.name)[1],
          max_items=MAX_NAMES if f.name == "units" else None)
    for f in fields(TrainParams))
WEIGHTS = Param("w.*", "array", "the global weights of one unit (w.<unit>.<state key>)")
DP = (
    Param(Q_MODE, "str", "the DP mode the server runs (under require_dp the site clips and "
          "noises with its own parameters whatever the mode)", choices=MODES),
    Param(Q_SIGMA, "float", "the noise multiplier the server asks", lo=0),
    Param(f"{Q_CLIP}.*", "float", "a unit's clipping norm the server asks", lo=0),
)
SCORE = (
    Param("name", "str", "the model name the scores are written under",
          pattern=r"[a-z][a-z0-9_]{0,40}"),
    Param("gradcam", "int", "Grad-CAM maps to keep at the site", lo=0, hi=10_000,
          value=False),
)
FEATURES = (
    Param("layer", "str", "the layer whose activations are the DSFR features",
          pattern=r"[A-Za-z0-9_.]{1,80}"),
    Param("cv-folds", "int", "the study's CV folds", lo=2, hi=100),
)
QUERY_TYPES = (
    declared(schema.HANDSHAKE, common=COMMON),
    declared(schema.TRAIN_SETUP, *ROUND, common=COMMON),
    declared(schema.TRAIN_SCORE, *ROUND, WEIGHTS, *SCORE, common=COMMON),
    declared(schema.DSFR_FEATURES, *ROUND, WEIGHTS, *FEATURES,
             *(p for p in EXTRACTION if p.key == "source"), common=COMMON),
    *(declared(action, *ROUND, WEIGHTS, *DP, common=COMMON)
      for action in schema.TRAIN_ACTIONS),
)
