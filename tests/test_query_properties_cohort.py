"""The cohort queries (cohort_sums, cohort_squares, cohort_histograms) over any parameters a
hostile coordinator may send — covariate lists of any names, centres of any value and
shape, grids of any size, order, range and finiteness, any task — against a default-policy
site (38 patients, min_cell_count 3): the site never crashes (every reply is `ok` or
`refused`), and what it releases is what its policy allows, checked against its own
clinical.csv:
- every level-table cell is 0 or ≥ min_cell_count;
- a histogram's cells tile the server's grid (a cell reports its edges, not the bins of
  its youngest and oldest patient), lie on at most n // min_cell_count of its bins, hold ≥
  min_cell_count patients each, and count exactly the patients between their edges;
- over one patient set the site releases a column's histogram on one coarse grid only,
  whatever grids, tasks and nestings the coordinator tries;
- a sum of squares is released only at finite centres and equals Σ(x − m)².
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.egress.ledger import LEDGER_FILE
from client.handlers import serve
from client.site.session import AUDIT_DIR, clear_sessions
from shared import roc, schema
from shared.labels import LabelError, task_label
from shared.queries.bounds import max_bins
from simulation.cohort import simulate_cohort

MIN_CELL = 3
NUMERIC = ("age", "tumour_size_mm", "ki67")
NAMES = st.one_of(
    st.lists(st.sampled_from(NUMERIC), min_size=1, max_size=3),
    st.lists(st.sampled_from([*NUMERIC, "hr_status", "lesion_type", "nope", "age ",
                              "dfs_time", "patient_id", "../clinical"]), max_size=4))
TASKS = st.sampled_from(["her2-positive", "her2-low", "label", "", "bogus"])
LABELLED = st.sampled_from(["her2-positive", "her2-low"])  # the site can label these
SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
RELEASED_GRIDS: dict[tuple[str, str], set[tuple[float, ...]]] = {}
RELEASES: list[str] = []  # histograms checked by the histogram property


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("cohort-properties")
    simulate_cohort(root / "sites", n_sites=1, n_patients=38, seed=4, images=False)
    clear_sessions()
    folder = root / "sites" / "site-1"
    return folder, pd.read_csv(folder / "clinical.csv", dtype={"her2_ish": str})


def labels(rows: pd.DataFrame, task: str) -> np.ndarray:
    def one(ihc: object, ish: object) -> float:
        try:
            return float(task_label(task, ihc, None if pd.isna(ish) else ish, None))
        except LabelError:
            return np.nan
    return np.array([one(i, s) for i, s in zip(rows.her2_ihc, rows.her2_ish, strict=True)])


@st.composite
def grids(draw: st.DrawFn) -> object:
    """Edges a server might send: unit bins, equal bins, random, with open ends or not,
    unsorted, with an inner infinity or nan, 2-D, one edge, huge."""
    kind = draw(st.sampled_from(["unit", "unit", "equal", "random", "random", "unsorted",
                                 "inner-inf", "nan", "2d", "one", "huge"]))
    lo = draw(st.floats(-50, 80))
    if kind == "unit":
        edges = np.arange(lo, lo + draw(st.integers(1, 1500))) + 0.5
    elif kind == "equal":
        edges = np.linspace(lo, lo + draw(st.floats(0.1, 200)), draw(st.integers(2, 2001)))
    elif kind == "huge":
        edges = np.arange(5000.0)
    else:
        edges = np.unique(np.asarray(draw(st.lists(st.floats(-10, 120), min_size=1,
                                                   max_size=60)), dtype=np.float64))
    if draw(st.booleans()):
        edges = np.r_[-np.inf, edges, np.inf]
    if kind == "unsorted":
        return edges[::-1].copy()
    if kind == "inner-inf" and len(edges) > 2:
        edges = edges.copy()
        edges[len(edges) // 2] = np.inf
    if kind == "nan":
        return np.r_[edges, np.nan]
    if kind == "2d":
        return np.stack([edges, edges])
    if kind == "one":
        return edges[:1]
    return edges


def ask(folder: Path, action: str, query: dict) -> dict:
    reply = serve(folder, action, {"needs": ["clinical"], **query}, "prop")
    if query["task"] in ("label", "bogus", ""):  # no label column, no such task, none: the
        # site cannot serve; it says so, and sends nothing
        assert reply["status"] != schema.STATUS_OK or query["task"] == ""
        assert set(reply) <= {"status", "reason", "ledger.checked"}
        assert "Traceback" not in reply.get("reason", "")
    else:
        assert reply["status"] in (schema.STATUS_OK, schema.STATUS_REFUSED), reply
    return reply


@settings(SETTINGS, max_examples=250, derandomize=True)  # a fixed release count
@given(task=st.one_of(LABELLED, TASKS), names=NAMES, grid=grids(), fresh=st.booleans(),
       data=st.data())
def histograms_release_only_coarse_cells_of_three(site, task, names, grid, fresh,
                                                  data) -> None:
    """With the ledger kept (one grid per patient set) or new (`fresh`: every example's
    cells are checked, not only the first grid's)."""
    folder, rows = site
    if fresh:
        (folder / AUDIT_DIR / LEDGER_FILE).unlink(missing_ok=True)
        clear_sessions()
        RELEASED_GRIDS.clear()
    gridded = [*names, *data.draw(st.lists(st.sampled_from(NUMERIC), max_size=1))]
    query = {"task": task, "covariates": names,
             **{f"edges.{n}": np.asarray(grid).tolist() for n in gridded}}
    reply = ask(folder, schema.COHORT_HISTOGRAMS, query)
    y = labels(rows, task) if task in ("her2-positive", "her2-low", "label") else None
    for name in NUMERIC:
        for g in (0, 1):
            key = f"hist.{name}.g{g}"
            if f"{key}.count" not in reply:
                continue
            edges = np.asarray(query[f"edges.{name}"], dtype=np.float64)
            first, last, count = (np.asarray(reply[f"{key}.{k}"]) for k in
                                  ("first", "last", "count"))
            x = rows[name].to_numpy(dtype=np.float64)
            present = ~np.isnan(x) & ~np.isnan(y)
            assert np.all(count >= MIN_CELL)
            assert first[0] == 0 and last[-1] == len(edges) - 2
            assert np.array_equal(first[1:], last[:-1] + 1)  # cells tile the grid
            assert len(count) <= max_bins(int(present.sum()), MIN_CELL)
            coarse = set(roc.site_edges(edges, int(present.sum()), MIN_CELL).tolist())
            assert set((last + 1).tolist()) <= coarse
            mine = x[present & (y == g)]
            bins = np.clip(np.searchsorted(edges, mine, side="right") - 1, 0, len(edges) - 2)
            assert count.tolist() == [int(np.sum((bins >= a) & (bins <= b)))
                                      for a, b in zip(first, last, strict=True)]
            RELEASED_GRIDS.setdefault((name, task), set()).add(tuple(edges[sorted(coarse)]))
            RELEASES.append(name)
    for (name, _), released in RELEASED_GRIDS.items():  # the ledger pins one grid
        assert len(released) <= 1, name


def test_histograms_release_only_coarse_cells_of_three(site) -> None:
    """The property above, not vacuous: many histograms were released and checked (counted
    here, so the count holds however the tests are selected or ordered)."""
    RELEASES.clear()
    histograms_release_only_coarse_cells_of_three(site)
    assert len(RELEASES) >= 50, len(RELEASES)  # 70 (derandomized)


@SETTINGS
@given(task=TASKS, names=NAMES, centres=st.lists(
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e3, 1e3)),
    max_size=3))
def test_squares_only_at_finite_centres_and_exact(site, task, names, centres) -> None:
    folder, rows = site
    query = {"task": task, "covariates": names, **{f"means.{n}": centres for n in names}}
    reply = ask(folder, schema.COHORT_SQUARES, query)
    for name in NUMERIC:
        for g in (0, 1):
            key = f"squares.{name}.g{g}.ss"
            if key not in reply:
                continue
            assert len(centres) == 2 and np.all(np.isfinite(centres))
            y = labels(rows, task)
            x = rows[name].to_numpy(dtype=np.float64)
            mine = x[~np.isnan(x) & (y == g)]
            assert len(mine) >= 10
            assert reply[key] == pytest.approx(np.sum((mine - centres[g]) ** 2), rel=1e-9)


@SETTINGS
@given(task=TASKS, names=NAMES)
def test_level_tables_hold_no_small_cell(site, task, names) -> None:
    folder, _ = site
    reply = ask(folder, schema.COHORT_SUMS, {"task": task, "covariates": names})
    for key, value in reply.items():
        if key.endswith(".table"):
            table = np.asarray(value)
            assert np.all((table == 0) | (table >= MIN_CELL)), key
        if key.startswith("numeric.") and key.endswith(".n"):
            assert value >= 10
