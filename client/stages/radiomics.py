"""Radiomics stage, site side: extract (or read) features, then answer solver rounds on
designs the server describes (which rows, which columns, how standardized), and finally
score patients with the fold models — the probabilities stay here.

The feature table, labels and CV folds live in the session for the whole stage; the
out-of-fold (and external) probabilities are written to `<site>/predictions/<run>.csv`
for the fusion and validation stages, and only label-stratified, coarsened histograms of
them are sent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.egress.guard import Statistic, suppress_small
from client.local.extraction import Progress, extract_features, params_file
from client.site.session import SiteSession
from client.stages import rounds
from client.stages.patients import excluded_statistic, progress
from shared import disclosure, logistic, roc, schema, screening, standardize
from shared.folds import site_folds
from shared.policy import PrivacyPolicy
from shared.queries import QueryRejected
from shared.queries.bounds import max_bins, require_gentle, require_spread
from shared.schema import Payload, nest

MODEL = "radiomics"
SOURCE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


@dataclass
class RadiomicsData:
    """One site's rows for the stage: reader-1 features (and reader-2 where present) in the
    agreed column order, labels, folds, and which rows are training rows."""

    patients: pd.Index
    r1: np.ndarray
    r2: np.ndarray | None
    y: np.ndarray
    folds: np.ndarray | None = None


def radiomics_extract(session: SiteSession, query: Payload) -> list[Statistic]:
    """Extract the features of every usable patient (cached per patient on disk), or read
    features.csv.

    Crosses the wire: the feature names (pyradiomics' own names, the same at every site)
    and counts of patients extracted, failed and with a reader-2 mask, small counts
    suppressed, and the patients left out counted by reason (`excluded`, coarsened the same
    way). No feature value.
    """
    r1, r2, failed = _extract(session, query, progress(session, MODEL))
    for patient, reason in failed.items():
        session.log_exclusion(patient, f"radiomics extraction: {reason}")
    policy = session.site.config.privacy
    counts = {
        "n_extracted": np.array([suppress_small(len(r1), policy)]),
        "n_failed": np.array([suppress_small(len(failed), policy)]),
        "n_reader2": np.array([suppress_small(0 if r2 is None else len(r2), policy)]),
    }
    return [Statistic("features", {"names": [str(c) for c in r1.columns],
                                   "source": str(r1.attrs.get("source", "pyradiomics")),
                                   "roles": list(session.site.config.roles)},
                      n=len(r1), patients=[str(p) for p in r1.index], family="radiomics.features"),
            Statistic("counts", counts, n=None, counts=tuple(counts)),
            *excluded_statistic(r1.attrs.get("failed_by_reason", {}), session)]


def _extract(session: SiteSession, query: Payload, say: Progress | None = None
             ) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, str]]:
    params = _params(session, query)
    workers = int(query.get("workers", 0)) or (os.cpu_count() or 1)
    r1, failed = extract_features(session.site, params=params, workers=workers, progress=say)
    r2 = None
    if r1.attrs.get("source") != "features.csv":
        r2, _ = extract_features(session.site, params=params, reader="r2", workers=workers,
                                 progress=say)
    return r1, (r2 if r2 is not None and len(r2) else None), failed


def radiomics_columns(session: SiteSession, query: Payload) -> list[Statistic]:
    """Fix the agreed column order and the CV folds for the rest of the stage, and keep the
    stage's matrix at the site (`cache/radiomics/run-<run>.npz`) for the later rounds,
    which may run in another process.

    Crosses the wire: the number of rows used and of CV folds this site draws them into
    (`shared.folds.site_fold_count`: fewer than `cv-folds` where a fold would hold fewer
    than min_difference patients). The folds are drawn here from the study seed and never
    sent.
    """
    names = list(query["names"])
    r1, r2, _ = _extract(session, query)  # per-patient cache hits
    labels = pd.Series(session.labels(), index=session.site.clinical.index)
    patients = r1.index.intersection(labels.index, sort=False)
    data = RadiomicsData(
        patients=patients,
        r1=r1.loc[patients, names].to_numpy(dtype=np.float64),
        r2=None if r2 is None else r2.reindex(patients)[names].to_numpy(dtype=np.float64),
        y=labels.loc[patients].to_numpy(dtype=np.int64),
    )
    held_out = session.site_id in [str(s) for s in query.get("holdout", [])]
    folds = 0
    if "train" in session.site.config.roles and not held_out:
        data.folds, folds = site_folds(data.y, int(query["cv-folds"]), int(query["seed"]),
                                       session.site_id, session.site.config.privacy.difference)
    save_state(session, str(query.get("run_id", "")), data)
    return [Statistic("rows", {"n": len(data.y), "folds": folds}, n=len(data.y),
                      patients=[str(p) for p in patients], family="radiomics.rows")]


def source_of(query: Payload) -> str:
    """Whose rows a query is about: `radiomics` (default) or another feature table fitted
    with the same machinery (`dsfr`, whose rows client.stages.training keeps here)."""
    source = str(query.get("source", MODEL) or MODEL)
    if not SOURCE_PATTERN.match(source):
        raise ValueError(f"bad feature source {source!r}")
    return source


def _state_path(session: SiteSession, run_id: str, source: str = MODEL,
                harmonized: bool = False) -> Path:
    name = f"run-{run_id or 'local'}{'-combat' if harmonized else ''}.npz"
    return session.site.root / "cache" / source / name


def save_state(session: SiteSession, run_id: str, data: RadiomicsData,
               source: str = MODEL, harmonized: bool = False) -> None:
    """Keep a stage's rows at the site for the later rounds (any process). The rows after
    ComBat are kept beside the rows as extracted, never over them: a process that has the
    extracted rows in memory cannot mistake them for the harmonized ones, and a fit that
    restarts harmonizes from the extracted rows again."""
    path = _state_path(session, run_id, source, harmonized)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"patients": np.asarray(data.patients, dtype=str), "r1": data.r1, "y": data.y}
    if data.r2 is not None:
        arrays["r2"] = data.r2
    if data.folds is not None:
        arrays["folds"] = data.folds
    np.savez(path, **arrays)
    session.cache[_state_key(run_id, source, harmonized)] = data


def _state_key(run_id: str, source: str, harmonized: bool) -> str:
    return f"{source}.{run_id}{'.combat' if harmonized else ''}"


def state(session: SiteSession, query: Payload) -> RadiomicsData:
    """The stage's rows, from this process's memory or from the site's disk: after ComBat
    when the query says `combat` (the server adds it once the stage has harmonized)."""
    run_id, source = str(query.get("run_id", "")), source_of(query)
    harmonized = bool(query.get(schema.COMBAT, False))
    key = _state_key(run_id, source, harmonized)
    if key not in session.cache:
        path = _state_path(session, run_id, source, harmonized)
        if not path.is_file():
            raise ValueError("radiomics rows not set up for this run (no radiomics_columns)"
                             if not harmonized else "no harmonized rows for this run (no "
                             "ComBat adjust at this site)")
        with np.load(path) as saved:
            session.cache[key] = RadiomicsData(
                patients=pd.Index(saved["patients"]), r1=saved["r1"], y=saved["y"],
                r2=saved.get("r2"), folds=saved.get("folds"))
    return session.cache[key]


def radiomics_step(session: SiteSession, query: Payload) -> list[Statistic]:
    """One solver round for every fold's fit (standardization, ICC, LASSO, screening, LR)."""
    which = rows_of(query)
    return rounds.solver_step(session, query, lambda s, q: design(s, {**q, **which}), which)


def rows_of(query: Payload) -> dict[str, Any]:
    """Which of the site's kept rows a query's solvers read: the feature source, and
    whether after ComBat; the per-solver queries inherit it."""
    return {"source": source_of(query), schema.COMBAT: bool(query.get(schema.COMBAT, False))}


def design(session: SiteSession, q: Payload) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x, y, patients) for one solver query: rows `train` (all), `train-fold` (not in
    `fold`) or `readers` (patients with both masks, x as 2 readers × n × p); columns by index
    into the agreed names; z-scored when the query carries `center` and `scale`."""
    data = state(session, q)
    rows = _rows(data, q)
    patients = [str(p) for p in data.patients[rows]]
    columns = np.asarray(q["columns"], dtype=np.int64) if "columns" in q else slice(None)
    if q.get("rows") == "readers":
        pair = np.stack([data.r1[rows][:, columns], data.r2[rows][:, columns]])
        return pair, data.y[rows], patients
    x = data.r1[rows][:, columns]
    if "center" in q or "scale" in q:
        center, scale = standardize.check_scaling(
            x, q.get("center", ()), q.get("scale", ()),
            session.site.config.privacy.max_coefficient)
        x = (x - center) / scale
    return x, data.y[rows], patients


def _rows(data: RadiomicsData, q: Payload) -> np.ndarray:
    kind = q.get("rows", "train")
    if kind == "readers":
        if data.r2 is None:
            return np.zeros(len(data.y), dtype=bool)
        return ~np.isnan(data.r2).any(axis=1)
    if data.folds is None:
        raise ValueError("this site has no training rows (role external)")
    if kind == "train":
        return np.ones(len(data.y), dtype=bool)
    if kind == "train-fold":
        return data.folds != int(q["fold"])
    raise ValueError(f"unknown rows {kind!r}")


def radiomics_score(session: SiteSession, query: Payload) -> list[Statistic]:
    """Score patients with the fold models: a training site scores each patient with the
    model of the fold that held it out; an external site with the mean probability of all
    fold models. The probabilities are written here and stay here.

    Crosses the wire: per label a histogram of the scores on the shared grid, coarsened so
    that every non-empty cell holds at least min_cell_count patients.
    """
    data = state(session, query)
    models = [nest(query, f"fold{k}") for k in range(int(query["n_models"]))]
    if data.folds is not None and len(data.folds) and len(models) <= int(data.folds.max()):
        raise QueryRejected(f"{len(models)} fold models for this site's "
                            f"{int(data.folds.max()) + 1} folds")
    max_coefficient = session.site.config.privacy.max_coefficient
    per_model = np.stack([_predict(data.r1, m, max_coefficient) for m in models])  # (folds, n)
    if data.folds is not None:
        scores = per_model[data.folds, np.arange(len(data.y))]
        kind = "out-of-fold"
    else:
        scores = per_model.mean(axis=0)
        kind = "external"
    _save_predictions(session, str(query.get("run_id", "run")), data, scores, kind,
                      source_of(query))
    edges = roc.grid(int(query.get("bins", roc.DEFAULT_BINS)))
    min_cell = session.site.config.privacy.min_cell_count
    cells = roc.site_cells(scores, data.y, edges, len(data.y), min_cell)  # its resolution
    out = []
    family = disclosure.query_family("radiomics.score", query, drop=("bins",))
    for label in (0, 1):
        first, last, counts = cells[label]
        out.append(Statistic(f"hist{label}", {"first": first, "last": last, "count": counts},
                             n=int(np.sum(data.y == label)), counts=("count",),
                             patients=[str(p) for p in data.patients[data.y == label]],
                             family=family, grid=edges))
    out.append(Statistic("scores", {"kind": kind}, n=None))
    return out


def _predict(r1: np.ndarray, model: Payload, max_coefficient: float) -> np.ndarray:
    """A fold model's probabilities, after checking it as a GLM point: its centre and scale
    against the site's columns and its coefficients per SD of the z-scores here (a steep
    model's scores are a step on one feature, and the histograms of them count the
    patients on either side). Raises `QueryRejected`."""
    columns = np.asarray(model["columns"], dtype=np.int64)
    coef = np.asarray(model["coef"], dtype=np.float64).ravel()
    if coef.shape != columns.shape or np.any(columns >= r1.shape[1]):
        raise QueryRejected("a fold model's coefficients do not match its columns")
    center, scale = standardize.check_scaling(r1[:, columns], model["center"], model["scale"],
                                              max_coefficient)
    z = (r1[:, columns] - center) / scale
    with np.errstate(invalid="ignore"):
        require_gentle(coef, np.nanstd(z, axis=0), max_coefficient, "a fold model")
    return logistic.predict_proba(z, float(model["intercept"]), coef)


def _save_predictions(session: SiteSession, run_id: str, data: RadiomicsData,
                      scores: np.ndarray, kind: str, source: str = MODEL) -> None:
    folder = session.site.root / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"patient_id": data.patients, "model": source, "score": scores,
                          "kind": kind})
    frame.to_csv(folder / f"{source}-{run_id}.csv", index=False)


def _params(session: SiteSession, query: Payload) -> Path:
    """`radiomics-params`: a shipped preset or a YAML file inside the site folder only."""
    return params_file(str(query.get("radiomics-params", "") or ""), session.site.root)


def radiomics_screen(session: SiteSession, query: Payload) -> list[Statistic]:
    """Univariate screening terms for each fold's candidate features.

    Crosses the wire, per fold: for chi2, patients per class and per-class sums of the
    features on the shared unit range (a group sum, under min_patients); for mutual
    information, one bins × classes count table per feature on the server's grid — each
    table is its own statistic, so a feature with a small cell is refused alone.
    """
    out = []
    policy = session.site.config.privacy
    for key in query.get("solvers", []):
        q = dict(nest(query, f"q.{key}"), run_id=query.get("run_id", ""), **rows_of(query))
        try:
            x, y, patients = design(session, q)
            terms = _screen_terms(x, y, q, policy)
        except QueryRejected as err:  # this solver's piece only
            out.append(Statistic(key, {}, n=None, refused=str(err)))
            continue
        # one family per statistic over the stage's rows, whatever centre or grid was sent
        family = disclosure.query_family(f"screen.{q['method']}", rows_of(query))
        columns = [int(c) for c in q.get("columns", range(x.shape[1]))]
        if q["method"] == "chi2":
            out.append(Statistic(key, dict(terms), n=len(y), counts=("count",),
                                 patients=patients, family=family, columns=columns))
            continue
        out += [Statistic(f"{key}.f{j}", {"count": table}, n=len(y), counts=("count",),
                          patients=patients, family=family, columns=[columns[j]])
                for j, table in enumerate(terms["count"])]
    return out


def _screen_terms(x: np.ndarray, y: np.ndarray, q: Payload,
                  policy: PrivacyPolicy) -> dict[str, np.ndarray]:
    """chi2 class sums (each column's unit-range values spread over >= min_patients
    patients, and so their complements: otherwise a centre at one patient's value gives her
    class) or MI count tables on a grid no finer than the site's n and min_cell_count."""
    if q["method"] == "chi2":
        unit = screening.unit_range(x)
        for j in range(unit.shape[1]):
            for weights, side in ((unit[:, j], ""), (1 - unit[:, j], "1 − ")):
                require_spread(weights, policy.min_patients,
                               f"chi2 sums of {side}column {j}'s unit-range values")
        return screening.local_class_sums(unit, y)
    cuts = np.asarray(q["cuts"], dtype=np.float64)
    bins = max_bins(len(y), policy.min_cell_count)
    if len(cuts) + 1 > bins:
        raise QueryRejected(f"{len(cuts) + 1} MI bins: more than this site's {bins} "
                            f"(n // min_cell_count)")
    if not np.all(np.isfinite(cuts)) or np.any(np.diff(cuts) <= 0):
        raise QueryRejected("MI cuts must be finite and increasing")
    return screening.local_binned_counts(x, y, cuts)
