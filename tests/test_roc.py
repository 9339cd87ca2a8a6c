"""Pooled AUC from coarsened label-stratified histograms against scikit-learn's roc_auc_score."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from shared import roc
from tests.splits import non_iid_split, wisconsin


def scored_sites(n_sites: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    frame = wisconsin()
    x = StandardScaler().fit_transform(frame[["mean texture", "mean smoothness"]])
    frame["score"] = LogisticRegression().fit(x, frame.label).predict_proba(x)[:, 1]
    return [(s.score.to_numpy(), s.label.to_numpy())
            for s in non_iid_split(frame, by="mean area", n_sites=n_sites, seed=3)]


def federated_auc(sites: list, min_cell: int, bins: int = 200) -> roc.HistogramAUC:
    hists = [roc.local_histogram(s, y, roc.grid(bins)) for s, y in sites]
    return roc.combine_auc([roc.coarsen(h[0], min_cell) for h in hists],
                           [roc.coarsen(h[1], min_cell) for h in hists])


@pytest.mark.parametrize("min_cell", [1, 3, 5])
def test_bound_holds_the_pooled_auc(min_cell: int) -> None:
    sites = scored_sites()
    truth = roc_auc_score(np.concatenate([y for _, y in sites]),
                          np.concatenate([s for s, _ in sites]))
    result = federated_auc(sites, min_cell)
    assert result.lower <= truth <= result.upper
    assert result.lower <= result.auc <= result.upper
    assert result.n == (357, 212)


def test_without_suppression_a_fine_grid_is_nearly_exact() -> None:
    sites = scored_sites()
    truth = roc_auc_score(np.concatenate([y for _, y in sites]),
                          np.concatenate([s for s, _ in sites]))
    result = federated_auc(sites, min_cell=1, bins=2000)
    assert result.upper - result.lower < 0.01
    assert result.auc == pytest.approx(truth, abs=2e-3)


def test_coarsened_cells_are_never_small() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        counts = rng.poisson(rng.uniform(0.05, 3), size=rng.integers(1, 60))
        first, last, merged = roc.coarsen(counts, 3)
        assert merged.sum() == counts.sum()
        if counts.sum() >= 3:
            assert np.all(merged >= 3)
        assert np.all(first <= last) and np.all(last[:-1] < first[1:])
        for f, la, m in zip(first, last, merged, strict=True):
            assert counts[f] > 0 and counts[la] > 0 and counts[f:la + 1].sum() == m
