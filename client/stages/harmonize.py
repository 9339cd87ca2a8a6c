"""ComBat harmonization, site side (`harmonize = combat` in the radiomics stage and for the
DSFR features): the site halves of `shared.combat`, on the stage's rows.

One action, `radiomics_combat`, in three steps the server runs in order:
- `sums`: X'X and X'y of the site's rows of the pooled design (its own site indicator,
  then the `combat-covariates`);
- `residuals`: per feature the sum of squared residuals of the pooled fit;
- `adjust`: the site's own location and scale, their empirical-Bayes posterior and the
  adjustment, all computed here. The harmonized table is written to
  `<site>/harmonized/<source>-<run>.csv` (patient_id + features; never sent), the stage's
  later rounds use it, and the reply holds only the features' moments before and after,
  for the ANOVA of site.
An external site answers only `adjust`: it harmonizes against the training sites' fit.
Every value is computed on the reader-1 features as extracted; the harmonized rows are kept
beside them (`client.stages.radiomics.save_state(harmonized=True)`), and the stage's later queries
ask for them by `combat`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from client.egress.guard import Statistic
from client.site.session import SiteSession
from client.stages.radiomics import RadiomicsData, save_state, source_of, state
from shared import combat, disclosure
from shared.schema import Payload


class CovariateError(ValueError):
    """A ComBat covariate this site cannot provide (missing column, missing value)."""


def radiomics_combat(session: SiteSession, query: Payload) -> list[Statistic]:
    step = str(query.get("step", ""))
    if step not in STEPS:
        raise ValueError(f"unknown ComBat step {step!r}; known: {', '.join(STEPS)}")
    patients = [str(p) for p in state(session, query).patients]  # every step: all rows
    columns = [int(c) for c in query["columns"]]
    return [replace(s, patients=patients, columns=columns, family=disclosure.query_family(
                f"combat.{step}.{s.name}", query, drop=("columns", "names")))
            for s in STEPS[step](session, query)]


def _rows(session: SiteSession, query: Payload
          ) -> tuple[RadiomicsData, np.ndarray, np.ndarray, np.ndarray]:
    """The stage's rows as extracted, with (features y, covariates, column indices)."""
    data = state(session, query)
    columns = np.asarray(query["columns"], dtype=np.int64)
    return data, data.r1[:, columns], covariates(session, data.patients, query), columns


def covariates(session: SiteSession, patients: pd.Index, query: Payload) -> np.ndarray:
    """The `covariates` columns of clinical.csv for `patients`, as numbers (n × c)."""
    names = [str(c) for c in query.get("covariates", [])]
    clinical = session.site.clinical
    out = np.zeros((len(patients), len(names)))
    for j, name in enumerate(names):
        if name not in clinical.columns:
            raise CovariateError(f"{session.site_id}: clinical.csv has no column {name!r} "
                                 "(a combat-covariates column)")
        values = pd.to_numeric(clinical.loc[patients, name], errors="coerce")
        bad = values.index[values.isna()]
        if len(bad):
            raise CovariateError(f"{session.site_id}: clinical.csv column {name!r} has no "
                                 f"number for patient {bad[0]} ({len(bad)} patient(s)); "
                                 "ComBat covariates must be numeric (code a category 0/1)")
        out[:, j] = values.to_numpy(dtype=float)
    return out


def _design(session: SiteSession, query: Payload) -> tuple[np.ndarray, np.ndarray]:
    """(y, X): the features and the site's rows of the pooled design."""
    _, y, cov, _ = _rows(session, query)
    return y, combat.design(len(y), int(query["batch"]), int(query["n_batch"]), cov)


def _moments(name: str, y: np.ndarray) -> Statistic:
    return Statistic(name, combat.local_site_moments(y), n=len(y))


def _sums(session: SiteSession, query: Payload) -> list[Statistic]:
    """Crosses the wire: X'X and X'y (`shared.combat.local_design_sums`): aggregates over
    the site's patients, refused below `min_patients` like every statistic."""
    y, x = _design(session, query)
    return [Statistic("sums", combat.local_design_sums(y, x), n=len(y))]


def _fit(query: Payload, with_variance: bool) -> combat.ComBatFit:
    return combat.ComBatFit(beta=np.asarray(query["beta"], dtype=float),
                            grand_mean=np.asarray(query["grand_mean"], dtype=float),
                            var_pooled=np.asarray(query["var_pooled"], dtype=float)
                            if with_variance else None)


def _residuals(session: SiteSession, query: Payload) -> list[Statistic]:
    """Crosses the wire: per feature the sum over the site's patients of the squared
    residual of the pooled fit (one number per feature)."""
    y, x = _design(session, query)
    ssr = combat.local_residual_squares(y, x, _fit(query, with_variance=False))
    return [Statistic("residuals", {"ssr": ssr}, n=len(y))]


def _adjust(session: SiteSession, query: Payload) -> list[Statistic]:
    """Harmonize the site's rows and keep them here. Crosses the wire: only each feature's
    moments at this site (n, mean, sum of squared deviations) before and after, for the
    ANOVA of site."""
    data, y, cov, columns = _rows(session, query)
    adjusted, _ = combat.local_adjustment(
        y, cov, _fit(query, with_variance=True), eb=bool(query.get("eb", True)),
        parametric=bool(query.get("parametric", True)))
    r1 = data.r1.copy()
    r1[:, columns] = adjusted
    run_id, source = str(query.get("run_id", "")), source_of(query)
    save_state(session, run_id, replace(data, r1=r1), source, harmonized=True)
    _write_table(session.site.root, source, run_id, data.patients,
                 [str(n) for n in query.get("names", [])] or [f"f{c}" for c in columns],
                 adjusted)
    return [_moments("before", y), _moments("after", adjusted)]


def _write_table(root: Path, source: str, run_id: str, patients: pd.Index,
                 names: list[str], values: np.ndarray) -> None:
    folder = root / "harmonized"
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(values, columns=names)
    frame.insert(0, "patient_id", np.asarray(patients, dtype=str))
    frame.to_csv(folder / f"{source}-{run_id or 'local'}.csv", index=False)


STEPS = {"sums": _sums, "residuals": _residuals, "adjust": _adjust}
