"""Cohort stage, site side: per-label sums, squares and shared-grid histograms of numeric
covariates, and level counts of categorical ones."""

from __future__ import annotations

import numpy as np
import pandas as pd

from client.egress.guard import Statistic
from client.site.session import SiteSession
from shared import cohort, disclosure
from shared.queries import QueryRejected
from shared.schema import Payload


def cohort_sums(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 1: label counts, then per covariate (n, Σx) per group or a level table.

    Crosses the wire: per numeric covariate and label group a count and a sum (each group's
    pair refused below min_patients), and one yes/no per numeric covariate, whether all
    the site's values are whole numbers (refused below min_patients present values); per
    categorical covariate a levels × groups count table (refused with a cell below
    min_cell_count). Never a row.
    """
    y = session.labels()
    ids = session.site.clinical.index.astype(str)
    task = query.get("task", "")
    out = [Statistic("labels", {"n": np.bincount(y, minlength=2).astype(np.int64)},
                     n=None, counts=("n",), patients=list(ids), family=f"cohort.labels:{task}")]
    for name in _covariates(query):
        column = _column(session, name)
        if column is None:
            out.append(Statistic(f"missing.{name}", {"absent": True}, n=None))
        elif _is_numeric(column):
            x = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
            n, total = cohort.local_group_sums(x, y)
            out += [Statistic(f"numeric.{name}.g{g}", {"n": int(n[g]), "sum": float(total[g])},
                              n=int(n[g]), patients=_present(ids, x, y == g),
                              family=f"cohort.sum:{name}") for g in (0, 1)]
            out.append(Statistic(f"integer.{name}", {"flag": cohort.local_is_integer(x)},
                                 n=int(n.sum()), patients=_present(ids, x),
                                 family=f"cohort.integer:{name}"))
        else:
            values = column.to_numpy(dtype=object)
            levels, table = cohort.local_level_counts(values, y)
            present = pd.notna(column).to_numpy()
            out.append(Statistic(f"categorical.{name}", {"levels": levels, "table": table},
                                 n=int(table.sum()), counts=("table",),
                                 patients=list(ids[present]),
                                 family=f"cohort.levels:{name}:{task}"))
    return out


def cohort_squares(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 2: Σ(x − μ_g)² per numeric covariate and group around the pooled means.

    Crosses the wire: one sum of squares per covariate and group, under the same
    min_patients rule as round 1. The centres are the server's, checked finite; over one
    patient set any number of centres gives no more than n, Σx and Σx² of ≥ min_patients
    patients.
    """
    y = session.labels()
    out = []
    for name in _covariates(query):
        means = np.asarray(query.get(f"means.{name}", []), dtype=np.float64).reshape(-1)
        column = _column(session, name)
        if means.shape != (2,) or column is None or not _is_numeric(column):
            continue
        if not np.all(np.isfinite(means)):
            raise QueryRejected(f"cohort squares of {name!r}: centres must be finite")
        x = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
        n, _ = cohort.local_group_sums(x, y)
        ss = cohort.local_group_squares(x, y, means)
        ids = session.site.clinical.index.astype(str)
        # one family whatever the centre: Σ(x − m)² at three centres over one patient set
        # gives its (n, Σx, Σx²), so centres must not open new families (issue 25)
        out += [Statistic(f"squares.{name}.g{g}", {"ss": float(ss[g])}, n=int(n[g]),
                          patients=_present(ids, x, y == g), family=f"cohort.squares:{name}")
                for g in (0, 1)]
    return out


def cohort_histograms(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 3: per numeric covariate and label group, the cells of the server's grid
    (`edges.<name>`) as `shared.cohort.local_group_histograms` makes them: the grid within
    the site's resolution, each cell ≥ min_cell_count patients, reported by its edges.

    Crosses the wire: per covariate and group three integer arrays, first bin, last bin
    and count of each cell; refused below min_patients in the group or with a cell below
    min_cell_count. Never a value: only how many patients lie between two edges of the
    site's coarse grid. Above min_cell_count 1 the ledger holds the coarse grid as a digest
    (`shared.disclosure.pinned`): over the same patients one grid only, whatever run,
    task or nesting (a nested grid's cells minus a coarser one's are cells of one or two).
    """
    y = session.labels()
    min_cell = session.site.config.privacy.min_cell_count
    out = []
    for name in _covariates(query):
        edges = query.get(f"edges.{name}")
        column = _column(session, name)
        if edges is None or column is None or not _is_numeric(column):
            continue
        x = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
        cells = cohort.local_group_histograms(x, y, edges, min_cell)
        ids = session.site.clinical.index.astype(str)
        grid = cohort.site_grid(edges, x, min_cell)
        pin = disclosure.pinned(grid) if min_cell > 1 else grid
        for g, (first, last, count) in enumerate(cells):
            out.append(Statistic(f"hist.{name}.g{g}", {"first": first, "last": last,
                                                       "count": count},
                                 n=int(count.sum()), counts=("count",),
                                 patients=_present(ids, x, y == g),
                                 family=f"cohort.histogram:{name}", grid=pin))
    return out


def _present(ids: pd.Index, x: np.ndarray, rows: np.ndarray | None = None) -> list[str]:
    """The patients a numeric covariate's statistic is computed over: those with a value
    (in `rows`)."""
    keep = ~np.isnan(x) if rows is None else ~np.isnan(x) & rows
    return list(ids[keep])


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
