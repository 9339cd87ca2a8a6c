"""The authors' least-squares Lasso (`sklearn.linear_model.Lasso(alpha)` on the 0/1 label),
federated:  (1/(2n))·‖y − Xw − b‖² + α‖w‖₁, intercept unpenalized.

Newton mode is one round: at θ = 0 the sites' `glm.local_terms` reply is the sufficient
statistics — `hessian` = X̃'X̃ (n, Σx, X'X), `gradient` = −X̃'y (Σy, X'y), `loss` = ½y'y —
and the server's coordinate descent on that exact quadratic is the answer
(`shared.quadratic`). With sites that refuse p×p matrices, `glm.QuasiNewton` reaches the
same optimum from loss and gradient rounds.

Send pooled z-scores (`shared.standardize`): the intercept is handled inside the quadratic,
which centres X'X with the pooled Σx; with features of mean ≈ 0 that centring is exact to
rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared import glm


def objective(alpha: float) -> glm.Objective:
    """The objective of `Lasso(alpha)` (per-patient squared loss, L1 weight α)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return glm.Objective(glm.SQUARED, C=1.0, l1=float(alpha), per_patient=True)


def solver(alpha: float, n_features: int, hessian: bool = True,
           **options: Any) -> glm.Newton:
    """One exact round (`glm.Newton`), or gradient-only rounds (`glm.QuasiNewton`)."""
    return glm.solver(objective(alpha), n_features, hessian=hessian, **options)


def selected(coef: np.ndarray) -> np.ndarray:
    """Features the Lasso keeps: non-zero coefficients (as the authors' code)."""
    return np.asarray(coef) != 0
