"""Validation stage: every model's performance per site, per set of sites and pooled, from
label-stratified score histograms on one shared grid — no score leaves a site.

Round 1 (`validation_scores`): each site sends, per model and patient group (all patients,
and each subgroup level), each label's histogram cells on the grid, coarsened to its
min_cell_count, with the cells' Σscore and Σscore². The server pools them per set of sites
(`pooled` = every site, `training`, `external`, each site alone) and computes AUC with the
DeLong CI, the training sites' Youden cut (applied unchanged everywhere, each set's own
optimum reported beside it), ACC/SEN/SPE/PPV/NPV/F1 with Wilson CIs, the calibration curve,
Brier score and calibration slope/intercept (`shared.validation`).
Refinement (`scores_refine`, `server.stages.refine`, at most three rounds): the bins that hold
both labels, pooled over the sites, are split into sub-bins until each is proven to hold
one score value (the bins are then true ties) or a site's min_cell_count stops it; every
site's cells are replaced by its refined ones, on the model's refined grid.
Round 2 (`validation_moments`): for the paired DeLong test between models, the server sends
each set's per-bin placement deviations on the refined grid and the sites return k × k sums.

Exactness: `exact` is true only when refinement proved it for the set — every bin holding
both labels is a cell of its own at every site and holds one score value — and the applied
cut splits no site's cell; the AUC, DeLong CI, paired tests, Youden cut and confusion
metrics then equal those of the raw scores (scikit-learn, pROC). Otherwise `auc_bound`
bounds the AUC of the raw scores. Brier and calibration means are exact for raw scores in
any case; the calibration slope is fitted on the bin centres. A site above min_cell_count
1 bins at most n // min_cell_count of the grid's bins and reports cells by their edges
(issue 25), so at small sites the cells are wider and the bound wider; the estimates place
a cell spanning several bins at its mean score (`pooled_histogram`). A paired test is exact
only where every site says its placements were constant on its cells.

`validation = loso` adds leave-one-site-out: for each training site, the radiomics model is
fitted on the others and validated on it (server.stages.radiomics with a holdout). The refits run
in step (`server.core.in_step`): one batch message per site and round carries every refit's
query, so the three refits of three sites take the rounds of one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.core.in_step import in_step
from server.core.progress import report_round
from server.core.transport import Reply, StageError, StageSkipped, Transport, answered
from server.stages import refine as refinement
from server.stages.radiomics import run_radiomics
from shared import refine, roc, schema
from shared import validation as val
from shared.config import NO_EARLIER, ConfigError, Earlier, StudyConfig, query_needs
from shared.schema import Payload, nest
from shared.settings import config_values, setting

log = logging.getLogger("feddlr")
STAGE = "validation"
ALL = "all"
LOSO_MODELS = ("radiomics",)
GRID_NOTES = {
    "adaptive": ("Per model, validation-bins bins uniform in logit over the pooled mean ± 4 SD "
                 "of its logit scores (one round of sums), plus 0, 1 and the calibration "
                 "edges."),
    "uniform": "validation-bins bins uniform on [0, 1].",
}


@dataclass(frozen=True)
class ValidationConfig:
    """The validation stage's run-config keys (shared/settings.py)."""
    bins: int = setting("validation-bins")
    calibration_bins: int = setting("calibration-bins")
    subgroups: tuple[str, ...] = setting("subgroups")
    models: tuple[str, ...] = setting("validation-models")  # () = every model with scores
    mode: str = setting("validation")  # pooled | loso
    grid: str = setting("validation-grid")  # adaptive (where a model's scores are) | uniform
    level: float = 0.95

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ValidationConfig:
        vc = cls(**config_values(cls, settings))
        if vc.bins % vc.calibration_bins:
            raise ConfigError(f"run config calibration-bins ({vc.calibration_bins}) must divide "
                              f"validation-bins ({vc.bins})")
        return vc

    def uniform(self) -> np.ndarray:
        return roc.grid(self.bins)


@dataclass
class Cells:
    """One site's cells of one (model, group): per label, each cell's grid-bin range
    (`first`, `last`) and its values (`count`, `sum` of scores, `sq` sum of squares).
    After refinement the counts' cells lie on the model's refined grid, the sums keep their
    first-round cells (`sfirst`, `slast`, on the same refined grid), and `part` holds the
    cells as key intervals with the site's one-value flags (`shared.refine.SitePart`)."""

    payload: Payload
    part: refine.SitePart | None = None

    def of(self, label: int, value: str = "count") -> roc.Cells:
        """(first, last, values) of one label, as `shared.roc` takes cells."""
        p = self.payload
        prefix = "s" if value != "count" and f"sfirst{label}" in p else ""
        return (np.asarray(p[f"{prefix}first{label}"]), np.asarray(p[f"{prefix}last{label}"]),
                np.asarray(p[f"{value}{label}"]))

    def key_part(self, bits: np.ndarray) -> refine.SitePart:
        """The cells as key intervals on grid keys `bits` (its refined part if refined)."""
        if self.part is not None:
            return self.part
        pair = tuple(refine.KeyCells.from_grid(*self.of(g), bits) for g in (0, 1))
        return refine.SitePart(pair)  # type: ignore[arg-type]


@dataclass
class SiteScores:
    roles: list[str]
    kinds: dict[str, str]
    cells: dict[str, dict[str, Cells]] = field(default_factory=dict)  # model → group → cells
    refused: dict[str, dict[str, str]] = field(default_factory=dict)  # model → group → reason


def run_validation(transport: Transport, config: StudyConfig, sites: list[str],
                   earlier: Earlier = NO_EARLIER) -> dict[str, Any]:
    vc = ValidationConfig.from_settings(config.settings)
    context = {"task": config.task, "needs": query_needs(STAGE), "bins": vc.bins,
               "subgroups": list(vc.subgroups), "models": list(vc.models),
               "runs": earlier.runs(config)}
    scores, status, context = collect(transport, context, sites, vc)
    answered({s: Reply(s, **v) for s, v in status.items()}, sites,  # rounds 0 and 1
             min_replies=config.min_replies, what="the validation rounds")
    if not any(s.cells for s in scores.values()):
        raise StageSkipped("no site has scores of any model to validate: "
                           + "; ".join(f"{s}: {v.get('reason') or 'no predictions'}"
                                       for s, v in status.items()))
    base = {m: grids(context, vc).get(m, vc.uniform()) for m in _models(scores)}
    edges, refined = refine_scores(transport, context, scores, base)
    result = validate(scores, vc, edges, base)
    result["refinement"] = _refinement_block(refined, result)
    result["sites"] = status
    result["comparisons"] = compare(transport, context, scores, result, vc, edges)
    if vc.mode == "loso":
        result["loso"] = leave_one_site_out(transport, config, sites, scores, vc)
    return result


def collect(transport: Transport, context: Payload, sites: list[str], vc: ValidationConfig
            ) -> tuple[dict[str, SiteScores], dict[str, dict[str, Any]], Payload]:
    """Rounds 0 and 1: each model's grid (adaptive grids), then every site's cells by model
    and group; a failed site is recorded, not fatal. Returns the context with the grids."""
    status: dict[str, dict[str, Any]] = {}
    if vc.grid == "adaptive":
        context, sites = _place_grids(transport, context, sites, vc, status)
    replies = transport.ask(schema.VALIDATION_SCORES, context, sites)
    report_round(f"{STAGE}:histograms", 1, 1, replies)
    out: dict[str, SiteScores] = {}
    for site, reply in sorted(replies.items()):
        status[site] = {"status": reply.status, "reason": reply.reason}
        if reply.ok:
            out[site] = _site_scores(reply)
    return out, dict(sorted(status.items())), context


def _place_grids(transport: Transport, context: Payload, sites: list[str],
                 vc: ValidationConfig, status: dict[str, dict[str, Any]]
                 ) -> tuple[Payload, list[str]]:
    """Round 0: per model, the pooled mean and SD of the logit scores → the model's grid
    (`shared.validation.grid_from_moments`), sent to the sites with round 1's query."""
    replies = transport.ask(schema.VALIDATION_RANGES, context, sites)
    report_round(f"{STAGE}:ranges", 1, 1, replies)
    parts: dict[str, list[np.ndarray]] = {}
    for site, reply in replies.items():
        if not reply.ok:
            status[site] = {"status": reply.status, "reason": reply.reason}
            continue
        for i, model in enumerate(reply.payload.get("catalog.models", [])):
            if f"m{i}.moments" in reply.payload:
                parts.setdefault(model, []).append(reply.payload[f"m{i}.moments"])
    models = sorted(parts)
    context = dict(context, **{"grid.models": models})
    for i, model in enumerate(models):
        context[f"grid.e{i}"] = val.grid_from_moments(parts[model], vc.bins, vc.calibration_bins)
    return context, [s for s in sites if s not in status]


def grids(context: Payload, vc: ValidationConfig) -> dict[str, np.ndarray]:
    """Each model's grid edges (the uniform grid for a model without its own)."""
    names = list(context.get("grid.models", []))
    return {m: np.asarray(context[f"grid.e{i}"]) for i, m in enumerate(names)}


def _site_scores(reply: Reply) -> SiteScores:
    p = reply.payload
    models = list(p.get("catalog.models", []))
    site = SiteScores(list(p.get("catalog.roles", [])),
                      dict(zip(models, p.get("catalog.kinds", []), strict=True)))
    for i, model in enumerate(models):
        site.cells[model], site.refused[model] = {}, {}
        for j, group in enumerate(p.get(f"m{i}.groups", [])):
            part = nest(p, f"m{i}.g{j}")
            if "count0" in part:
                site.cells[model][group] = Cells(part)
            else:
                site.refused[model][group] = str(p.get(f"refused.m{i}.g{j}", "not sent"))
    return site


def _models(scores: dict[str, SiteScores]) -> list[str]:
    return sorted({m for v in scores.values() for m in v.cells})


def refine_scores(transport: Transport, context: Payload, scores: dict[str, SiteScores],
                  base: dict[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], refinement.Refinement]:
    """Refinement rounds (`server.stages.refine`) on every model's first-round cells; each site's
    cells are replaced by its refined ones. Returns each model's refined grid edges."""
    first = {m: {} for m in base}
    for site, v in scores.items():
        for model, by_group in v.cells.items():
            bits = refine.bit_edges(base[model])
            for group, cells in by_group.items():
                first[model].setdefault(group, {})[site] = tuple(
                    refine.KeyCells.from_grid(*cells.of(g), bits) for g in (0, 1))
    state = refinement.run(transport, context, refinement.start(first, base), base, STAGE)
    edges = {}
    for model in base:
        bits = state.bits(model)
        edges[model] = refine.float_edges(bits)
        for group, by_site in first[model].items():
            for site, pair in by_site.items():
                scores[site].cells[model][group] = _refined_cells(
                    scores[site].cells[model][group], pair, state.part(model, group, site),
                    bits)
    return edges, state


def _refined_cells(cells: Cells, before: tuple[refine.KeyCells, ...], part: refine.SitePart,
                   bits: np.ndarray) -> Cells:
    payload = dict(cells.payload)
    for g in (0, 1):
        payload[f"first{g}"], payload[f"last{g}"], payload[f"count{g}"] = part.cells[g].on(bits)
        payload[f"sfirst{g}"], payload[f"slast{g}"], _ = before[g].on(bits)
    return Cells(payload, part)


def _refinement_block(state: refinement.Refinement, result: dict[str, Any]) -> dict[str, Any]:
    """results `validation.refinement`: rounds and reply bytes spent, and per model the
    refined grid's size and whether the pooled statistics are exact on the raw scores."""
    per_model = {m: {"bins": len(state.bits(m)) - 1,
                     "rounds": len(state.history.get(m, [])),
                     "exact": (result[m].get("pooled") or {}).get("exact")}
                 for m in result["models"]}
    return {**state.summary(), "models": per_model,
            "note": "after the first histogram round the server asked sub-histograms of the "
                    "bins holding both labels (and whether each site's patients there share "
                    "one value) until each such bin was proven to hold one score value, or "
                    "a site's min_cell_count stopped it; `exact` is then exact on the raw "
                    "scores"}


def site_sets(scores: dict[str, SiteScores], model: str) -> dict[str, list[str]]:
    """The sets of sites a model is validated on: pooled, training, external."""
    have = sorted(s for s, v in scores.items() if model in v.cells)
    train = [s for s in have if "train" in scores[s].roles]
    external = [s for s in have if s not in train and "external" in scores[s].roles]
    sets = {"pooled": have, "training": train, "external": external}
    return {name: members for name, members in sets.items() if members}


def validate(scores: dict[str, SiteScores], vc: ValidationConfig,
             model_grids: dict[str, np.ndarray],
             base: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every model's metrics blocks on its (refined) grid `model_grids`; the results list
    the first-round grid `base`."""
    models = _models(scores)
    edges = {m: model_grids.get(m, vc.uniform()) for m in models}
    first = {m: (base or {}).get(m, edges[m]) for m in models}
    result: dict[str, Any] = {
        "grid": {"kind": vc.grid, "bins": vc.bins, "calibration_bins": vc.calibration_bins,
                 "edges": {m: np.asarray(e).tolist() for m, e in first.items()},
                 "note": GRID_NOTES[vc.grid] + (
                     " Statistics come from label-stratified histograms of the scores on the "
                     "grid, refined where bins held both labels (`refinement`). `exact`: "
                     "the AUC, DeLong CI, paired tests, Youden cut and confusion metrics "
                     "equal those of the raw scores (proven: every bin holding both labels "
                     "holds one score value). Otherwise cells a site merged for its "
                     "min_cell_count are spread evenly, and `auc_bound` bounds the AUC of "
                     "the raw scores.")},
        "models": models,
        "sets": {},
    }
    for model in models:
        grid = edges[model]
        sets = site_sets(scores, model)
        result["sets"][model] = sets
        ref = "training" if "training" in sets else "pooled"
        cut_block = metrics(_parts(scores, sets[ref], model, ALL), grid, vc, None)
        threshold = cut_block.get("own", {}).get("threshold")
        block: dict[str, Any] = {
            "kinds": {s: scores[s].kinds.get(model) for s in sets["pooled"]},
            "threshold": {"value": threshold, "source": ref,
                          "rule": "Youden J on the grid's edges, score >= threshold"},
        }
        for name, members in sets.items():
            block[name] = metrics(_parts(scores, members, model, ALL), grid, vc, threshold,
                                  _missing(scores, members, model, ALL), source=ref)
        block["sites"] = {s: metrics(_parts(scores, [s], model, ALL), grid, vc, threshold,
                                     _missing(scores, [s], model, ALL), source=ref)
                          for s in sets["pooled"]}
        groups = sorted({g for s in sets["pooled"]
                         for g in (*scores[s].cells[model], *scores[s].refused[model])} - {ALL})
        block["subgroups"] = {g: metrics(_parts(scores, sets["pooled"], model, g), grid, vc,
                                         threshold, _missing(scores, sets["pooled"], model, g),
                                         source=ref) for g in groups}
        result[model] = block
    return result


def _parts(scores: dict[str, SiteScores], sites: list[str], model: str, group: str
           ) -> list[Cells]:
    return [scores[s].cells[model][group] for s in sites
            if group in scores[s].cells.get(model, {})]


def _missing(scores: dict[str, SiteScores], sites: list[str], model: str, group: str
             ) -> list[str]:
    """Sites whose policy refused this group's histogram (a group absent at a site, e.g. no
    patient with that level, is not missing)."""
    return sorted(s for s in sites if group in scores[s].refused.get(model, {}))


def pooled_histogram(parts: list[Cells], edges: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray, bool]:
    """(2 × bins) counts, Σscore and Σscore² per (label, grid bin) over the sites' cells: a
    cell spanning several bins in the bin of its mean score where its sums are on its
    cells (`roc.place_at_means`), else spread evenly over them (`roc.expand`: refined
    cells, whose sums stayed on the first round's)."""
    bins = len(edges) - 1
    out = np.zeros((3, 2, bins))
    exact = True
    for p in parts:
        for g in (0, 1):
            if not _sums_on_cells(p, g):
                for v, value in enumerate(("count", "sum", "sq")):
                    spread, whole = roc.expand([p.of(g, value)], bins)
                    out[v, g] += spread
                    exact &= whole or v > 0
            else:
                placed = roc.place_at_means(p.of(g), p.of(g, "sum")[2], p.of(g, "sq")[2], edges)
                for v in range(3):
                    out[v, g] += placed[v]
                first, last, count = p.of(g)
                exact &= bool(np.all((np.asarray(first) == np.asarray(last))
                                     | (np.asarray(count) == 0)))
    return out[0], out[1], out[2], exact


def _sums_on_cells(cells: Cells, g: int) -> bool:
    """Whether a site's label-g sums are on its count cells (not refined apart from them)."""
    p = cells.payload
    if f"sum{g}" not in p:
        return False
    if f"sfirst{g}" not in p:
        return True
    return all(np.array_equal(np.asarray(p[f"s{e}{g}"]), np.asarray(p[f"{e}{g}"]))
               for e in ("first", "last"))


def metrics(parts: list[Cells], edges: np.ndarray, vc: ValidationConfig, threshold: float | None,
            missing: list[str] | None = None, source: str = "") -> dict[str, Any]:
    """One set's metrics block (results `validation.<model>.<set>`)."""
    out: dict[str, Any] = {"sites_missing": missing or []}
    if not parts:
        return {**out, "auc": None, "reason": "no site released this histogram"}
    hist, sums, squares, _ = pooled_histogram(parts, edges)
    n0, n1 = hist.sum(axis=1)
    out["n"] = [round(float(n0)), round(float(n1))]
    if n0 == 0 or n1 == 0:
        return {**out, "auc": None, "reason": "only one label present"}
    with np.errstate(invalid="ignore", divide="ignore"):
        delong = val.combine_delong([hist], vc.level)  # SE undefined with one of a label
    bits = grid_keys(edges)
    key_parts = [p.key_part(bits) for p in parts]
    bound = refine.auc_bound(bits, key_parts)
    own = val.combine_youden([hist], edges)
    cut = own.threshold if threshold is None else threshold
    proven = refine.is_exact(bits, key_parts)
    exact = proven and _cut_between_cells(parts, edges, cut)
    diag = val.diagnostics(val.combine_confusion([hist], edges, cut), vc.level)
    calibration = val.combine_calibration([hist], [sums], edges, vc.calibration_bins)
    slope = _calibration_slope(hist, edges)
    fpr, tpr = val.combine_roc_curve([hist])
    rates = {"acc": diag.accuracy, "sen": diag.sensitivity, "spe": diag.specificity,
             "ppv": diag.ppv, "npv": diag.npv, "f1": diag.f1}
    out.update({
        "auc": delong.auc, "auc_ci": [delong.lower, delong.upper], "auc_se": delong.se,
        "auc_bound": [delong.auc, delong.auc] if proven else list(bound), "exact": exact,
        "threshold": cut, "threshold_source": source or "own",
        "confusion": diag.confusion.tolist(),
        **{k: r.value for k, r in rates.items()},
        "ci": {k: [r.lower, r.upper] for k, r in rates.items()},
        "own": {"threshold": own.threshold, "sen": own.sensitivity, "spe": own.specificity,
                "j": own.j},
        "brier": val.combine_brier([hist], [sums], [squares]),
        "calibration_intercept": slope[0], "calibration_slope": slope[1],
        "calibration": {"prob_true": calibration.prob_true.tolist(),
                        "prob_pred": calibration.prob_pred.tolist(),
                        "count": calibration.count.tolist()},
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    })
    return out


def grid_keys(edges: np.ndarray) -> np.ndarray:
    """Score keys of a grid's edges: a first-round grid (last edge 1.0, closed) or a refined
    one (`shared.refine.float_edges`, last edge just above 1.0)."""
    edges = np.asarray(edges, dtype=np.float64)
    return refine.bit_edges(edges) if edges[-1] <= 1.0 else refine.keys(edges)


def _cut_between_cells(parts: list[Cells], edges: np.ndarray, cut: float) -> bool:
    """The cut `score >= cut` splits no site's cell: the confusion counts are then exact."""
    k = int(np.searchsorted(edges, cut))
    for part in parts:
        for g in (0, 1):
            first, last, count = (np.asarray(v) for v in part.of(g))
            if np.any((first < k) & (last >= k) & (count > 0)):
                return False
    return True


def _calibration_slope(hist: np.ndarray, edges: np.ndarray) -> tuple[float | None, ...]:
    """(intercept, slope) of the logistic recalibration; None when the labels are separated
    by the scores or all scores share one bin (no finite maximum-likelihood fit)."""
    try:
        fit = val.combine_calibration_slope([hist], edges)
    except np.linalg.LinAlgError:
        return None, None
    if fit.iterations >= 100 or not np.isfinite([fit.intercept, fit.slope]).all():
        return None, None
    return fit.intercept, fit.slope


def compare(transport: Transport, context: Payload, scores: dict[str, SiteScores],
            result: dict[str, Any], vc: ValidationConfig,
            edges: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Round 2: paired DeLong tests between every two models on the same sites' patients,
    for the pooled, training and external sets and each site, on the models' refined grids
    `edges` (sent with the query, so that the sites bin their patients on them)."""
    plans = _comparison_sets(scores, result)
    if not plans:
        return []
    names = sorted(edges)
    query: dict[str, Any] = dict(context, sets=[name for name, _, _ in plans],
                                 **{"grid.models": names},
                                 **{f"grid.e{i}": edges[m] for i, m in enumerate(names)})
    deviations: dict[str, list[np.ndarray]] = {}
    for s, (name, members, models) in enumerate(plans):
        hists = [pooled_histogram(_parts(scores, members, m, ALL), edges[m])[0] for m in models]
        deviations[name] = hists
        devs = [val.placement_deviations(h) for h in hists]
        query[f"s{s}.models"] = models
        query[f"s{s}.d10"] = _padded([d[1] for d in devs])  # refined grids differ in size
        query[f"s{s}.d01"] = _padded([d[2] for d in devs])
    sites = sorted({site for _, members, _ in plans for site in members})
    replies = transport.ask(schema.VALIDATION_MOMENTS, query, sites)
    report_round(f"{STAGE}:moments", 1, 1, replies)
    out = []
    for s, (name, members, models) in enumerate(plans):
        moments, complete = [], True
        for site in members:
            part = nest(replies[site].payload, f"s{s}") if replies[site].ok else {}
            if "moments" not in part:
                complete = False
                continue
            complete &= _same_patients(part, scores[site], models)
            complete &= int(part.get("exact", 1)) == 1  # placements constant on its cells
            moments.append(part["moments"])
        pairs = list(itertools.combinations(range(len(models)), 2))
        if len(moments) != len(members):
            out += [_comparison(name, models[a], models[b], None,
                                reason="a site did not release the placement sums")
                    for a, b in pairs]
            continue
        if deviations[name][0].sum(axis=1).min() < 2:
            out += [_comparison(name, models[a], models[b], None,
                                reason="fewer than 2 patients of a label: no DeLong variance")
                    for a, b in pairs]
            continue
        aucs, cov = val.combine_delong_covariance(deviations[name], moments)
        exact = complete and all(_set_block(result[m], name).get("exact") for m in models)
        for a, b in pairs:
            out.append(_comparison(name, models[a], models[b],
                                   val.paired_delong(aucs, cov, a, b), exact))
    return out


def _padded(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of different lengths as one k × max-length array (zeros after each row's end;
    a site indexes each model's row only with that model's bins)."""
    out = np.zeros((len(rows), max(len(r) for r in rows)))
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _same_patients(part: Payload, site: SiteScores, models: list[str]) -> bool:
    """The site's patients scored by all models are those of each model's histogram."""
    n = [int(v) for v in part["n"]]
    for model in models:
        if [int(np.sum(site.cells[model][ALL].of(g)[2])) for g in (0, 1)] != n:
            return False
    return True


def _comparison_sets(scores: dict[str, SiteScores], result: dict[str, Any]
                     ) -> list[tuple[str, list[str], list[str]]]:
    """(set name, sites, models) for every set where two or more models have an AUC."""
    plans = []
    names: dict[str, list[str]] = {}
    for model in result["models"]:
        for set_name, members in result["sets"][model].items():
            names.setdefault(set_name, members)
    candidates = [(n, m) for n, m in names.items()] + [(f"site:{s}", [s]) for s in
                                                        sorted(scores)]
    for set_name, members in candidates:
        models = [m for m in result["models"]
                  if all(ALL in scores[s].cells.get(m, {}) for s in members)
                  and _set_block(result[m], set_name).get("auc") is not None]
        if len(models) >= 2:
            plans.append((set_name, members, models))
    return plans


def _set_block(block: dict[str, Any], set_name: str) -> dict[str, Any]:
    if set_name.startswith("site:"):
        return block["sites"].get(set_name[5:], {})
    return block.get(set_name, {})


def _comparison(set_name: str, a: str, b: str, test: val.PairedDeLong | None,
                exact: bool = False, reason: str = "") -> dict[str, Any]:
    if test is None:
        return {"set": set_name, "models": [a, b], "auc": None, "delta_auc": None, "z": None,
                "p_value": None, "reason": reason}
    return {"set": set_name, "models": [a, b], "auc": [test.auc1, test.auc2],
            "delta_auc": test.delta, "z": test.z, "p_value": test.p, "exact": exact}


def leave_one_site_out(transport: Transport, config: StudyConfig, sites: list[str],
                       scores: dict[str, SiteScores], vc: ValidationConfig) -> dict[str, Any]:
    """For each training site h: the radiomics model fitted on the other sites (its own
    federated fit, under run key `<run>-loso-<h>` at the sites), then validated on h."""
    train = sorted(s for s, v in scores.items() if "train" in v.roles)
    if len(train) < 2:
        return {"models": list(LOSO_MODELS), "sites": {},
                "reason": "leave-one-site-out needs two or more training sites"}
    context = {"task": config.task, "needs": query_needs(STAGE), "bins": vc.bins,
               "subgroups": [], "models": list(LOSO_MODELS)}

    def refit(held: str) -> Callable[[Transport], dict[str, Any]]:
        return lambda lane: _held_out(lane, config, sites, held, context, vc)

    log.info("[%s] leave-one-site-out: %d refits in step", STAGE, len(train))
    rows = in_step(transport, {f"without {held}": refit(held) for held in train})
    matrix = {held: rows[f"without {held}"] for held in train}
    return {"models": list(LOSO_MODELS), "sites": matrix,
            "note": "each row: the model fitted federated on every other site, validated on "
                    "the held-out site; DSFR and the CNNs are not refitted per held-out site"}


def _held_out(transport: Transport, config: StudyConfig, sites: list[str], held: str,
              context: dict[str, Any], vc: ValidationConfig) -> dict[str, Any]:
    """The radiomics model fitted without `held` (run key `<run>-loso-<held>` at the
    sites), validated on `held`: its row of the leave-one-site-out matrix."""
    variant = f"loso-{held}"
    log.info("[%s] leave-one-site-out: fitting without %s", STAGE, held)
    try:
        run_radiomics(transport, config, sites, holdout=[held], variant=variant)
    except (StageError, StageSkipped) as err:
        return {m: {"auc": None, "reason": str(err)} for m in LOSO_MODELS}
    held_scores, _, used = collect(transport, {**context, "run-variant": variant}, [held], vc)
    base = {m: grids(used, vc).get(m, vc.uniform()) for m in _models(held_scores)}
    edges, _ = refine_scores(transport, used, held_scores, base)
    row = {}
    for model in LOSO_MODELS:
        site = held_scores.get(held)
        parts = _parts(held_scores, [held], model, ALL) if site else []
        block = metrics(parts, edges.get(model, vc.uniform()), vc, None, [] if parts else [held])
        row[model] = {k: block.get(k) for k in ("auc", "auc_ci", "auc_se", "auc_bound",
                                                "exact", "n", "reason")}
    return row


def thresholds(validation: dict[str, Any]) -> dict[str, float]:
    """Each validated model's training-site Youden threshold (for `Earlier.thresholds`)."""
    return {m: float(validation[m]["threshold"]["value"]) for m in validation.get("models", [])
            if validation[m]["threshold"].get("value") is not None}
