"""What crosses the wire: message actions, payload layout and the schema version.

A query or reply is a flat mapping `key -> value` where a value is a numpy array (sent in
the message's ArrayRecord) or a scalar, string or list of scalars/strings (sent in its
ConfigRecord). Keys are dotted: `<statistic>.<field>` (e.g. `moments.age.sum`).
Replies also carry `status` (`ok` | `refused` | `failed`) and, when not ok, `reason`.

This module is pure: the two-line wrapping into Flower records lives in the apps.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

SCHEMA_VERSION = "1.0"
ARRAYS = "arrays"  # name of the ArrayRecord in every message
CONFIG = "config"  # name of the ConfigRecord in every message

# Query actions (Flower message type `query.<action>`), one per site-side handler.
HANDSHAKE = "handshake"
COHORT_SUMS = "cohort_sums"
COHORT_SQUARES = "cohort_squares"
COHORT_HISTOGRAMS = "cohort_histograms"
RADIOMICS_EXTRACT = "radiomics_extract"
RADIOMICS_COLUMNS = "radiomics_columns"
RADIOMICS_STEP = "radiomics_step"
RADIOMICS_SCREEN = "radiomics_screen"
RADIOMICS_SCORE = "radiomics_score"
RADIOMICS_COMBAT = "radiomics_combat"
COMBAT = "combat"  # query key of the radiomics actions: use the stage's rows after ComBat
SURVIVAL_SETUP = "survival_setup"
SURVIVAL_COX = "survival_cox"
SURVIVAL_EVENTS = "survival_events"
SURVIVAL_PAIRS = "survival_pairs"
SURVIVAL_HISTOGRAMS = "survival_histograms"
SURVIVAL_BOUNDS = "survival_bounds"
# CNN stages (dsfr, deep): setup, scoring and DSFR features are queries; the weight rounds
# are Flower's own message categories, `train.<model>` (global weights in, update out) and
# `evaluate.<model>` (global weights in, validation sums out), whose action name is the
# whole message type.
TRAIN_SETUP = "train_setup"
TRAIN_SCORE = "train_score"
DSFR_FEATURES = "dsfr_features"
FUSION_SETUP = "fusion_setup"
FUSION_STEP = "fusion_step"
FUSION_SCORE = "fusion_score"
VALIDATION_RANGES = "validation_ranges"
VALIDATION_SCORES = "validation_scores"
VALIDATION_MOMENTS = "validation_moments"
SCORES_REFINE = "scores_refine"  # finer sub-histograms of mixed score bins (shared.refine)
# Several independent fits' queries in one message (`server.core.in_step`): each part is a
# query of one of the actions above, answered and audited at the site as if it came alone.
BATCH = "batch"
BATCH_PARTS = "batch.parts"  # key: the parts' names, in order
BATCH_ACTIONS = "batch.actions"  # key: each part's action, in the same order
PART_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
TRAIN_MODELS = ("dsfr", "dl_mri", "dl_us")  # the CNNs: DSFR (paper 1), DL-MRI, DL-US (paper 2)
DEEP_MODELS = TRAIN_MODELS[1:]  # what the `deep` stage trains
TRAIN_ACTIONS = tuple(f"{category}.{model}" for category in ("train", "evaluate")
                      for model in TRAIN_MODELS)


def message_type(action: str) -> str:
    """The Flower message type an action travels as: `query.<action>`, or the train /
    evaluate action itself."""
    return action if action in TRAIN_ACTIONS else f"query.{action}"


def action_of(message_type: str) -> str | None:
    """The action a message type asks for, or None if this schema has no such message."""
    if message_type in TRAIN_ACTIONS:
        return message_type
    category, _, action = message_type.partition(".")
    return action if category == "query" and action in query_actions() else None


def query_actions() -> tuple[str, ...]:
    """Every query action of the stages (shared.stages.ACTIONS, which names this module's
    constants: imported here when first asked)."""
    from shared.stages import ACTIONS

    return ACTIONS

LEDGER_CHECKED = "ledger.checked"  # reply key: statistics the site's ledger compared
STATUS_OK = "ok"
STATUS_REFUSED = "refused"
STATUS_FAILED = "failed"
STATUS_DROPPED = "dropped"  # set by the server when a site does not answer in time

Scalar = int | float | str | bool
Value = np.ndarray | Scalar | list[int] | list[float] | list[str]
Payload = dict[str, Value]


class SchemaError(ValueError):
    """A message that does not follow this schema."""


def schema_major(version: str) -> int:
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError as err:
        raise SchemaError(f"unreadable schema version {version!r}") from err


def compatible(site_version: str, server_version: str = SCHEMA_VERSION) -> bool:
    """Sites and server talk when their schema major versions agree."""
    return schema_major(site_version) == schema_major(server_version)


def split_payload(payload: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Split a payload into (arrays, config) — the ArrayRecord and ConfigRecord contents."""
    arrays: dict[str, np.ndarray] = {}
    config: dict[str, Any] = {}
    for key, value in payload.items():
        if not isinstance(key, str) or not key:
            raise SchemaError(f"payload key {key!r} is not a non-empty string")
        if isinstance(value, np.ndarray) and value.ndim == 0:
            config[key] = value.item()  # Flower's Array turns 0-d arrays into shape (1,)
        elif isinstance(value, np.ndarray):
            arrays[key] = np.ascontiguousarray(value)
        elif isinstance(value, np.generic):
            config[key] = value.item()
        elif isinstance(value, bool | int | float | str):
            config[key] = value
        elif isinstance(value, list | tuple) and _is_flat_list(value):
            config[key] = list(value)
        else:
            raise SchemaError(f"payload key {key!r} has unsupported type {type(value).__name__}")
    return arrays, config


def join_payload(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> Payload:
    overlap = set(arrays) & set(config)
    if overlap:
        raise SchemaError(f"keys in both records: {sorted(overlap)}")
    payload: Payload = dict(config)
    payload.update(arrays)
    return payload


def _is_flat_list(values: list | tuple) -> bool:
    if not values:
        return True
    kinds = {type(v) for v in values}
    return len(kinds) == 1 and kinds <= {int, float, str, bool}


def digest(payload: Mapping[str, Any]) -> tuple[int, str]:
    """(bytes, sha256) of a payload's canonical form: the config as sorted JSON, then each
    array's key and raw bytes in key order. Site audit logs and the server's wire log both
    use it, so the two can be matched message by message."""
    arrays, config = split_payload(payload)
    parts = [json.dumps(config, sort_keys=True, default=str).encode()]
    for key in sorted(arrays):
        parts.append(key.encode())
        parts.append(arrays[key].tobytes())
    blob = b"".join(parts)
    return len(blob), hashlib.sha256(blob).hexdigest()


def nest(payload: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries under `prefix.` with the prefix removed."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in payload.items() if k.startswith(head)}


def batch_payload(parts: Mapping[str, tuple[str, Mapping[str, Any]]]) -> Payload:
    """One payload holding several parts, each an (action, payload) pair: the parts' names
    and actions, then each part's entries under `part.<name>.`. A batch query and a batch
    reply have this layout (a reply adds its `status`)."""
    out: Payload = {BATCH_PARTS: list(parts), BATCH_ACTIONS: [a for a, _ in parts.values()]}
    for name, (_, payload) in parts.items():
        if not PART_NAME.match(name):
            raise SchemaError(f"bad batch part name {name!r}")
        out.update({f"part.{name}.{key}": value for key, value in payload.items()})
    return out


def batch_parts(payload: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The (action, payload) of each part of a batch payload, in order; `SchemaError` for
    a layout `batch_payload` does not write, a part that is itself a batch, or an action
    this schema does not have."""
    names, actions = payload.get(BATCH_PARTS), payload.get(BATCH_ACTIONS)
    if not isinstance(names, list) or not isinstance(actions, list) \
            or len(names) != len(actions) or len(set(names)) != len(names):
        raise SchemaError(f"a batch needs {BATCH_PARTS!r} and {BATCH_ACTIONS!r}: two lists of "
                          "the same length, the names distinct")
    parts = {}
    for name, action in zip(names, actions, strict=True):
        if not isinstance(name, str) or not PART_NAME.match(name):
            raise SchemaError(f"bad batch part name {name!r}")
        if action not in query_actions() or action == BATCH:
            raise SchemaError(f"batch part {name!r}: no such query action {action!r}")
        parts[name] = (str(action), nest(payload, f"part.{name}"))
    return parts
