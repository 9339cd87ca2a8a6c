"""Fusion stage: DLR (paper 1) and the late-fusion logistic regression (paper 2).

- DLR = mean of the radiomics and DSFR probabilities; each site computes it for its own
  patients (`client.stages.fusion.fusion_setup`), nothing is fitted.
- Late fusion: `LogisticRegression(C=fusion-C)` (scikit-learn's L2 objective) on the
  probabilities of the models named in `fusion-models` (default DL-MRI and DL-US, paper 2's
  DL-US&MRI), fitted by federated Newton rounds on the training sites' out-of-fold
  probabilities (sites with role `external` are never used), then applied at every site.
  At a training site the fused probability is in-sample for the fusion LR (kind `fitted`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.core.progress import report_round
from server.core.rounds import drive
from server.core.transport import (
    Reply,
    StageSkipped,
    Transport,
    answered,
    ask_all_ok,
    on_stable_sites,
)
from shared import logistic, schema
from shared.config import NO_EARLIER, ConfigError, Earlier, StudyConfig
from shared.settings import config_values, setting

log = logging.getLogger("feddlr")
STAGE = "fusion"


@dataclass(frozen=True)
class FusionConfig:
    """The fusion stage's run-config keys (shared/settings.py)."""

    models: tuple[str, ...] = setting("fusion-models")
    C: float = setting("fusion-C")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> FusionConfig:
        fc = cls(**config_values(cls, settings))
        if len(fc.models) < 2 or len(set(fc.models)) != len(fc.models):
            raise ConfigError(f"run config fusion-models: {','.join(fc.models)!r} must name "
                              "two or more different models")
        return fc


def run_fusion(transport: Transport, config: StudyConfig, sites: list[str],
               earlier: Earlier = NO_EARLIER) -> dict[str, Any]:
    fc = FusionConfig.from_settings(config.settings)
    context = {"task": config.task, "runs": earlier.runs(config)}
    replies = transport.ask(schema.FUSION_SETUP, context, sites)
    report_round(f"{STAGE}:setup", 1, 1, replies)
    ok = {s: replies[s] for s in answered(replies, sites, min_replies=config.min_replies,
                                          what="the fusion setup")}
    result: dict[str, Any] = {"sites": {s: {"status": r.status, "reason": r.reason}
                                        for s, r in replies.items()}}
    dlr_sites = [s for s, r in ok.items() if "dlr.n" in r.payload]
    result["dlr"] = ({"models": ["radiomics", "dsfr"], "sites": dlr_sites} if dlr_sites else
                     {"skipped": "no site has both radiomics and DSFR probabilities"})
    result["fusion"] = _late_fusion(transport, config, fc, context, ok)
    if not dlr_sites and "skipped" in result["fusion"]:
        raise StageSkipped(f"{result['dlr']['skipped']}; {result['fusion']['skipped']}")
    return result


def _late_fusion(transport: Transport, config: StudyConfig, fc: FusionConfig,
                 context: dict[str, Any], ok: dict[str, Reply]) -> dict[str, Any]:
    have = {s for s, r in ok.items()
            if set(fc.models) <= set(r.payload.get("site.models", []))}
    roles = {s: list(r.payload.get("site.roles", [])) for s, r in ok.items()}
    train = sorted(s for s in have if "train" in roles[s])
    external = sorted(s for s in have if s not in train)
    if not train:
        return {"models": list(fc.models),
                "skipped": f"no training site has probabilities of all of {list(fc.models)}"}
    query = dict(context, **{"fusion-models": list(fc.models)})

    def fit(on: list[str]) -> tuple[logistic.glm.Fit, int, list[str]]:
        solver = logistic.solver(fc.C, "l2", len(fc.models))
        rounds = drive(transport, schema.FUSION_STEP, {"lr": solver}, on, query, STAGE)
        return solver.fit, rounds, on

    (fitted, rounds, fit_sites), restarts = on_stable_sites(
        fit, train, min_sites=config.min_sites, stage=STAGE, min_replies=config.min_replies)
    score = dict(query, intercept=float(fitted.intercept), coef=fitted.coef)
    scored = ask_all_ok(transport, schema.FUSION_SCORE, score, fit_sites + external)
    report_round(f"{STAGE}:score", 1, 1, scored)
    log.info("[%s] late fusion of %s fitted on %d sites in %d rounds", STAGE,
             ",".join(fc.models), len(fit_sites), rounds)
    return {"models": list(fc.models), "C": fc.C, "intercept": float(fitted.intercept),
            "coef": dict(zip(fc.models, map(float, fitted.coef), strict=True)),
            "rounds": rounds, "converged": bool(fitted.converged), "sites": fit_sites,
            "external": external, "restarts": restarts}
