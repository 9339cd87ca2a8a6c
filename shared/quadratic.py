"""The server's inner solver: an L1-penalized quadratic, solved exactly.

    minimize_z  ½ z'Hz − b'z + Σ_j λ_j |z_j|        (λ_j = 0: coordinate not penalized)

This is the exact squared-loss Lasso from its sufficient statistics, and the subproblem of
every proximal Newton step of the L1-logistic solver. It is solved by feature-sign search
(Lee, Battle, Raina & Ng 2007), an active-set method that is exact to rounding and finite,
warm-started from the current iterate after a few loose sweeps of coordinate descent.
Cyclic coordinate descent with active-set sweeps (glmnet) to a tight tolerance is the
fallback when an active block of H is singular. Runs on the server only, on summed
statistics.
"""

from __future__ import annotations

import numpy as np


def soft_threshold(x: np.ndarray | float, threshold: np.ndarray | float) -> np.ndarray:
    """sign(x)·max(|x| − t, 0): the proximal map of t·|x|."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.maximum(np.abs(x) - threshold, 0.0)


def l1_quadratic(hessian: np.ndarray, linear: np.ndarray, penalty: np.ndarray,
                 start: np.ndarray | None = None, tol: float = 1e-13,
                 max_sweeps: int = 20_000) -> np.ndarray:
    """argmin ½ z'Hz − b'z + Σ λ_j|z_j| (H positive semi-definite with a positive diagonal)."""
    h = np.asarray(hessian, dtype=np.float64)
    b = np.asarray(linear, dtype=np.float64)
    lam = np.asarray(penalty, dtype=np.float64)
    z = np.zeros_like(b) if start is None else np.asarray(start, dtype=np.float64).copy()
    if np.any(np.diag(h) <= 0):
        raise ValueError("the quadratic needs a positive Hessian diagonal")
    # a few loose sweeps usually find the support and signs; one solve on it is then exact,
    # and feature-sign search finishes the job when it is not
    z = _descend(h, b, lam, z, tol=1e-4, max_sweeps=50)
    exact = _active_set_solve(h, b, lam, z)
    if exact is None:
        exact = _feature_sign(h, b, lam, z, max_steps=20 * len(b) + 100)
    if exact is not None:
        return exact
    for level in (1e-5, 1e-8, tol):  # the active-set solve usually succeeds early
        z = _descend(h, b, lam, z, tol=max(level, tol), max_sweeps=max_sweeps)
        exact = _active_set_solve(h, b, lam, z)
        if exact is not None:
            return exact
    return z


def kkt_violation(hessian: np.ndarray, linear: np.ndarray, penalty: np.ndarray,
                  z: np.ndarray) -> float:
    """Largest violation of the optimality conditions of `l1_quadratic` at z."""
    residual = np.asarray(linear) - np.asarray(hessian) @ z  # = −(gradient of the smooth part)
    on = z != 0
    violation = np.where(on, np.abs(residual - penalty * np.sign(z)),
                         np.maximum(np.abs(residual) - penalty, 0.0))
    return float(np.max(violation, initial=0.0))


def _feature_sign(h: np.ndarray, b: np.ndarray, lam: np.ndarray, z: np.ndarray,
                  max_steps: int) -> np.ndarray | None:
    """Feature-sign search from z; None when it cannot finish (singular block, no progress)."""
    free = lam == 0
    signs = np.where(free, 0.0, np.sign(z))
    slack = _slack(b)
    for _ in range(max_steps):
        residual = b - h @ z  # −(gradient of the smooth part)
        active = (signs != 0) | free
        if np.all(np.abs(residual[active] - lam[active] * signs[active]) <= slack):
            violation = np.where(active, -np.inf, np.abs(residual) - lam)
            j = int(np.argmax(violation))
            if violation[j] <= slack:
                return z
            signs[j] = np.sign(residual[j])  # activate the most violating coordinate
            active[j] = True
        moved = _feature_sign_step(h, b, lam, z, signs, active)
        if moved is None:
            return None
        z = moved
        signs = np.where(free, 0.0, np.sign(z))
    return None


def _feature_sign_step(h: np.ndarray, b: np.ndarray, lam: np.ndarray, z: np.ndarray,
                       signs: np.ndarray, active: np.ndarray) -> np.ndarray | None:
    """Solve the signed problem on the active set, then take the best point of the segment
    towards it among its end and the points where a coefficient changes sign."""
    idx = np.flatnonzero(active)
    try:
        target = np.linalg.solve(h[np.ix_(idx, idx)], b[idx] - lam[idx] * signs[idx])
    except np.linalg.LinAlgError:
        return None
    current = z[idx]
    crosses = (current != 0) & (np.sign(target) != np.sign(current)) & (lam[idx] > 0)
    steps = current[crosses] / (current[crosses] - target[crosses])
    direction = np.zeros_like(z)
    direction[idx] = target - current
    slope, curvature = float((h @ z - b) @ direction), float(direction @ h @ direction)
    best, best_change = None, 0.0
    for step in [1.0, *steps[(steps > 0) & (steps < 1)]]:
        candidate = z + step * direction
        candidate[idx[crosses][steps == step]] = 0.0  # exactly at its sign change
        # the objective's change from small terms: its value itself would cancel
        change = (step * slope + 0.5 * step**2 * curvature
                  + float(lam @ (np.abs(candidate) - np.abs(z))))
        if change <= best_change:
            best, best_change = candidate, change
    return best


def _slack(b: np.ndarray) -> float:
    """Tolerance on the optimality conditions, above the rounding of b − Hz."""
    return 1e-10 * max(1.0, float(np.max(np.abs(b), initial=0.0)))


def _descend(h: np.ndarray, b: np.ndarray, lam: np.ndarray, z: np.ndarray, tol: float,
             max_sweeps: int) -> np.ndarray:
    """Cyclic coordinate descent: a full sweep, then sweeps of the active set until it settles,
    until a full sweep changes nothing."""
    residual = b - h @ z
    root = np.sqrt(np.diag(h))
    coords = everything = np.arange(len(b))
    for _ in range(max_sweeps):
        settled = _sweep(h, lam, z, residual, root, coords) <= tol
        if settled and coords is everything:
            break
        coords = everything if settled else np.flatnonzero((z != 0) | (lam == 0))
    return z


def _sweep(h: np.ndarray, lam: np.ndarray, z: np.ndarray, residual: np.ndarray,
           root: np.ndarray, coords: np.ndarray) -> float:
    """One pass over `coords`, updating z and residual = b − Hz in place. Returns the largest
    change in the metric of H (|Δz_j|·√H_jj), relative to the size of z in that metric."""
    largest = 0.0
    for j in coords:
        diag = h[j, j]
        value = residual[j] + diag * z[j]
        new = np.sign(value) * max(abs(value) - lam[j], 0.0) / diag
        delta = new - z[j]
        if delta != 0.0:
            residual -= h[:, j] * delta
            z[j] = new
            largest = max(largest, abs(delta) * root[j])
    return largest / max(1.0, float(np.max(np.abs(z) * root, initial=0.0)))


def _active_set_solve(h: np.ndarray, b: np.ndarray, lam: np.ndarray,
                      z: np.ndarray) -> np.ndarray | None:
    """Solve H_AA z_A = b_A − λ_A·sign(z_A) on the support of z; the result if it is optimal."""
    active = (z != 0) | (lam == 0)
    signs = np.sign(z[active])
    try:
        solved = np.linalg.solve(h[np.ix_(active, active)], b[active] - lam[active] * signs)
    except np.linalg.LinAlgError:
        return None
    penalized = lam[active] > 0
    if np.any(np.sign(solved[penalized]) != signs[penalized]):
        return None
    exact = np.zeros_like(z)
    exact[active] = solved
    residual = b - h @ exact
    if np.any(np.abs(residual[~active]) > lam[~active] + _slack(b)):
        return None
    return exact
