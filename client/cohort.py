"""Cohort stage, site side: per-label sums of numeric covariates and level counts."""

from __future__ import annotations

import numpy as np
import pandas as pd

from client.guard import Statistic
from client.session import SiteSession
from shared import cohort
from shared.schema import Payload


def cohort_sums(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 1: label counts, then per covariate (n, Σx) per group or a level table.

    Crosses the wire: per numeric covariate and label group a count and a sum (each group's
    pair refused below min_patients); per categorical covariate a levels × groups count
    table (refused with a cell below min_cell_count). Never a row.
    """
    y = session.labels()
    out = [Statistic("labels", {"n": np.bincount(y, minlength=2).astype(np.int64)},
                     n=None, counts=("n",))]
    for name in _covariates(query):
        column = _column(session, name)
        if column is None:
            out.append(Statistic(f"missing.{name}", {"absent": True}, n=None))
        elif _is_numeric(column):
            x = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
            n, total = cohort.local_group_sums(x, y)
            out += [Statistic(f"numeric.{name}.g{g}", {"n": int(n[g]), "sum": float(total[g])},
                              n=int(n[g])) for g in (0, 1)]
        else:
            levels, table = cohort.local_level_counts(column.to_numpy(dtype=object), y)
            out.append(Statistic(f"categorical.{name}", {"levels": levels, "table": table},
                                 n=int(table.sum()), counts=("table",)))
    return out


def cohort_squares(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 2: Σ(x − μ_g)² per numeric covariate and group around the pooled means.

    Crosses the wire: one sum of squares per covariate and group, under the same
    min_patients rule as round 1.
    """
    y = session.labels()
    out = []
    for name in _covariates(query):
        means = np.asarray(query.get(f"means.{name}", []), dtype=np.float64).reshape(-1)
        column = _column(session, name)
        if means.shape != (2,) or column is None or not _is_numeric(column):
            continue
        x = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
        n, _ = cohort.local_group_sums(x, y)
        ss = cohort.local_group_squares(x, y, means)
        out += [Statistic(f"squares.{name}.g{g}", {"ss": float(ss[g])}, n=int(n[g]))
                for g in (0, 1)]
    return out


def _covariates(query: Payload) -> list[str]:
    names = query.get("covariates", [])
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    return [str(n).strip() for n in names]


def _column(session: SiteSession, name: str) -> pd.Series | None:
    rows = session.site.clinical
    return rows[name] if name in rows.columns else None


def _is_numeric(column: pd.Series) -> bool:
    present = column.dropna()
    present = present[present.astype(str).str.strip() != ""]
    return len(present) > 0 and pd.to_numeric(present, errors="coerce").notna().all()
