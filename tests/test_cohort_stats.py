"""Federated cohort statistics against scipy on the pooled rows (real data, non-IID sites)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from shared import cohort
from tests.splits import gbsg2, non_iid_split, wisconsin

TOL = 1e-9


def federated_moments(sites: list[pd.DataFrame], column: str, label: str) -> cohort.GroupMoments:
    sums = [cohort.local_group_sums(s[column].to_numpy(float), s[label].to_numpy()) for s in sites]
    n, mean = cohort.combine_means([a for a, _ in sums], [b for _, b in sums])
    squares = [cohort.local_group_squares(s[column].to_numpy(float), s[label].to_numpy(), mean)
               for s in sites]
    return cohort.combine_moments(n, mean, squares)


@pytest.mark.parametrize("column", ["mean radius", "mean texture", "worst concavity",
                                    "mean fractal dimension"])
def test_t_tests_match_scipy_on_wisconsin(column: str) -> None:
    frame = wisconsin()
    sites = non_iid_split(frame, by="mean area", n_sites=4, seed=1)
    assert len({round(s["label"].mean(), 2) for s in sites}) == 4  # the sites really differ
    m = federated_moments(sites, column, "label")
    g0, g1 = frame.loc[frame.label == 0, column], frame.loc[frame.label == 1, column]
    np.testing.assert_allclose(m.mean, [g0.mean(), g1.mean()], rtol=TOL)
    np.testing.assert_allclose(m.sd, [g0.std(ddof=1), g1.std(ddof=1)], rtol=TOL)
    student = stats.ttest_ind(g0, g1, equal_var=True)
    welch = stats.ttest_ind(g0, g1, equal_var=False)
    assert cohort.student_t(m).statistic == pytest.approx(student.statistic, rel=TOL)
    assert cohort.student_t(m).p_value == pytest.approx(student.pvalue, rel=1e-7, abs=1e-300)
    assert cohort.welch_t(m).statistic == pytest.approx(welch.statistic, rel=TOL)
    assert cohort.welch_t(m).p_value == pytest.approx(welch.pvalue, rel=1e-7, abs=1e-300)


def test_missing_values_are_not_counted() -> None:
    frame = gbsg2()
    frame["age"] = frame["age"].astype(float)
    frame.loc[::7, "age"] = np.nan
    sites = non_iid_split(frame, by="time", n_sites=3, seed=2)
    m = federated_moments(sites, "age", "cens")
    g = [frame.loc[frame.cens == k, "age"].dropna() for k in (0, 1)]
    np.testing.assert_array_equal(m.n, [len(g[0]), len(g[1])])
    np.testing.assert_allclose(m.sd, [g[0].std(), g[1].std()], rtol=TOL)


def test_site_moments_equal_the_sites_own() -> None:
    frame = gbsg2()
    sites = non_iid_split(frame, by="tsize", n_sites=3, seed=3)
    sums = [cohort.local_group_sums(s["tsize"].to_numpy(float), s["cens"].to_numpy())
            for s in sites]
    _, mean = cohort.combine_means([a for a, _ in sums], [b for _, b in sums])
    for site, (site_n, site_sum) in zip(sites, sums, strict=True):
        ss = cohort.local_group_squares(site["tsize"].to_numpy(float), site["cens"].to_numpy(),
                                        mean)
        own = cohort.site_moments(site_n, site_sum, ss, mean)
        expect = site.groupby("cens")["tsize"].std().to_numpy()
        np.testing.assert_allclose(own.sd, expect, rtol=1e-9)


@pytest.mark.parametrize("column", ["horTh", "menostat", "tgrade"])
def test_chi_square_matches_scipy_on_gbsg2(column: str) -> None:
    frame = gbsg2()
    sites = non_iid_split(frame, by="pnodes", n_sites=3, seed=4)
    parts = [cohort.local_level_counts(s[column].to_numpy(object), s["cens"].to_numpy())
             for s in sites]
    levels, table = cohort.combine_level_counts(parts)
    expected = pd.crosstab(frame[column], frame["cens"]).loc[levels].to_numpy()
    np.testing.assert_array_equal(table, expected)
    ours = cohort.chi_square(table)
    ref = stats.chi2_contingency(expected)
    assert ours.statistic == pytest.approx(ref.statistic, rel=TOL)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-7)
    assert ours.dof == ref.dof
    assert ours.yates == (ref.dof == 1)


def test_level_union_when_a_site_lacks_a_level() -> None:
    frame = gbsg2()
    sites = non_iid_split(frame, by="tgrade", n_sites=3, seed=0)  # sorted: first site has no III
    parts = [cohort.local_level_counts(s["tgrade"].to_numpy(object), s["cens"].to_numpy())
             for s in sites]
    assert any(len(levels) < 3 for levels, _ in parts)
    levels, table = cohort.combine_level_counts(parts)
    assert levels == ["I", "II", "III"]
    assert table.sum() == len(frame)
