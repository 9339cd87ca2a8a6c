"""Radiomics stage, server side: paper 1's "step one", federated.

1. Sites extract pyradiomics features (or read features.csv) and report their names; the
   study uses the features every site has, in the first site's order.
2. ICC(2,1) between the two readers' features over the sites with reader-2 masks; features
   with ICC ≤ `icc-threshold` are dropped (skipped, with the reason, when no site has them).
3. For each fit unit — the whole training cohort (`all`, what `radiomics.lasso` reports)
   and, with `selection = in-fold`, each CV fold's training rows — pooled standardization,
   LASSO selection (L1-logistic or the authors' squared-loss Lasso), chi2 / binned-MI
   screening (order per `screen-order`), then per fold an L2 logistic regression.
   All units advance together, one Flower round per step.
4. Sites score their patients with the fold models (out-of-fold at training sites, mean
   of the fold models at external ones); the scores stay at the sites, and the pooled AUC
   comes from coarsened label-stratified histograms, with its bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.progress import report_round
from server.core.rounds import RoundRefused, drive, pack
from server.core.transport import (
    Reply,
    StageError,
    StageSkipped,
    Transport,
    ask_all_ok,
    on_stable_sites,
)
from server.stages import harmonize
from server.stages import refine as refinement
from shared import glm, icc, lasso, logistic, roc, schema, screening
from shared.config import ConfigError, StudyConfig
from shared.federated import Solver
from shared.labels import TASK_COLUMNS
from shared.settings import config_values, setting
from shared.standardize import Scaling, Standardize

log = logging.getLogger("feddlr")
STAGE = "radiomics"


@dataclass(frozen=True)
class RadiomicsConfig:
    """The radiomics stage's run-config keys (shared/settings.py: defaults, ranges and
    meanings are declared there); DSFR's head reads the same with its own screening."""

    params: str = setting("radiomics-params")  # "" = the paper's preset
    workers: int = setting("radiomics-workers")
    icc_threshold: float = setting("icc-threshold")
    lasso_loss: str = setting("lasso-loss")
    lasso_C: float = setting("lasso-C")
    lasso_alpha: float = setting("lasso-alpha")
    screen: str = setting("screen")
    screen_percentile: float = setting("screen-percentile")
    screen_order: str = setting("screen-order")
    mi_bins: int = setting("mi-bins")
    lr_C: float = setting("lr-C")
    cv_folds: int = setting("cv-folds")
    selection: str = setting("selection")
    seed: int = setting("seed")
    harmonize: str = setting("harmonize")  # server.stages.harmonize
    combat_eb: bool = setting("combat-eb")
    combat_parametric: bool = setting("combat-parametric")
    combat_covariates: tuple[str, ...] = setting("combat-covariates")
    bins: int = roc.DEFAULT_BINS  # the AUC histogram's bins (not a run-config key)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> RadiomicsConfig:
        """From the typed run config (shared/settings.py checked each value)."""
        rc = cls(**config_values(cls, settings))
        labels = {c for columns in TASK_COLUMNS.values() for c in columns}
        if held := sorted(labels & set(rc.combat_covariates)):
            raise ConfigError(f"run config combat-covariates: {held} hold the task label; "
                              "ComBat must never keep the label's effect")
        return rc


# A site that refuses a fit's query (its p×p matrix, or the points of a probing round; the
# site's max_feature_ratio) switches that fit to the next mode: the same optimum, more
# rounds. Probe points per query of each gradient-only mode (glm.QuasiNewton):
PROBES = {"probing": glm.PROBES, "fewer-probes": glm.PROBES // 2,
          "few-probes": glm.PROBES // 4, "gradient": 0}
FALLBACK = {"newton": "probing", "probing": "fewer-probes", "fewer-probes": "few-probes",
            "few-probes": "gradient"}


@dataclass
class Designed:
    """A solver whose queries also say which rows and columns, standardized how."""

    solver: Solver
    design: dict[str, Any]
    mode: str = "newton"  # newton, or a PROBES mode (FALLBACK: what a refusal switches to)

    @property
    def done(self) -> bool:
        return self.solver.done

    @property
    def rounds(self) -> int:
        return self.solver.rounds

    def query(self) -> dict[str, Any]:
        return {**self.design, **self.solver.query()}

    def update(self, reply: dict[str, np.ndarray]) -> None:
        self.solver.update(reply)


def _solver_options(mode: str) -> dict[str, Any]:
    """glm.solver options of a mode: Newton rounds, or gradient-only with or without
    probe points."""
    return {"hessian": mode == "newton", "probes": PROBES.get(mode, 0)}


class RadiomicsError(StageError):
    """The stage cannot run (no training site, no common features, …): the study records
    it as failed with this reason and goes on with the next stage."""


def run_radiomics(transport: Transport, config: StudyConfig, sites: list[str],
                  holdout: Sequence[str] = (), variant: str = "") -> dict[str, Any]:
    """The stage; `holdout` sites are treated as external (a leave-one-site-out fit, whose
    rows and predictions the sites keep under the run key `<run>-<variant>`)."""
    rc = RadiomicsConfig.from_settings(config.settings)
    context: dict[str, Any] = {"task": config.task, "radiomics-params": rc.params,
                               "workers": rc.workers}
    if holdout:
        context.update({"holdout": list(holdout), "run-variant": variant or "holdout"})
    names, roles, extracted, with_reader2 = _extract(transport, context, sites)
    train = [s for s in extracted if "train" in roles[s] and s not in holdout]
    external = [s for s in extracted if s not in train
                and ("external" in roles[s] or s in holdout)]
    if not train:
        raise RadiomicsError("no training site could serve the radiomics stage")
    setup = dict(context, names=names, **{"cv-folds": rc.cv_folds, "seed": rc.seed})
    rows = _ask(transport, schema.RADIOMICS_COLUMNS, setup, train + external, "columns")

    def fit_on(train_sites: list[str]) -> tuple[RadiomicsFit, dict[str, Any]]:
        fit = RadiomicsFit(transport, context, train_sites, names, rc,
                           [s for s in with_reader2 if s in train_sites], external)
        return fit, fit.run()

    (fit, result), restarts = on_stable_sites(fit_on, train, min_sites=config.min_sites,
                                              stage=STAGE, min_replies=config.min_replies)
    result["restarts"] = restarts
    result["cv_folds_by_site"] = site_folds(rows, fit.sites, rc.cv_folds)
    result.update(_score(transport, fit.context, fit.sites, fit.external, fit, rc))
    result["sites"] = {s: {"status": "ok", "role": "train" if s in fit.sites else "external"}
                       for s in fit.sites + external}
    for s, why in fit.unharmonized.items():
        result["sites"][s] = {"status": "failed", "reason": why}
    for s in sites:
        if s not in result["sites"]:
            left = next((r for r in restarts if s in r["dropped"]), None)
            result["sites"][s] = (
                {"status": "failed" if s in left.get("failed", ()) else "dropped",
                 "reason": left["dropped"][s]} if left
                else {"status": "failed", "reason": "no radiomics features"})
    return result


def site_folds(rows: dict[str, Reply], sites: list[str], cv_folds: int) -> dict[str, Any]:
    """How many of the `cv-folds` folds each training site drew its patients into: fewer
    where a held-out fold would hold fewer than its min_difference patients (its ledger
    would refuse fitting on all rows but that fold); `reduced` names those sites."""
    folds = {s: int(rows[s].payload.get("rows.folds", cv_folds)) for s in sites}
    return {"folds": folds, "reduced": sorted(s for s, k in folds.items() if k < cv_folds)}


def _ask(transport: Transport, action: str, query: dict, sites: list[str],
         what: str) -> dict[str, Reply]:
    replies = ask_all_ok(transport, action, query, sites)
    report_round(f"{STAGE}:{what}", 1, 1, replies)
    return replies


def _extract(transport: Transport, context: dict, sites: list[str],
             ) -> tuple[list[str], dict[str, list[str]], list[str], list[str]]:
    replies = transport.ask(schema.RADIOMICS_EXTRACT, context, sites)
    report_round(STAGE, 1, 0, replies)
    ok = [s for s in sites if replies[s].ok and len(replies[s].payload.get("features.names", []))]
    reader2 = {s: int(np.asarray(replies[s].payload["counts.n_reader2"]).reshape(-1)[0])
               for s in ok}
    if not ok:
        raise StageSkipped("no site has MRI images with masks or a features.csv: " + "; ".join(
            f"{s}: {r.reason or 'no features'}" for s, r in sorted(replies.items())))
    lists = {s: list(replies[s].payload["features.names"]) for s in ok}
    common = set.intersection(*(set(v) for v in lists.values()))
    names = [n for n in lists[ok[0]] if n in common]
    if not names:
        raise RadiomicsError("the sites have no radiomics feature in common")
    roles = {s: list(replies[s].payload.get("features.roles", ["train"])) for s in ok}
    log.info("[%s] %d features common to %d sites", STAGE, len(names), len(ok))
    return names, roles, ok, [s for s in ok if reader2[s] != 0]


class RadiomicsFit:
    """ICC filter, then per fit unit: scaling → LASSO ↔ screening → (per fold) L2 LR."""

    def __init__(self, transport: Transport, context: dict, sites: list[str],
                 names: list[str], rc: RadiomicsConfig, reader2_sites: list[str],
                 external: Sequence[str] = ()) -> None:
        self.transport, self.context, self.sites = transport, context, sites
        self.external = list(external)  # scored with the fold models; harmonized if asked
        self.unharmonized: dict[str, str] = {}  # external site -> why it cannot be scored
        self.names, self.rc, self.reader2_sites = names, rc, reader2_sites
        self.folds = [f"f{k}" for k in range(rc.cv_folds)]
        self.scaled_units = ["all", *self.folds]
        self.units = ["all", *self.folds] if rc.selection == "in-fold" else ["all"]
        self.rounds: dict[str, int] = {}
        self.scaled = np.arange(len(names))  # agreed-name indices every scaling covers
        self.models: dict[str, dict[str, Any]] = {}

    def rows(self, unit: str) -> dict[str, Any]:
        if unit == "all":
            return {"rows": "train"}
        return {"rows": "train-fold", "fold": int(unit[1:])}

    def drive(self, solvers: Mapping[str, Designed], what: str,
              fallback: Callable[[str, str], Designed] | None = None,
              sites: list[str] | None = None) -> dict[str, Designed]:
        """Drive to the end and return the solvers; a unit whose query a site refuses
        restarts in the next mode (FALLBACK: the same optimum, more rounds)."""
        solvers = dict(solvers)
        while True:
            try:
                self.rounds[what] = self.rounds.get(what, 0) + drive(
                    self.transport, schema.RADIOMICS_STEP, solvers, sites or self.sites,
                    self.context, f"{STAGE}:{what}")
                return solvers
            except RoundRefused as err:
                self.rounds[what] = self.rounds.get(what, 0) + err.rounds  # spent all the same
                if fallback is None:
                    raise
                for key, by_site in err.refused.items():
                    mode = FALLBACK.get(solvers[key].mode)
                    if mode is None:
                        raise
                    log.info("[%s] %s: %s refused (%s); %s rounds", STAGE, key,
                             ", ".join(by_site), next(iter(by_site.values())), mode)
                    solvers[key] = fallback(key, mode)

    def run(self) -> dict[str, Any]:
        kept, icc_block = self.icc_filter()
        self.scaled = kept
        harmonization = self.harmonize(kept)
        scaling = self.standardize()
        columns = {u: kept[scaling[u].keep] for u in self.scaled_units}
        selection: dict[str, dict[str, Any]] = {u: {} for u in self.units}
        steps = ["lasso", "screen"] if self.rc.screen_order == "lasso-first" else \
            ["screen", "lasso"]
        for step in steps:
            chosen = (self.lasso if step == "lasso" else self.screen)(columns, scaling,
                                                                       selection)
            columns.update(chosen)
        fold_columns = {f: columns[f if self.rc.selection == "in-fold" else "all"]
                        for f in self.folds}
        self.models = self.logistic(fold_columns, scaling)
        return {**self.results(icc_block, scaling, selection, columns),
                "harmonization": harmonization}

    # -- steps -------------------------------------------------------------------------
    def icc_filter(self) -> tuple[np.ndarray, dict[str, Any]]:
        everything = np.arange(len(self.names))
        if not self.reader2_sites:
            return everything, {"status": "skipped",
                                "reason": "no training site has reader-2 masks (mri_mask_r2)"}
        sites = list(self.reader2_sites)
        while sites:
            solver = Designed(icc.ICC(), {"rows": "readers"})
            try:
                self.drive({"icc": solver}, "icc", sites=sites)
                break
            except RoundRefused as err:
                refusing = set(err.refused.get("icc", {}))
                log.info("[%s] ICC: %s refused (%s); ICC over the other sites", STAGE,
                         ", ".join(sorted(refusing)), err)
                sites = [s for s in sites if s not in refusing]
        if not sites:
            return everything, {"status": "skipped",
                                "reason": "every site with reader-2 masks refused (policy)"}
        values = solver.solver.result.icc
        keep = icc.icc_filter(values, self.rc.icc_threshold).keep
        log.info("[%s] ICC(2,1) > %.2f keeps %d of %d features (%s)", STAGE,
                 self.rc.icc_threshold, int(keep.sum()), len(keep), ", ".join(sites))
        return everything[keep], {"threshold": self.rc.icc_threshold, "sites": sites,
                                  "values": dict(zip(self.names, values.tolist(), strict=True)),
                                  "kept": int(keep.sum())}

    def harmonize(self, kept: np.ndarray) -> dict[str, Any]:
        """ComBat on the kept features (`harmonize = combat`): fitted on every row of the
        training sites (it uses no label, so it comes before any in-fold step), applied at
        each site, external ones included; the ANOVA of site before and after."""
        if self.rc.harmonize != "combat":
            return {"method": "none"}
        result = harmonize.run_combat(self.transport, self.context, self.sites, self.external,
                                  [self.names[c] for c in kept], kept,
                                  harmonize.Options.of(self.rc))
        self.unharmonized = dict(result.pop("unharmonized", {}))
        self.external = [s for s in self.external if s not in self.unharmonized]
        if result.get("status") == "ok":  # the later queries use the harmonized rows
            self.context = {**self.context, schema.COMBAT: True}
        return result

    def standardize(self) -> dict[str, Scaling]:
        solvers = {f"{u}.std": Designed(Standardize(), {**self.rows(u), "columns": self.scaled})
                   for u in self.scaled_units}
        solvers = self.drive(solvers, "standardize")
        return {u: solvers[f"{u}.std"].solver.result for u in self.scaled_units}

    def _z(self, unit: str, scaling: Mapping[str, Scaling], cols: np.ndarray) -> dict[str, Any]:
        """Design fields: the unit's rows, `cols` (agreed-name indices) z-scored with the
        unit's pooled scaling."""
        position = {c: i for i, c in enumerate(self.scaled)}
        where = np.array([position[c] for c in cols], dtype=np.int64)
        scale = scaling[unit]
        return {**self.rows(unit), "columns": np.asarray(cols, dtype=np.int64),
                "center": scale.mean[where], "scale": scale.scale[where]}

    def lasso(self, columns: dict[str, np.ndarray], scaling: Mapping[str, Scaling],
              selection: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
        def make(unit: str, mode: str = "newton") -> Designed:
            p, options = len(columns[unit]), _solver_options(mode)
            solver = (logistic.solver(self.rc.lasso_C, "l1", p, **options)
                      if self.rc.lasso_loss == "logistic"
                      else lasso.solver(self.rc.lasso_alpha, p, **options))
            return Designed(solver, self._z(unit, scaling, columns[unit]), mode)

        solvers = {f"{u}.lasso": make(u) for u in self.units if len(columns[u])}
        solvers = self.drive(solvers, "lasso", lambda key, mode: make(key.split(".")[0], mode))
        out = {}
        for unit in self.units:
            key = f"{unit}.lasso"
            if key not in solvers:
                continue
            fit = solvers[key].solver.fit
            keep = fit.coef != 0
            penalty = ({"C": self.rc.lasso_C} if self.rc.lasso_loss == "logistic"
                       else {"alpha": self.rc.lasso_alpha})
            selection[unit]["lasso"] = {
                "loss": self.rc.lasso_loss, **penalty,
                "coef": {self.names[c]: float(w) for c, w in zip(columns[unit], fit.coef,
                                                                 strict=True)},
                "intercept": fit.intercept,
                "selected": [self.names[c] for c in columns[unit][keep]],
                "rounds": fit.rounds, "mode": fit.mode, "converged": fit.converged,
                "probes": PROBES.get(solvers[key].mode, 0),
            }
            out[unit] = columns[unit][keep]
        return out

    def screen(self, columns: dict[str, np.ndarray], scaling: Mapping[str, Scaling],
               selection: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
        cuts = screening.grid(self.rc.mi_bins)
        queries = {}
        for unit in self.units:
            if len(columns[unit]):
                queries[unit] = {**self._z(unit, scaling, columns[unit]),
                                 "method": self.rc.screen, "cuts": cuts}
        if not queries:
            return {}
        replies = ask_all_ok(self.transport, schema.RADIOMICS_SCREEN,
                             pack(self.context, queries), self.sites)
        report_round(f"{STAGE}:screen", 1, 1, replies)
        out = {}
        for unit, query in queries.items():
            scores, refused = self._scores(unit, len(query["columns"]), replies)
            keep = screening.select_percentile(scores, self.rc.screen_percentile)
            selection[unit]["screen"] = {
                "method": self.rc.screen, "percentile": self.rc.screen_percentile,
                "scores": {self.names[c]: _num(v) for c, v in zip(columns[unit], scores,
                                                                   strict=True)},
                "selected": [self.names[c] for c in columns[unit][keep]],
                "refused_features": [self.names[c] for c in columns[unit][refused]],
            }
            out[unit] = columns[unit][keep]
        return out

    def _scores(self, unit: str, p: int,
                replies: Mapping[str, Reply]) -> tuple[np.ndarray, np.ndarray]:
        payloads = [r.payload for r in replies.values()]
        if self.rc.screen == "chi2":
            if any(f"{unit}.count" not in pl for pl in payloads):
                return np.full(p, np.nan), np.ones(p, dtype=bool)
            count = np.sum([pl[f"{unit}.count"] for pl in payloads], axis=0)
            sums = np.sum([pl[f"{unit}.sum"] for pl in payloads], axis=0)
            return screening.combine_chi2(count, sums)[0], np.zeros(p, dtype=bool)
        scores, refused = np.full(p, np.nan), np.zeros(p, dtype=bool)
        for j in range(p):
            tables = [pl.get(f"{unit}.f{j}.count") for pl in payloads]
            if any(t is None for t in tables):
                refused[j] = True  # a site's min_cell_count refused this feature's table
                continue
            scores[j] = screening.mutual_information(np.sum(tables, axis=0)[None])[0]
        return scores, refused

    def logistic(self, columns: Mapping[str, np.ndarray],
                 scaling: Mapping[str, Scaling]) -> dict[str, dict[str, Any]]:
        def make(fold: str, mode: str = "newton") -> Designed:
            return Designed(logistic.solver(self.rc.lr_C, "l2", len(columns[fold]),
                                            **_solver_options(mode)),
                            self._z(fold, scaling, columns[fold]), mode)

        solvers = {f"{f}.lr": make(f) for f in self.folds}
        solvers = self.drive(solvers, "logistic",
                             lambda key, mode: make(key.split(".")[0], mode))
        models = {}
        for fold in self.folds:
            fit = solvers[f"{fold}.lr"].solver.fit
            design = solvers[f"{fold}.lr"].design
            models[fold] = {"columns": columns[fold], "center": design["center"],
                            "scale": design["scale"], "coef": fit.coef,
                            "intercept": fit.intercept, "rounds": fit.rounds}
        return models

    def results(self, icc_block: dict, scaling: Mapping[str, Scaling],
                selection: dict[str, dict[str, Any]],
                columns: Mapping[str, np.ndarray]) -> dict[str, Any]:
        everything = scaling["all"]
        names = [self.names[c] for c in self.scaled]
        folds = []
        for fold in self.folds:
            model = self.models[fold]
            features = [self.names[c] for c in model["columns"]]
            folds.append({
                "fold": int(fold[1:]),
                "features": features,
                "coef": {self.names[c]: float(w) for c, w in zip(model["columns"],
                                                                 model["coef"], strict=True)},
                "intercept": float(model["intercept"]),
                "center": dict(zip(features, np.asarray(model["center"]).tolist(), strict=True)),
                "scale": dict(zip(features, np.asarray(model["scale"]).tolist(), strict=True)),
                "lasso_selected": selection.get(fold, {}).get("lasso", {}).get("selected"),
            })
        lasso_all = selection["all"].get("lasso", {})
        return {
            "features": {"n_extracted": len(self.names), "names_sample": self.names[:5]},
            "icc": icc_block.get("values", icc_block),
            "icc_filter": {k: v for k, v in icc_block.items() if k != "values"},
            "standardization": {
                "mean": dict(zip(names, everything.mean.tolist(), strict=True)),
                "std": dict(zip(names, everything.scale.tolist(), strict=True)),
                "dropped": {self.names[self.scaled[j]]: why
                            for j, why in everything.dropped.items()},
            },
            "lasso": lasso_all,
            "screen": selection["all"].get("screen", {}),
            "selected": [self.names[c] for c in columns["all"]],
            "selection": self.rc.selection,
            "folds": folds,
            "rounds": self.rounds,
        }


def _score(transport: Transport, context: dict, train: list[str], external: list[str],
           fit: RadiomicsFit, rc: RadiomicsConfig) -> dict[str, Any]:
    query: dict[str, Any] = dict(context, n_models=len(fit.folds), bins=rc.bins)
    for k, fold in enumerate(fit.folds):
        model = fit.models[fold]
        for field in ("columns", "center", "scale", "coef"):
            query[f"fold{k}.{field}"] = np.asarray(model[field])
        query[f"fold{k}.intercept"] = float(model["intercept"])
    replies = transport.ask(schema.RADIOMICS_SCORE, query, train + external)
    report_round(f"{STAGE}:score", 1, 1, replies)
    grid = roc.grid(rc.bins)
    first = refinement.first_round({s: r.payload for s, r in replies.items() if r.ok}, grid)
    model = str(context.get("source") or "radiomics")
    state = refinement.refine_auc(transport, context, model, grid, first, STAGE)
    out: dict[str, Any] = {"auc": {}}
    for name, group in (("train_oof", train), ("external", external)):
        if group:
            out["auc"][name] = _auc(state, model, [s for s in group if replies[s].ok])
    out["auc"]["sites"] = {s: _auc(state, model, [s]) for s in train + external
                           if replies[s].ok}
    out["auc"]["grid"] = {"bins": rc.bins, "method": "coarsened label-stratified histograms, "
                          "refined where bins held both labels (`refinement`)"}
    out["auc"]["refinement"] = state.summary()
    return out


def _auc(state: refinement.Refinement, model: str, sites: list[str]) -> dict[str, Any]:
    """Pooled AUC over the sites that released both labels' histograms, refined
    (`server.stages.refine.auc_block`: `exact` on the raw scores, else `bound`); `sites_missing`
    names a site whose policy refused one (e.g. fewer than min_patients of a label), left
    out whole so that the AUC is that of a well-defined set of patients."""
    missing = sorted(s for s in sites if s not in state.cells[model]["all"])
    present = [s for s in sites if s not in missing]
    if not present:
        return {"auc": None, "reason": "a label's histogram was refused or absent",
                "sites_missing": missing}
    block = refinement.auc_block(state, model, present)
    if block.get("auc") is None:
        return {**block, "reason": "a label's histogram was refused or absent",
                "sites_missing": missing}
    return {**block, "auc": _num(block["auc"]), "bound": [_num(v) for v in block["bound"]],
            "sites_missing": missing}


def _num(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)
