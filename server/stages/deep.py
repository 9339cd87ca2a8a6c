"""Deep stage, server side: paper 2's DL-MRI (3D ResNet18 on tumour ROI crops) and DL-US
(ConvNeXt V2 on ultrasound ROI crops), each trained federated with k-fold CV
(`deep-cv-folds`, paper 2: 4) by the engine in server/training/engine.py, then scored at the
sites: training-site probabilities out-of-fold, external sites by the mean of the fold
models. The probabilities stay at the sites (`<site>/predictions/<model>-<run>.csv`, for
the fusion and validation stages); the pooled AUC comes from coarsened label-stratified
histograms, with its bound. Grad-CAM maps of a few patients are written at each site.

`mode = pooled` trains the same fold models on all training sites' data in a process of its
own (the centralized reference, server.training.backends.PooledBackend); `mode = both` trains both
ways and reports federated minus pooled AUC and the wall-time ratio (`comparison`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from server.core.progress import report_round
from server.core.transport import StageSkipped, Transport
from server.stages import refine as refinement
from server.training.engine import Outcome, auc_of, comparison, train_model, weights_payload
from server.training.plan import Plan
from server.training.setup import Setup, setup
from shared import roc, schema
from shared.config import StudyConfig
from shared.training_params import IMAGES

log = logging.getLogger("feddlr")
STAGE = "deep"
# the grid of the sites' score histograms (client.stages.training_round)
GRID = roc.grid(roc.DEFAULT_BINS)


def deep_settings(settings: Mapping[str, Any]) -> dict[str, Plan]:
    """The stage's settings, parsed and checked: one training plan per model of
    `deep-models`."""
    return {m: Plan.from_settings(settings, m) for m in settings["deep-models"]}


def run_deep(transport: Transport, config: StudyConfig, sites: list[str]) -> dict[str, Any]:
    plans = deep_settings(config.settings)
    result: dict[str, Any] = {"models": {}, "skipped": {}, "comparison": {}, "sites": {}}
    for model, plan in plans.items():
        st = setup(transport, config, model, sites, STAGE, plan.pretrained)
        if not st.train:
            result["skipped"][model] = "no training site has the images it needs: " + \
                "; ".join(f"{s}: {r}" for s, r in st.excluded.items())
            log.info("[%s] %s skipped: %s", STAGE, model, result["skipped"][model])
            continue
        outcomes = train_model(transport, config, plan, st, STAGE)
        for outcome in outcomes:
            outcome.result["auc"], outcome.result["gradcam"] = score(transport, config,
                                                                     outcome, st)
            outcome.result["sites_setup"] = {"train": st.train, "external": st.external,
                                             "excluded": st.excluded}
            result["models"][outcome.name] = outcome.result
        if len(outcomes) == 2:
            result["comparison"][model] = compare(outcomes[0], outcomes[1])
        for site in sites:
            status = result["sites"].setdefault(site, {"status": "ok", "models": []})
            if site in st.train or site in st.external:
                status["models"].append(model)
    if not result["models"]:
        raise StageSkipped("; ".join(f"{m}: {r}" for m, r in result["skipped"].items()))
    return result


def score(transport: Transport, config: StudyConfig, outcome: Outcome,
          st: Setup) -> tuple[dict[str, Any], dict[str, int]]:
    """Send the chosen fold models to every site (training and external) to score its
    patients; the pooled out-of-fold and external AUCs from the histograms."""
    plan = outcome.plan
    federated = outcome.result["mode"] == "federated"
    query = {"task": config.task, "needs": IMAGES[plan.model],
             **plan.params(pooled=not federated), "round": outcome.round,
             "units": plan.units, "train_id": outcome.result["train_id"],
             "name": outcome.name, "gradcam": plan.gradcam,
             **weights_payload(outcome, federated and plan.fedbn)}
    targets = st.train + st.external
    replies = transport.ask(schema.TRAIN_SCORE, query, targets)
    report_round(f"{STAGE}:{outcome.name}:score", 1, 1, replies)
    ok = {s: r.payload for s, r in replies.items() if r.ok}
    state = refinement.refine_auc(transport, {"task": config.task}, outcome.name,
                                  GRID, refinement.first_round(ok, GRID), STAGE)
    auc: dict[str, Any] = {}
    for name, group in (("train_oof", st.train), ("external", st.external)):
        members = {s: ok[s] for s in group if s in ok}
        if members:
            auc[name] = refined(auc_of(members), state, outcome.name, list(members))
    auc["sites"] = {s: refined(auc_of({s: p}), state, outcome.name, [s]) for s, p in ok.items()}
    auc["failed"] = {s: f"{r.status}: {r.reason}" for s, r in replies.items() if not r.ok}
    auc["grid"] = {"method": "coarsened label-stratified histograms, refined where bins held "
                             "both labels (`refinement`)"}
    auc["refinement"] = state.summary()
    gradcam = {s: int(p.get("gradcam.written", 0)) for s, p in ok.items()}
    return auc, gradcam


def refined(block: dict[str, Any], state: refinement.Refinement, model: str,
            sites: list[str]) -> dict[str, Any]:
    """A histogram AUC block with the refined AUC (`server.stages.refine.auc_block`): `auc_exact`
    true when the refinement proved it equal to the AUC of the sites' own scores; otherwise
    `auc_bound` bounds that AUC. Sites whose histograms were refused stay out, as before."""
    present = [s for s in sites if s in state.cells[model]["all"]]
    if block.get("auc") is None or not present:
        return block
    fine = refinement.auc_block(state, model, present)
    if fine.get("auc") is None:
        return block
    return {**block, "auc": float(fine["auc"]), "auc_bound": [float(v) for v in fine["bound"]],
            "auc_exact": bool(fine["exact"])}


def compare(federated: Outcome, pooled: Outcome) -> dict[str, Any]:
    return comparison(federated.result, pooled.result,
                      (federated.result.get("auc", {}).get("train_oof") or {}).get("auc"),
                      (pooled.result.get("auc", {}).get("train_oof") or {}).get("auc"))
