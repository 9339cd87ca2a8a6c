"""Real data split into non-IID sites, for testing federated statistics against pooled ones."""

from __future__ import annotations

import numpy as np
import pandas as pd


def non_iid_split(frame: pd.DataFrame, by: str, n_sites: int = 3,
                  seed: int = 0) -> list[pd.DataFrame]:
    """Split rows into unequal sites whose distribution of `by` differs (sorted, uneven cuts)."""
    rng = np.random.default_rng(seed)
    ordered = frame.sort_values(by, kind="stable").reset_index(drop=True)
    weights = rng.dirichlet(np.full(n_sites, 2.0)) * 0.6 + 0.4 / n_sites
    cuts = (np.cumsum(weights)[:-1] * len(ordered)).astype(int)
    parts = np.split(np.arange(len(ordered)), cuts)
    return [ordered.iloc[idx].reset_index(drop=True) for idx in parts]


def gbsg2() -> pd.DataFrame:
    from lifelines.datasets import load_gbsg2

    return load_gbsg2().reset_index(drop=True)


def wisconsin() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.copy()
    frame["label"] = (frame.pop("target") == 0).astype(int)  # 1 = malignant
    return frame.reset_index(drop=True)
