"""Penalized GLMs (logistic and least squares) fitted by federated rounds.

Objective, with θ = (b, w) = (intercept, coefficients) and the intercept never penalized:

    F(θ) = s·Σ_sites Σ_i loss(y_i, b + x_i'w) + l1·‖w‖₁ + (l2/2)·‖w‖²,   s = C or C/n

- logistic loss log(1 + e^η) − yη with s = C: scikit-learn's `LogisticRegression(C)`
  (l2 = 1 for the L2 penalty, l1 = 1 for the L1 one);
- squared loss ½(y − η)² with s = 1/n and l1 = α: scikit-learn's `Lasso(alpha)`.

Site half (`local_terms`): the loss, its gradient and (Newton mode) its Hessian at the
points the server sends — all sums over the site's patients. Server half: solvers that are
state machines driven one round at a time (see `shared.federated`):

- `Newton`: (proximal) Newton. Each round the sites send X̃'WX̃ ((p+1)², X̃ = [1, X]),
  X̃'(μ − y) and the loss at one point; the server minimizes the quadratic model (a linear
  solve for L2, `shared.quadratic.l1_quadratic` for L1) and line-searches on the pooled
  objective by step halving. Each trial point is the next round's query, so an accepted
  trial already carries the next Hessian. For the squared loss the model is exact: 1 round.
- `QuasiNewton` (the fallback when a site refuses p×p matrices, `max_feature_ratio`): the
  same loop, but the sites send loss and gradient only and the server builds a BFGS model
  of the Hessian from successive gradients (proximal quasi-Newton, Lee, Sun & Saunders 2014).
- `ProximalGradient`: FISTA with backtracking and adaptive restart, also gradient-only;
  simpler and cheaper per round on the server, but tens of times more rounds.

Points are rows (intercept first, then the p coefficients); a query of m points gets
`loss` (m,) and `gradient` (m, p+1) back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from shared.federated import Query, Refused, Reply, hessian_allowed
from shared.quadratic import l1_quadratic, soft_threshold
from shared.queries.bounds import require_gentle, require_spread

TERMS = "glm.terms"
LOGISTIC = "logistic"
SQUARED = "squared"
ARMIJO = 1e-4  # sufficient-decrease fraction of the line search
MIN_STEP = 2.0**-40
PROBE_STEP = 1e-4  # QuasiNewton's probe offset, relative to max(1, ‖θ‖∞)
PROBES = 12  # QuasiNewton's probe points per query in a study (a site may allow fewer)


@dataclass(frozen=True)
class PointBounds:
    """A site's bounds on the points it evaluates (from its policy): no coefficient steeper
    than `max_coefficient` per SD of its column at the site, and no weighted sum whose
    weights rest on too few patients (`require_bounded`)."""

    max_coefficient: float
    min_patients: int


def local_terms(x: np.ndarray, y: np.ndarray, query: Query,
                max_feature_ratio: float | None = None,
                bounds: PointBounds | None = None) -> Reply:
    """Site half of every GLM round: sums over the site's patients at the query's points.

    Query: `loss` ("logistic" | "squared"), `points` (m, p+1), `hessian` (bool),
    optional `trace` (bool). Reply: `n` (count), `loss` (m,) summed loss, `gradient`
    (m, p+1) X̃'(μ − y); if `hessian`: `hessian` (p+1, p+1) X̃'WX̃ at points[0]
    (W = μ(1 − μ) for logistic, 1 for squared); if `trace`: Σ_i ‖x̃_i‖² (for a step size).

    Crosses the wire: sums over patients only. A gradient is p+1 numbers per point; the
    Hessian is a weighted Gram matrix, refused (`Refused`) when the site's
    `max_feature_ratio` says p is too large for its n, because with p near n it pins down
    the patients' rows. The server then switches to gradient-only rounds. The points of one
    query are bounded the same way (`max_points`): no more gradients in one reply than a
    p×p matrix the site would release has features.

    With `bounds` (every site sets them), a point is answered only when it is gentle and its
    sums are spread (`require_bounded`); otherwise the whole reply is refused
    (`QueryRejected`). A steep point turns μ into a step on one feature, and differences of
    gradients (or a Hessian whose weights μ(1 − μ) sit on one patient) then isolate rows.
    """
    design = np.column_stack([np.ones(len(x)), np.asarray(x, dtype=np.float64)])
    y = np.asarray(y, dtype=np.float64)
    points = np.atleast_2d(np.asarray(query["points"], dtype=np.float64))
    wants_hessian = bool(query.get("hessian", False))
    p = design.shape[1] - 1
    if wants_hessian and max_feature_ratio is not None and not hessian_allowed(
            p, len(y), max_feature_ratio):
        raise Refused(f"p×p matrix refused: {p} features > {max_feature_ratio} × {len(y)} "
                      "patients (max_feature_ratio)")
    if max_feature_ratio is not None and len(points) > max_points(len(y), max_feature_ratio):
        raise Refused(f"{len(points)} points in one query refused: more than "
                      f"{max_points(len(y), max_feature_ratio)} for {len(y)} patients "
                      "(max_feature_ratio)")
    if points.ndim != 2 or points.shape[1] != p + 1:
        raise Refused(f"points of shape {points.shape} for {p} features (intercept first)")
    eta = design @ points.T  # (n, m)
    loss, mean = _loss_and_mean(str(query["loss"]), eta, y[:, None])
    if bounds is not None:
        require_bounded(x, y, points, mean, str(query["loss"]), wants_hessian, bounds)
    reply: Reply = {"n": np.asarray(len(y), dtype=np.int64), "loss": loss,
                    "gradient": ((mean - y[:, None]).T @ design)}
    if wants_hessian:
        weight = mean[:, 0] * (1 - mean[:, 0]) if query["loss"] == LOGISTIC else 1.0
        reply["hessian"] = (design * np.reshape(weight, (-1, 1))).T @ design
    if query.get("trace", False):
        reply["trace"] = np.asarray(np.sum(design**2))
    return reply


def require_bounded(x: np.ndarray, y: np.ndarray, points: np.ndarray, mean: np.ndarray,
                    loss: str, hessian: bool, bounds: PointBounds) -> None:
    """Refuse (`QueryRejected`) points steeper than `bounds.max_coefficient` per SD of a
    column at this site, and the weighted sums of rows at a point whose weights rest on too
    few patients (Kish's effective sample size).

    The logistic gradient Σ(μ − y)x̃ is the fixed class sum Σy·x̃ and the sums Σμ·x̃ and
    Σ(1 − μ)·x̃ = Σx̃ − Σμ·x̃, the part a point chooses: those are bounded, with weights μ and
    1 − μ (a point in a column's tail puts μ on the one patient there, even a gentle one).
    The residual magnitudes |μ − y| are not the weights to bound: at a good fit of
    well-separated classes they are small for all but a few patients (9.2 patients' worth at
    scikit-learn's optimum on a Wisconsin site of 95), yet no row can be read off them. And
    μ itself is close to y there: a small site's fold with 3 positives puts μ on 2.4
    patients' worth. So the bound for μ and 1 − μ is `gradient_spread`: a point gets no sum
    much more concentrated than the class sums the gradient carries anyway, and never one
    patient's row. Keeping a point from being a step between two patients is the gentle
    bound's work.

    The logistic Hessian X̃'WX̃ weighs patient i by μ_i(1 − μ_i): at a steep point (or a
    fit of separated classes) that weight sits on the few patients at the edge, and the
    matrix is theirs: refused below min_patients, the server goes on with gradient-only
    rounds (server.stages.radiomics FALLBACK: the same optimum, more rounds). The squared loss's
    gradient weighs by the residual magnitudes |η − y| (at θ = 0 they are y: a class sum),
    bounded as μ; its Hessian X̃'X̃ has equal weights."""
    require_gentle(points[:, 1:], _column_sd(x), bounds.max_coefficient, "a GLM point")
    spread = gradient_spread(y, bounds.min_patients)
    for k in range(points.shape[0]):
        if loss == LOGISTIC:
            weights = ((mean[:, k], "μ"), (1 - mean[:, k], "1 − μ"))
        else:
            weights = ((np.abs(mean[:, k] - y), "|η − y|"),)
        for w, what in weights:
            require_spread(w, spread, f"the gradient's sum weighted by {what} at point {k}")
    if hessian and loss == LOGISTIC:
        require_spread(mean[:, 0] * (1 - mean[:, 0]), bounds.min_patients, "the Hessian")


def gradient_spread(y: np.ndarray, min_patients: int) -> float:
    """The effective sample size a gradient's point-chosen sums need: half the smaller
    class (whose sum the gradient carries anyway), at most min_patients / 2, at least 2."""
    smaller = float(min(np.sum(y == 1), np.sum(y == 0)))
    return max(2.0, min(float(min_patients), smaller) / 2)


def _column_sd(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not len(x):
        return np.ones(x.shape[-1] if x.ndim == 2 else 0)
    with np.errstate(invalid="ignore"):
        return np.nanstd(x, axis=0)


def _loss_and_mean(kind: str, eta: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kind == LOGISTIC:
        return np.sum(np.logaddexp(0.0, eta) - y * eta, axis=0), expit(eta)
    if kind == SQUARED:
        return 0.5 * np.sum((eta - y) ** 2, axis=0), eta
    raise ValueError(f"unknown loss {kind!r}; known: {LOGISTIC}, {SQUARED}")


@dataclass(frozen=True)
class Objective:
    """F(θ) = s·Σloss + l1·‖w‖₁ + (l2/2)·‖w‖², s = C (or C/n when `per_patient`)."""

    loss: str
    C: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    per_patient: bool = False

    def scale(self, n: float) -> float:
        return self.C / n if self.per_patient else self.C

    def smooth(self, theta: np.ndarray, n: float, loss: float,
               gradient: np.ndarray) -> tuple[float, np.ndarray]:
        """Smooth part (data term + L2) and its gradient at θ from the summed reply."""
        w = _penalized(theta)
        s = self.scale(n)
        return s * loss + 0.5 * self.l2 * float(w @ w), s * gradient + self.l2 * w

    def hessian(self, n: float, hessian: np.ndarray) -> np.ndarray:
        return self.scale(n) * hessian + self.l2 * np.diag(_penalized(np.ones(len(hessian))))

    def l1_term(self, theta: np.ndarray) -> float:
        return self.l1 * float(np.sum(np.abs(theta[1:])))

    def penalties(self, size: int) -> np.ndarray:
        return self.l1 * _penalized(np.ones(size))


@dataclass(frozen=True)
class Fit:
    intercept: float
    coef: np.ndarray
    objective: float
    rounds: int
    converged: bool
    mode: str  # "newton" | "gradient"


class _Rounds:
    """What every GLM solver holds: the objective, the current θ and its value, the round
    count and the stopping state; `fit` is the result so far."""

    mode = ""

    def __init__(self, objective: Objective, n_features: int, start: np.ndarray | None,
                 tol: float, max_rounds: int) -> None:
        self.objective = objective
        self.theta = _start(start, n_features)
        self.tol = tol
        self.max_rounds = max_rounds
        self.rounds = 0
        self.done = False
        self.converged = False
        self.value = np.inf

    @property
    def fit(self) -> Fit:
        return _fit(self.theta, self.value, self.rounds, self.converged, self.mode)


class Newton(_Rounds):
    """(Proximal) Newton with step halving on the pooled objective. Query per round:
    `{"step": "glm.terms", "loss", "points": (1, p+1), "hessian": True}`; reply as
    `local_terms`. Stops when the next step is below `tol` (∞-norm, relative to
    max(1, ‖θ‖∞)); quadratic convergence makes θ then accurate well below `tol`."""

    mode = "newton"
    wants_hessian = True

    def __init__(self, objective: Objective, n_features: int, start: np.ndarray | None = None,
                 tol: float = 1e-10, max_rounds: int = 500) -> None:
        super().__init__(objective, n_features, start, tol, max_rounds)
        self.gradient: np.ndarray | None = None
        self._direction: np.ndarray | None = None
        self._decrease = 0.0
        self._t = 1.0

    def query(self) -> Query:
        query = {"step": TERMS, "loss": self.objective.loss, "points": self._trial()[None, :],
                 "hessian": self.wants_hessian}
        if self.gradient is None and not self.wants_hessian:
            query["trace"] = True
        return query

    def update(self, reply: Reply) -> None:
        self.rounds += 1
        point = self._trial()
        smooth, gradient = self.objective.smooth(point, float(reply["n"]),
                                                 float(reply["loss"][0]), reply["gradient"][0])
        value = smooth + self.objective.l1_term(point)
        if self.gradient is None or value <= (self.value + ARMIJO * self._t * self._decrease
                                              + _rounding(self.value)):
            self._accept(point, value, gradient, self._curvature(point, gradient, reply))
        else:
            self._t /= 2
            if self._t < MIN_STEP:
                self.done = True  # no decrease along a descent direction: rounding floor
        if self.rounds >= self.max_rounds:
            self.done = True

    def _curvature(self, point: np.ndarray, gradient: np.ndarray, reply: Reply) -> np.ndarray:
        return self.objective.hessian(float(reply["n"]), reply["hessian"])

    def _trial(self) -> np.ndarray:
        if self._direction is None:
            return self.theta
        return self.theta + self._t * self._direction

    def _accept(self, point: np.ndarray, value: float, gradient: np.ndarray,
                curvature: np.ndarray) -> None:
        self.theta, self.value, self.gradient, self._t = point, value, gradient, 1.0
        direction = self._step(gradient, curvature)
        self._decrease = float(gradient @ direction) + (
            self.objective.l1_term(point + direction) - self.objective.l1_term(point))
        self._direction = direction
        if np.max(np.abs(direction)) <= self.tol * max(1.0, np.max(np.abs(point))):
            self.done = self.converged = True
        elif self.objective.loss == SQUARED and self.wants_hessian:
            # the quadratic model is the objective: its minimizer is the answer
            self.value += self._decrease + 0.5 * float(direction @ curvature @ direction)
            self.theta = point + direction
            self.done = self.converged = True

    def _step(self, gradient: np.ndarray, curvature: np.ndarray) -> np.ndarray:
        """Minimizer of the quadratic model g'd + ½d'Hd + l1·‖w + d‖₁, minus θ."""
        if self.objective.l1 == 0:
            return -np.linalg.solve(curvature, gradient)
        linear = curvature @ self.theta - gradient
        target = l1_quadratic(curvature, linear, self.objective.penalties(len(gradient)),
                              start=self.theta)
        return target - self.theta


class QuasiNewton(Newton):
    """Gradient-only rounds: proximal quasi-Newton (Lee, Sun & Saunders 2014) with a dense
    BFGS model built on the server from successive gradients, and the same step halving.

    Each query carries the trial point and up to `probes` more: the accepted point moved by
    ε along one coordinate each (the intercept, the non-zero coefficients and the features
    whose gradient breaks the L1 optimality condition, least recently probed first). Their
    gradients give one secant pair per coordinate, so the BFGS model learns the curvature
    where the solution lives several directions per round instead of one: the same optimum
    in less than half the rounds (docs/BENCHMARKS.md). A site bounds the points per query
    (`max_points`); `probes=0` is one point per round.

    Round 1 query adds `"trace": True` (for the initial curvature); every query has
    `"hessian": False`. The sites send loss and gradient only, per point."""

    mode = "gradient"
    wants_hessian = False

    def __init__(self, objective: Objective, n_features: int, start: np.ndarray | None = None,
                 tol: float = 1e-10, max_rounds: int = 5_000, probes: int = 0) -> None:
        super().__init__(objective, n_features, start, tol, max_rounds)
        self.probes = int(probes)
        self._model: np.ndarray | None = None
        self._probed: list[int] = []
        self._probed_at = self.theta
        self._last_probe: dict[int, int] = {}

    def query(self) -> Query:
        query = super().query()
        self._probed = self._probe_coordinates()
        if self._probed:
            self._probed_at = self.theta.copy()
            step = PROBE_STEP * max(1.0, float(np.max(np.abs(self.theta))))
            probes = np.repeat(self.theta[None, :], len(self._probed), axis=0)
            probes[np.arange(len(self._probed)), self._probed] += step
            query["points"] = np.vstack([query["points"], probes])
        return query

    def update(self, reply: Reply) -> None:
        if self._probed:
            self._learn_from_probes(reply)
            reply = {**reply, "loss": reply["loss"][:1], "gradient": reply["gradient"][:1]}
        super().update(reply)

    def _probe_coordinates(self) -> list[int]:
        if not self.probes or self.gradient is None or self._model is None or self.done:
            return []
        g, theta = self.gradient, self.theta
        active = np.flatnonzero(theta[1:] != 0) + 1
        violating = np.flatnonzero((theta[1:] == 0) & (np.abs(g[1:]) > self.objective.l1)) + 1
        violating = violating[np.argsort(-np.abs(g[violating]))]
        candidates = list(dict.fromkeys([0, *active.tolist(), *violating.tolist()]))
        candidates.sort(key=lambda j: self._last_probe.get(j, -1))  # stable: oldest first
        chosen = candidates[:self.probes]
        self._last_probe.update(dict.fromkeys(chosen, self.rounds))
        return chosen

    def _learn_from_probes(self, reply: Reply) -> None:
        n = float(reply["n"])
        step = PROBE_STEP * max(1.0, float(np.max(np.abs(self._probed_at))))
        for k, j in enumerate(self._probed, start=1):
            point = self._probed_at.copy()
            point[j] += step
            _, gradient = self.objective.smooth(point, n, float(reply["loss"][k]),
                                                reply["gradient"][k])
            s = point - self._probed_at
            self._secant(s, gradient - self.gradient)

    def _curvature(self, point: np.ndarray, gradient: np.ndarray, reply: Reply) -> np.ndarray:
        if self._model is None:
            self._model = _initial_curvature(self.objective, reply, len(gradient))
            return self._model
        self._secant(point - self.theta, gradient - self.gradient)
        return self._model

    def _secant(self, s: np.ndarray, change: np.ndarray) -> None:
        """BFGS update of the model with one pair (step, gradient change), skipped when
        the pair has no positive curvature (rounding, or a kink of the objective)."""
        curvature = float(s @ change)
        if curvature > 1e-12 * np.sqrt(float(s @ s) * float(change @ change)):
            model_s = self._model @ s
            self._model = (self._model + np.outer(change, change) / curvature
                           - np.outer(model_s, model_s) / float(s @ model_s))


class ProximalGradient(_Rounds):
    """Gradient-only rounds: FISTA with backtracking and adaptive restart.

    Round 1 query: `{"step": "glm.terms", "loss", "points": (1, p+1), "hessian": False,
    "trace": True}`; later rounds `points` (2, p+1) = (candidate iterate, next extrapolated
    point), `trace` False. Stops when the proximal-gradient step at the iterate,
    ‖θ − prox(θ − ∇f(θ)/L)‖∞, is below `tol` relative to max(1, ‖θ‖∞)."""

    mode = "gradient"

    def __init__(self, objective: Objective, n_features: int, start: np.ndarray | None = None,
                 tol: float = 1e-12, max_rounds: int = 50_000) -> None:
        super().__init__(objective, n_features, start, tol, max_rounds)
        self.lipschitz = 0.0
        self._y: np.ndarray | None = None  # extrapolated point whose f and ∇f we hold
        self._fy = 0.0
        self._gy = np.zeros_like(self.theta)
        self._momentum = 1.0
        self._candidate = self.theta
        self._next = self.theta
        self._next_momentum = 1.0

    def query(self) -> Query:
        if self._y is None:
            return {"step": TERMS, "loss": self.objective.loss, "points": self.theta[None, :],
                    "hessian": False, "trace": True}
        return {"step": TERMS, "loss": self.objective.loss, "hessian": False,
                "points": np.vstack([self._candidate, self._next])}

    def update(self, reply: Reply) -> None:
        self.rounds += 1
        n = float(reply["n"])
        values = [self.objective.smooth(point, n, float(loss), gradient) for point, loss,
                  gradient in zip(self.query()["points"], reply["loss"], reply["gradient"],
                                  strict=True)]
        if self._y is None:
            self._first(n, float(reply["trace"]), *values[0])
        elif self._sufficient_decrease(*values[0]):
            self._accept(*values[0], *values[1])
        else:
            self.lipschitz *= 2.0
        if not self.done:
            self._propose()
        if self.rounds >= self.max_rounds:
            self.done = True

    def _first(self, n: float, trace: float, f: float, g: np.ndarray) -> None:
        curvature = 0.25 if self.objective.loss == LOGISTIC else 1.0
        # λ_max(X̃'X̃) >= trace/(p+1): a lower estimate; backtracking raises it when needed
        self.lipschitz = self.objective.scale(n) * curvature * trace / len(g) + self.objective.l2
        self._y, self._fy, self._gy = self.theta, f, g
        self.value = f + self.objective.l1_term(self.theta)

    def _sufficient_decrease(self, f: float, g: np.ndarray) -> bool:
        step = self._candidate - self._y
        quadratic = 0.5 * self.lipschitz * float(step @ step)
        if f - self._fy - float(self._gy @ step) <= quadratic:
            return True
        # for convex f, (∇f(x) − ∇f(y))'(x − y) bounds the same gap and does not cancel
        return float((g - self._gy) @ step) <= quadratic

    def _accept(self, f: float, g: np.ndarray, f_next: float, g_next: np.ndarray) -> None:
        self.theta = self._candidate
        self.value = f + self.objective.l1_term(self.theta)
        residual = self.theta - self._prox(self.theta - g / self.lipschitz)
        if np.max(np.abs(residual)) <= self.tol * max(1.0, np.max(np.abs(self.theta))):
            self.done = self.converged = True
            return
        self._y, self._fy, self._gy = self._next, f_next, g_next
        self._momentum = self._next_momentum

    def _propose(self) -> None:
        candidate = self._prox(self._y - self._gy / self.lipschitz)
        if float((self._y - candidate) @ (candidate - self.theta)) > 0:  # restart momentum
            self._momentum, self._next_momentum, self._next = 1.0, 1.0, candidate
        else:
            self._next_momentum = (1 + np.sqrt(1 + 4 * self._momentum**2)) / 2
            beta = (self._momentum - 1) / self._next_momentum
            self._next = candidate + beta * (candidate - self.theta)
        self._candidate = candidate

    def _prox(self, theta: np.ndarray) -> np.ndarray:
        out = theta.copy()
        out[1:] = soft_threshold(theta[1:], self.objective.l1 / self.lipschitz)
        return out


def solver(objective: Objective, n_features: int, hessian: bool = True,
           **options: Any) -> Newton:
    """Newton rounds when every site accepts p×p matrices, else gradient-only rounds
    (`probes=` extra points per query, see QuasiNewton)."""
    if hessian:
        options.pop("probes", None)
        return Newton(objective, n_features, **options)
    return QuasiNewton(objective, n_features, **options)


def max_points(n_patients: int, max_feature_ratio: float) -> int:
    """A site's bound on the points of one gradient query: max(2, ⌊ratio × n⌋), i.e. no
    more gradients in one reply than the features whose p×p matrix it would release (2:
    what ProximalGradient needs)."""
    return max(2, int(np.floor(max_feature_ratio * n_patients)))


def _initial_curvature(objective: Objective, reply: Reply, size: int) -> np.ndarray:
    """σ·I with σ = s·w·trace(X̃'X̃)/(p+1), the mean eigenvalue of the data Hessian bound
    (w = ¼, the largest logistic weight; 1 for squared loss), plus the L2 weight."""
    weight = 0.25 if objective.loss == LOGISTIC else 1.0
    sigma = objective.scale(float(reply["n"])) * weight * float(reply["trace"]) / size
    return (sigma + objective.l2) * np.eye(size)


def _start(start: np.ndarray | None, n_features: int) -> np.ndarray:
    if start is None:
        return np.zeros(n_features + 1)
    start = np.asarray(start, dtype=np.float64)
    if start.shape != (n_features + 1,):
        raise ValueError(f"start must be (intercept, {n_features} coefficients)")
    return start.copy()


def _penalized(theta: np.ndarray) -> np.ndarray:
    out = np.asarray(theta, dtype=np.float64).copy()
    out[0] = 0.0
    return out


def _rounding(value: float) -> float:
    """Slack for comparing two pooled objective values that differ only by rounding."""
    return 64 * np.finfo(np.float64).eps * max(1.0, abs(value))


def _fit(theta: np.ndarray, value: float, rounds: int, converged: bool, mode: str) -> Fit:
    return Fit(intercept=float(theta[0]), coef=theta[1:].copy(), objective=float(value),
               rounds=rounds, converged=converged, mode=mode)
