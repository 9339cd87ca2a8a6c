"""ComBat harmonization, server side (`harmonize = combat`): three rounds of
`radiomics_combat` (client.stages.harmonize) around the server halves of `shared.combat`.

1. `sums` at the training sites → the pooled least-squares fit B̂ and the grand mean;
2. `residuals` at the training sites → the pooled variance σ̂²;
3. `adjust` at the training and external sites: each harmonizes its own rows against
   (B̂, grand mean, σ̂²) and keeps them; it replies with its features' moments before and
   after, from which the one-way ANOVA of site per feature is computed.
A training site that fails or refuses a step stops the harmonization (skipped, with the
reason: the fit needs every training site's sums); an external site that fails `adjust`
is left out of the stage's scoring, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.progress import report_round
from server.core.transport import Reply, SiteSetChanged, Transport, ask_all_ok
from shared import combat, schema

log = logging.getLogger("feddlr")
STAGE = "radiomics:combat"
SITE_EFFECT_P = 0.05  # a feature "differs by site" when the ANOVA's p is below this


@dataclass(frozen=True)
class Options:
    eb: bool = True
    parametric: bool = True
    covariates: tuple[str, ...] = ()

    @classmethod
    def of(cls, rc: Any) -> Options:
        return cls(eb=rc.combat_eb, parametric=rc.combat_parametric,
                   covariates=tuple(rc.combat_covariates))

    def as_dict(self) -> dict[str, Any]:
        return {"eb": self.eb, "parametric": self.parametric,
                "covariates": list(self.covariates)}


class Skipped(RuntimeError):
    """ComBat cannot be fitted; the stage goes on with the features as extracted."""


def run_combat(transport: Transport, context: Mapping[str, Any], train: list[str],
           external: Sequence[str], names: list[str], columns: np.ndarray,
           options: Options) -> dict[str, Any]:
    """Harmonize `columns` at every site; the `radiomics.harmonization` block."""
    block: dict[str, Any] = {"method": "combat", "options": options.as_dict(),
                             "sites": list(train), "external": list(external),
                             "features": len(names)}
    try:
        fit = _fit(transport, context, train, columns, options)
        usable = np.isfinite(fit.beta).all(axis=0) & np.isfinite(fit.var_pooled)
        if not usable.any():
            raise Skipped("every feature has a missing value at a training site")
    except Skipped as err:
        log.info("[%s] skipped: %s", STAGE, err)
        return {**block, "status": "skipped", "reason": str(err)}
    block["not_harmonized"] = {n: "a missing value at a training site (left as extracted)"
                               for n, ok in zip(names, usable, strict=True) if not ok}
    names = [n for n, ok in zip(names, usable, strict=True) if ok]
    columns, fit = columns[usable], combat.ComBatFit(
        fit.beta[:, usable], fit.grand_mean[usable], fit.var_pooled[usable])
    block["features"] = len(names)
    base = {**context, "step": "adjust", "columns": columns, "names": names,
            "n_batch": len(train), "covariates": list(options.covariates),
            "beta": fit.beta, "grand_mean": fit.grand_mean, "var_pooled": fit.var_pooled,
            "eb": options.eb, "parametric": options.parametric}
    queries = {s: {**base, "batch": i} for i, s in enumerate(train)}
    queries.update({s: {**base, "batch": -1} for s in external})
    replies = transport.ask(schema.RADIOMICS_COMBAT, queries, [*train, *external])
    report_round(STAGE, 3, 3, replies)
    lost = {s: _why(replies[s]) for s in train if not replies[s].ok}
    if lost:
        raise SiteSetChanged(schema.RADIOMICS_COMBAT, lost, failed=[
            s for s in lost if replies[s].status != schema.STATUS_DROPPED])
    # a site that adjusted but whose policy withheld its moments is harmonized all the
    # same; it is only missing from the ANOVA of site (`sites_missing`)
    unharmonized = {s: f"ComBat adjust: {_why(replies[s])}" for s in external
                    if not replies[s].ok}
    done = [s for s in [*train, *external] if s not in unharmonized]
    return {**block, "status": "ok", "unharmonized": unharmonized,
            "site_effect": site_effect({s: replies[s] for s in done}, names)}


def _fit(transport: Transport, context: Mapping[str, Any], train: list[str],
         columns: np.ndarray, options: Options) -> combat.ComBatFit:
    if not train:
        raise Skipped("ComBat needs a training site")
    base = {**context, "columns": columns, "n_batch": len(train),
            "covariates": list(options.covariates)}
    sums = _step(transport, "sums", base, train, 1)
    xtx = np.sum([np.asarray(sums[s].payload["sums.xtx"]) for s in train], axis=0)
    xty = np.sum([np.asarray(sums[s].payload["sums.xty"]) for s in train], axis=0)
    try:
        fit = combat.combine_fit(xtx, xty, len(train))
    except np.linalg.LinAlgError:
        raise Skipped("the ComBat design is singular (a covariate constant over the "
                      "training sites, or collinear with the sites)") from None
    residuals = _step(transport, "residuals",
                      {**base, "beta": fit.beta, "grand_mean": fit.grand_mean}, train, 2)
    ssr = np.sum([np.asarray(residuals[s].payload["residuals.ssr"]) for s in train], axis=0)
    n = round(float(np.trace(xtx[:len(train), :len(train)])))
    return combat.ComBatFit(fit.beta, fit.grand_mean, combat.combine_variance(ssr, n))


def _step(transport: Transport, step: str, base: Mapping[str, Any], train: list[str],
          round_no: int) -> dict[str, Reply]:
    queries = {s: {**base, "step": step, "batch": i} for i, s in enumerate(train)}
    replies = ask_all_ok(transport, schema.RADIOMICS_COMBAT, queries, train)
    report_round(STAGE, round_no, 3, replies)
    refused = {s: str(r.payload.get(f"refused.{step}")) for s, r in replies.items()
               if f"refused.{step}" in r.payload}
    if refused:
        raise Skipped("; ".join(f"{s} refused the ComBat {step}: {why}"
                                for s, why in refused.items()))
    return replies


def _why(reply: Reply) -> str:
    if not reply.ok:
        return f"{reply.status}: {reply.reason}"
    refused = [str(v) for k, v in reply.payload.items() if k.startswith("refused.")]
    return "refused: " + ("; ".join(refused) or "no moments")


def site_effect(replies: Mapping[str, Reply], names: list[str]) -> dict[str, Any]:
    """Per feature the one-way ANOVA F and p of site, before and after harmonization, and
    how many features differ by site at p < SITE_EFFECT_P. Sites whose moments were
    refused (`min_patients`) are left out of both, named."""
    usable = [s for s, r in replies.items()
              if all(f"{w}.mean" in r.payload for w in ("before", "after"))]
    out: dict[str, Any] = {"sites": usable, "p_threshold": SITE_EFFECT_P,
                           "sites_missing": sorted(set(replies) - set(usable))}
    if len(usable) < 2:
        return {**out, "reason": "the ANOVA of site needs two or more sites' moments"}
    for when in ("before", "after"):
        test = combat.combine_site_anova(
            np.concatenate([np.asarray(replies[s].payload[f"{when}.n"]).reshape(-1)
                            for s in usable]),
            np.stack([np.asarray(replies[s].payload[f"{when}.mean"]) for s in usable]),
            np.stack([np.asarray(replies[s].payload[f"{when}.m2"]) for s in usable]))
        out[when] = {"n_site_dependent": int(np.sum(test.p < SITE_EFFECT_P)),
                     "df": [test.df_between, test.df_within],
                     "f": dict(zip(names, map(_num, test.f), strict=True)),
                     "p": dict(zip(names, map(_num, test.p), strict=True))}
    return out


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
