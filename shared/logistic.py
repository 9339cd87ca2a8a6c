"""Logistic regression as scikit-learn's `LogisticRegression`, fitted by federated rounds.

    L2 (`l1_ratio=0`, the `lbfgs` default):  C·Σ logloss + ½‖w‖²
    L1 (`l1_ratio=1`, `saga`):               C·Σ logloss + ‖w‖₁
with the intercept unpenalized and logloss(y, η) = log(1 + e^η) − yη. The rounds, the site
half (`glm.local_terms`) and the solvers are in `shared.glm`; this module names the
objectives and scores patients at a site.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit

from shared import glm

PENALTIES = ("l1", "l2")


def objective(C: float, penalty: str = "l2") -> glm.Objective:
    """The scikit-learn objective for `LogisticRegression(C=C)` with this penalty."""
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; known: {PENALTIES}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    weight = {"l1": 0.0, "l2": 0.0} | {penalty: 1.0}
    return glm.Objective(glm.LOGISTIC, C=float(C), l1=weight["l1"], l2=weight["l2"])


def solver(C: float, penalty: str, n_features: int, hessian: bool = True,
           **options: Any) -> glm.Newton:
    """`glm.Newton` when every site accepts p×p matrices, else `glm.QuasiNewton`."""
    return glm.solver(objective(C, penalty), n_features, hessian=hessian, **options)


def decision_function(x: np.ndarray, intercept: float, coef: np.ndarray) -> np.ndarray:
    """b + Xw for a site's patients (site-side; scores stay at the site)."""
    return intercept + np.asarray(x, dtype=np.float64) @ np.asarray(coef, dtype=np.float64)


def predict_proba(x: np.ndarray, intercept: float, coef: np.ndarray) -> np.ndarray:
    """P(label = 1) for a site's patients."""
    return expit(decision_function(x, intercept, coef))
