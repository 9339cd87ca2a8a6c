"""DSFR stage, server side: paper 1's deep semantic segmentation feature radiomics.

1. The 2D segmentation U-Net (neural/networks.py) is trained federated on the sites'
   tumour slices (focal loss; Dice per site each round on a fixed third of each site's
   patients) by the engine in server/training/engine.py — or pooled, or both (`mode`).
2. Each site runs the chosen U-Net on every patient's tumour slices and keeps, per patient,
   the global-average-pooled feature maps of the chosen ReLU layer (`dsfr-layer`, default
   the authors' "activation_9", the 1024-channel bottleneck) reduced by a seeded K-means
   (k=2) over slices to the larger cluster's mean. The table stays at the site.
3. The same selection and LR head as the radiomics stage, run by its own machinery
   (server.stages.radiomics.RadiomicsFit, on the sites' `dsfr` rows): pooled standardization,
   screening then LASSO (paper 1 orders DSFR the other way round from radiomics: defaults
   `dsfr-screen = mi`, `dsfr-screen-order = screen-first`, `dsfr-screen-percentile = 10`,
   ≈ the paper's 106 of 1024), then the k-fold L2-LR head; probabilities out-of-fold at the
   sites (`<site>/predictions/dsfr-<run>.csv`), the pooled AUC from coarsened histograms.
   There is no ICC filter for DSFR (the features do not depend on a reader's outline).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from server.core.progress import report_round
from server.core.transport import SiteSetChanged, StageError, Transport
from server.stages.radiomics import RadiomicsConfig, RadiomicsFit, _score
from server.training.engine import Outcome, comparison, train_model, weights_payload
from server.training.plan import Plan
from server.training.setup import Setup, setup, skip_if_empty
from shared import schema
from shared.config import ConfigError, StudyConfig

log = logging.getLogger("feddlr")
STAGE = "dsfr"
# DSFR's feature layer and the radiomics keys it overrides with its own (`dsfr-<key>`),
# per recipe. `paper`: the authors' bottleneck ReLU, MI screening of the top 10 % first,
# LASSO C 0.1, focal α 0.25. `scratch`: on the synthetic cohort a U-Net trained to segment
# well (α 0.75: the tumour pixels weighted up, Dice stays > 0.8 instead of collapsing to
# background) makes its bottleneck invariant to the enhancement that carries HER2, while
# the last encoder block keeps it (pooled L2-LR AUC of the GAP features, 116 patients:
# activation_9 0.68, activation_7 0.81), and MI over 4 bins of ~100 patients keeps too few
# of them at 10 % (out-of-fold AUC 0.43 at 10 %/C 0.1, 0.80 at 50 %/C 1.0; README).
DSFR_HEAD: dict[str, dict[str, Any]] = {
    "scratch": {"layer": "activation_7", "screen": "mi", "screen-order": "screen-first",
                "screen-percentile": 50.0, "lasso-C": 1.0},
    "paper": {"layer": "activation_9", "screen": "mi", "screen-order": "screen-first",
              "screen-percentile": 10.0, "lasso-C": 0.1},
}


def dsfr_selection(settings: Mapping[str, Any]) -> RadiomicsConfig:
    """The radiomics selection/LR-head config with DSFR's own screening keys (`dsfr-<key>`,
    where not `default`, else the recipe's DSFR_HEAD value)."""
    head = DSFR_HEAD[settings["recipe"]]
    values = dict(settings)
    for key, default in head.items():
        if key != "layer":
            given = settings[f"dsfr-{key}"]
            values[key] = default if given is None else given
    return RadiomicsConfig.from_settings(values)


def dsfr_settings(settings: Mapping[str, Any]) -> tuple[Plan, RadiomicsConfig, str]:
    """The stage's settings, parsed and checked: U-Net plan, feature selection, layer."""
    plan = Plan.from_settings(settings, "dsfr")
    rc = dsfr_selection(settings)
    layer = settings["dsfr-layer"] or DSFR_HEAD[settings["recipe"]]["layer"]
    _check_layer(layer)
    return plan, rc, layer


def run_dsfr(transport: Transport, config: StudyConfig, sites: list[str]) -> dict[str, Any]:
    plan, rc, layer = dsfr_settings(config.settings)
    st = setup(transport, config, "dsfr", sites, STAGE, plan.pretrained)
    skip_if_empty(st, "dsfr")
    outcomes = train_model(transport, config, plan, st, STAGE)
    result: dict[str, Any] = {}
    for i, outcome in enumerate(outcomes):
        block = head(transport, config, outcome, st, rc, layer)
        if i == 0:
            result.update(block)
        else:
            result["pooled"] = block
    if len(outcomes) == 2:
        result["comparison"] = comparison(
            outcomes[0].result, outcomes[1].result,
            (result.get("auc", {}).get("train_oof") or {}).get("auc"),
            (result["pooled"].get("auc", {}).get("train_oof") or {}).get("auc"))
    result["sites"] = {s: {"status": "ok", "role": "train" if s in st.train else "external"}
                       for s in st.train + st.external}
    for site, reason in st.excluded.items():
        result["sites"][site] = {"status": "ok", "note": f"not in dsfr: {reason}"}
    return result


def _check_layer(layer: str) -> None:
    from neural.networks import UNet2D

    names = UNet2D(width=0.0625).relu_names()
    if layer not in names:
        raise ConfigError(f"run config dsfr-layer: {layer!r} is not one of the U-Net's "
                          f"ReLUs ({names[0]} … {names[-1]})")


def head(transport: Transport, config: StudyConfig, outcome: Outcome, st: Setup,
         rc: RadiomicsConfig, layer: str) -> dict[str, Any]:
    """Features at the sites with the chosen U-Net, then the radiomics selection + LR head."""
    plan = outcome.plan
    federated = outcome.result["mode"] == "federated"
    source = outcome.name  # dsfr, or dsfr_pooled beside a federated dsfr
    query = {"task": config.task, "needs": "mri", **plan.params(pooled=not federated),
             "round": outcome.round, "units": plan.units,
             "train_id": outcome.result["train_id"], "layer": layer, "source": source,
             "cv-folds": rc.cv_folds, **weights_payload(outcome, federated and plan.fedbn)}
    query["seed"] = rc.seed
    targets = st.train + st.external
    replies = transport.ask(schema.DSFR_FEATURES, query, targets)
    report_round(f"{STAGE}:{source}:features", 1, 1, replies)
    bad = {s: r for s, r in replies.items() if not r.ok}
    train = [s for s in st.train if s not in bad]
    external = [s for s in st.external if s not in bad]
    if not train:
        raise StageError("no training site could compute DSFR features: " + "; ".join(
            f"{s}: {r.reason}" for s, r in bad.items()))
    names = list(replies[train[0]].payload["features.names"])
    context = {"task": config.task, "source": source}
    try:
        fit = RadiomicsFit(transport, context, train, names, rc, [], external)
        block = fit.run()
        block.update(_score(transport, fit.context, train, fit.external, fit, rc))
    except (StageError, SiteSetChanged) as err:
        raise StageError(f"DSFR head: {err}") from err
    block["icc_filter"] = {"status": "skipped",
                           "reason": "DSFR features come from the U-Net, not a reader's "
                                     "outline: no ICC filter"}
    block.pop("icc", None)
    block["features"] = {"n_extracted": len(names), "layer": layer, "names_sample": names[:5],
                         "failed_sites": {s: f"{r.status}: {r.reason}" for s, r in bad.items()}}
    block["training"] = outcome.result
    return block
