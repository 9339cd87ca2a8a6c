"""Median (Q1, Q3) and the Mann–Whitney U test of the cohort stage against numpy and scipy
on the pooled rows of real data split into non-IID sites (GBSG2's whole-number age and
tumour size; a fractional Wisconsin feature), plus the two shared halves alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from server.core.transport import Reply
from server.workflow import run_study
from shared import cohort, schema
from shared.config import StudyConfig
from simulation.in_process import InProcessTransport
from tests.splits import gbsg2, non_iid_split, wisconsin
from tests.test_cohort_stage import write_site

TOL = 1e-9
NUMERIC = ("age", "tsize")
KEYS = {"q1": 0.25, "median": 0.5, "q3": 0.75}


def gbsg2_folders(root: Path, min_cell_count: int) -> list[Path]:
    frame = gbsg2()
    frame["label"] = frame.pop("cens")
    frame.insert(0, "patient_id", [f"g{i:04d}" for i in range(len(frame))])
    parts = non_iid_split(frame, by="time", n_sites=3, seed=7)
    assert len({round(p.label.mean(), 2) for p in parts}) == 3  # the sites really differ
    return [write_site(root, f"site-{i + 1}", p, min_cell_count=min_cell_count)
            for i, p in enumerate(parts)]


def run_cohort(folders: list[Path], out: Path, transport: InProcessTransport | None = None,
               ) -> dict:
    config = StudyConfig(out_dir=str(out), task="label",
                         cohort_covariates=(*NUMERIC, "horTh"))
    return run_study(transport or InProcessTransport(folders), config)["cohort"]


def rows_of(folders: list[Path], names: tuple[str, ...] | None = None) -> pd.DataFrame:
    return pd.concat([pd.read_csv(f / "clinical.csv") for f in folders
                      if names is None or f.name in names], ignore_index=True)


def mann_whitney(rows: pd.DataFrame, name: str):
    return stats.mannwhitneyu(rows.loc[rows.label == 1, name], rows.loc[rows.label == 0, name],
                              alternative="two-sided", use_continuity=True, method="asymptotic")


def assert_exact(entry: dict, rows: pd.DataFrame, name: str) -> None:
    for key, q in KEYS.items():
        expect = [np.quantile(rows.loc[rows.label == g, name], q) for g in (0, 1)]
        np.testing.assert_allclose(entry[key], expect, rtol=TOL)
        np.testing.assert_allclose(entry[f"{key}_bound"], [[e, e] for e in expect], rtol=TOL)
    assert entry["quantiles_exact"] is True
    test, ref = entry["mann_whitney"], mann_whitney(rows, name)
    assert test["exact"] is True
    assert test["u"] == pytest.approx(ref.statistic, rel=TOL)  # U of label 1 vs label 0
    assert test["p_value"] == pytest.approx(ref.pvalue, rel=TOL)


def assert_bounded(entry: dict, rows: pd.DataFrame, name: str) -> None:
    for key, q in KEYS.items():
        for g in (0, 1):
            true = np.quantile(rows.loc[rows.label == g, name], q)
            low, high = entry[f"{key}_bound"][g]
            assert (low is None or low <= true) and (high is None or true <= high), key
    test, ref = entry["mann_whitney"], mann_whitney(rows, name)
    assert test["u_bound"][0] <= ref.statistic <= test["u_bound"][1]
    assert test["p_bound"][0] <= ref.pvalue <= test["p_bound"][1]


def test_stage_equals_numpy_and_scipy_on_pooled_gbsg2(tmp_path: Path) -> None:
    folders = gbsg2_folders(tmp_path / "sites", min_cell_count=1)
    result = run_cohort(folders, tmp_path / "out")
    rows = rows_of(folders)
    for name in NUMERIC:
        entry = result["covariates"][name]
        assert entry["tests"] == ["t_test", "welch", "mann_whitney"]
        assert entry["histograms_missing"] == [] and entry["grid"]["unit"]
        assert_exact(entry, rows, name)
        for folder in folders:  # each site's own row, on its own patients
            assert_exact(entry["sites"][folder.name], rows_of([folder]), name)
    assert result["covariates"]["horTh"]["tests"] == ["chi2"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "median (Q1, Q3)" in page and "Mann–Whitney U" in page


def test_merged_cells_give_bounds_that_contain_the_pooled_values(tmp_path: Path) -> None:
    folders = gbsg2_folders(tmp_path / "sites", min_cell_count=5)
    result = run_cohort(folders, tmp_path / "out")
    rows = rows_of(folders)
    for name in NUMERIC:
        entry = result["covariates"][name]
        assert entry["mann_whitney"]["exact"] is False
        assert entry["mann_whitney"]["p_value"] is None
        assert_bounded(entry, rows, name)
        for folder in folders:
            assert_bounded(entry["sites"][folder.name], rows_of([folder]), name)


class DropsInRound3(InProcessTransport):
    """site-3 stops answering when the histograms are asked."""

    def ask(self, action, query, sites):
        out = super().ask(action, query, [s for s in sites if s != "site-3"
                                          or action != schema.COHORT_HISTOGRAMS])
        if action == schema.COHORT_HISTOGRAMS and "site-3" in sites:
            out["site-3"] = Reply("site-3", schema.STATUS_DROPPED, reason="node went away")
        return out


def test_a_site_dropping_in_round_3_restarts_the_tables_on_the_survivors(tmp_path: Path,
                                                                        ) -> None:
    folders = gbsg2_folders(tmp_path / "sites", min_cell_count=1)
    result = run_cohort(folders, tmp_path / "out", DropsInRound3(folders))
    assert result["sites_used"] == ["site-1", "site-2"]
    assert [r["action"] for r in result["restarts"]] == [schema.COHORT_HISTOGRAMS]
    assert result["sites"]["site-3"]["reason"].startswith("dropped in round 3")
    rows = rows_of(folders, ("site-1", "site-2"))
    for name in NUMERIC:
        assert_exact(result["covariates"][name], rows, name)


def shared_halves(sites: list[pd.DataFrame], name: str, min_cell: int,
                  ) -> tuple[list[list[cohort.QuantileBound]], cohort.MannWhitney, np.ndarray,
                             pd.DataFrame]:
    """Both halves without the stage: the grid from the pooled moments, the sites' cells;
    a site whose group has fewer than `min_cell` patients (one small cell, which the guard
    refuses) is left out, as the stage leaves it out. Returns the released rows too."""
    present = pd.concat(sites).dropna(subset=[name])
    x, y = present[name].to_numpy(float), present["label"].to_numpy()
    moments = cohort.GroupMoments(np.bincount(y, minlength=2),
                                  np.array([x[y == g].mean() for g in (0, 1)]),
                                  np.array([x[y == g].std(ddof=1) for g in (0, 1)]))
    integer = [cohort.local_is_integer(s[name].to_numpy(float)) for s in sites]
    edges = cohort.grid_edges(*cohort.pooled_spread(moments), all(integer))
    groups: list[list[cohort.CellRanges]] = [[], []]
    released = []
    for site, whole in zip(sites, integer, strict=True):
        cells = cohort.local_group_histograms(site[name].to_numpy(float),
                                              site["label"].to_numpy(), edges, min_cell)
        if any(np.any(count < min_cell) for _, _, count in cells):
            continue
        released.append(site)
        for g in (0, 1):
            groups[g].append(cohort.cell_ranges(cells[g], edges, whole))
    pooled = [cohort.pool_cells(parts) for parts in groups]
    return [cohort.combine_quantiles(p) for p in pooled], \
        cohort.combine_mann_whitney(*pooled), edges, pd.concat(released).dropna(subset=[name])


def check_bounds(quantiles: list[list[cohort.QuantileBound]], test: cohort.MannWhitney,
                 x: np.ndarray, y: np.ndarray) -> None:
    for g in (0, 1):
        for bound, true in zip(quantiles[g], np.quantile(x[y == g], cohort.QUANTILES),
                               strict=True):
            assert bound.lower <= true <= bound.upper
    ref = stats.mannwhitneyu(x[y == 1], x[y == 0], method="asymptotic")
    assert test.u_bound[0] <= ref.statistic <= test.u_bound[1]
    assert test.p_bound[0] <= ref.pvalue <= test.p_bound[1]


def test_shared_halves_on_whole_numbers_with_many_ties() -> None:
    rng = np.random.default_rng(3)
    sites = []
    for shift, n in ((0, 40), (1, 90), (3, 25)):  # each site its own range and label mix
        label = rng.integers(0, 2, n)
        score = rng.integers(0, 6, n) + shift + label  # 6–9 values a site: ties everywhere
        sites.append(pd.DataFrame({"score": score.astype(float), "label": label}))
    sites[1].loc[::9, "score"] = np.nan  # missing values are skipped, as in rounds 1 and 2
    rows = pd.concat(sites).dropna()
    x, y = rows["score"].to_numpy(float), rows["label"].to_numpy()
    quantiles, test, edges, _ = shared_halves(sites, "score", min_cell=1)
    assert np.all(np.diff(edges[1:-1]) == 1.0)
    for g in (0, 1):
        expect = np.quantile(x[y == g], cohort.QUANTILES)
        assert all(b.exact for b in quantiles[g])
        np.testing.assert_allclose([b.estimate for b in quantiles[g]], expect, rtol=TOL)
    ref = stats.mannwhitneyu(x[y == 1], x[y == 0], alternative="two-sided",
                             use_continuity=True, method="asymptotic")
    assert test.exact and test.n == (int(np.sum(y == 0)), int(np.sum(y == 1)))
    assert test.u == pytest.approx(ref.statistic, rel=TOL)
    assert test.p_value == pytest.approx(ref.pvalue, rel=TOL)
    _, ties = np.unique(x, return_counts=True)
    assert test.tie_bound == (np.sum(ties ** 3 - ties),) * 2
    quantiles, test, _, rows = shared_halves(sites, "score", min_cell=8)
    assert not test.exact and np.isnan(test.p_value)
    check_bounds(quantiles, test, rows["score"].to_numpy(float), rows["label"].to_numpy())


@pytest.mark.parametrize("min_cell", [1, 5])
def test_a_fractional_wisconsin_feature_is_bounded(min_cell: int) -> None:
    frame = wisconsin()
    sites = non_iid_split(frame, by="mean area", n_sites=4, seed=1)
    quantiles, test, edges, rows = shared_halves(sites, "mean concave points", min_cell)
    assert len(edges) == cohort.MAX_BINS + 3  # equal bins, not unit ones, for fractions
    assert not test.exact and not any(b.exact for group in quantiles for b in group)
    check_bounds(quantiles, test, rows["mean concave points"].to_numpy(float),
                 rows["label"].to_numpy())
