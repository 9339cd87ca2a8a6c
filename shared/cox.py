"""Cox proportional hazards with Efron ties, federated by Newton–Raphson. Pure numpy.

The Efron log partial likelihood over the pooled rows needs, per global event time t (the
union of the sites' binned event times), the pooled

    risk-set sums   S0 = Σ_{T≥t} w,  S1 = Σ_{T≥t} w x,  S2 = Σ_{T≥t} w x x'   (w = e^{x'β})
    tied-death sums d = #deaths at t, D0 = Σ_{deaths at t} w,  D1 = Σ w x,  D2 = Σ w x x'

and once the β-free Σ_{deaths} x. Sums add up across sites, so each site computes its own
(`local_risk_set_sums`), the server adds them (`combine_risk_set_sums`) and evaluates the
log-likelihood, gradient and Hessian (`efron`) exactly as lifelines does on the pooled rows:

    ℓ = Σ_deaths x'β − Σ_t Σ_{l<d_t} log(S0 − (l/d_t) D0)
    ∇ℓ = Σ_deaths x − Σ_t Σ_l (S1 − c_l D1) / (S0 − c_l D0)
    ∇²ℓ = −Σ_t Σ_l [(S2 − c_l D2)/(S0 − c_l D0) − m_l m_l'],  m_l = (S1 − c_l D1)/(S0 − c_l D0)

`fit_models` is the Newton–Raphson loop, batched: one call of `evaluate` (one round trip
to the sites) serves every model still being fitted, which is what makes the stepwise
search cheap in rounds. `stepwise` is R's `step()` over terms (a categorical covariate is
one term of several dummy columns), AIC = −2ℓ + 2k.

Covariates are centred by the server (any constant shift leaves β, ℓ and the Hessian
unchanged — the partial likelihood is shift invariant — and keeps e^{x'β} finite).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import chdtrc, ndtri

from shared.kaplan_meier import Z95


@dataclass(frozen=True)
class RiskSetSums:
    """Per candidate β (axis 0, m of them) and global event time (axis 1, T of them)."""

    deaths: np.ndarray  # (T,) deaths at each time
    xsum: np.ndarray  # (p,) Σ over deaths of x
    s0: np.ndarray  # (m, T)
    s1: np.ndarray  # (m, T, p)
    s2: np.ndarray  # (m, T, p, p)
    d0: np.ndarray  # (m, T)
    d1: np.ndarray  # (m, T, p)
    d2: np.ndarray  # (m, T, p, p)

    FIELDS = ("deaths", "xsum", "s0", "s1", "s2", "d0", "d1", "d2")

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.FIELDS}


def local_risk_set_sums(times: np.ndarray, events: np.ndarray, x: np.ndarray,
                        grid: np.ndarray, betas: np.ndarray) -> RiskSetSums:
    """Site half: risk-set and tied-death sums at each global event time, per candidate β.

    `times` are the site's binned times, `x` its (centred) design matrix, `grid` the
    global event times, `betas` an (m, p) array of candidate coefficient vectors.

    Crosses the wire: per global event time, the number of the site's deaths and sums over
    its risk set and its deaths of w, w·x and w·x·x' (w = e^{x'β}), plus Σ_deaths x.
    These are sums over patients; but the difference of the risk-set sums at two
    consecutive event times is a sum over the patients who left the site's risk set in
    between, which can be a single patient. That is inherent to an exact federated Cox fit
    without secure aggregation; a site therefore groups its times first
    (`released_times`, client/stages/survival.py states the policy), so that every such
    difference and every tied-death sum is a group's.
    """
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events).astype(bool)
    x = np.asarray(x, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    betas = np.atleast_2d(np.asarray(betas, dtype=np.float64))
    p = x.shape[1]
    m, size = betas.shape[0], grid.size
    if betas.shape[1] != p:
        raise ValueError(f"betas have {betas.shape[1]} columns, the design has {p}")
    slot = np.searchsorted(grid, t[e])
    if np.any(slot >= size) or np.any(grid[np.minimum(slot, size - 1)] != t[e]):
        raise ValueError("a death time of this site is not on the global event-time grid")
    deaths = np.bincount(slot, minlength=size).astype(np.int64)
    xsum = x[e].sum(axis=0)

    order = np.argsort(-t, kind="stable")  # latest first: cumulative sums are risk sets
    t_desc = t[order]
    xs = x[order]
    lp = xs @ betas.T  # (n, m)
    w = np.exp(lp)  # (n, m)
    wx = w[:, :, None] * xs[:, None, :]  # (n, m, p)
    wxx = wx[:, :, :, None] * xs[:, None, None, :]  # (n, m, p, p)
    # at-risk count at each grid time: patients with T >= t (sorted descending)
    count = np.searchsorted(-t_desc, -grid, side="right")  # number with -T <= -t
    s0 = _prefix(w, count)  # (T, m)
    s1 = _prefix(wx, count)
    s2 = _prefix(wxx, count)

    d0 = np.zeros((size, m))
    d1 = np.zeros((size, m, p))
    d2 = np.zeros((size, m, p, p))
    dead = e[order]
    dslot = np.searchsorted(grid, t_desc[dead])
    np.add.at(d0, dslot, w[dead])
    np.add.at(d1, dslot, wx[dead])
    np.add.at(d2, dslot, wxx[dead])
    return RiskSetSums(
        deaths=deaths, xsum=xsum,
        s0=np.moveaxis(s0, 0, 1), s1=np.moveaxis(s1, 0, 1), s2=np.moveaxis(s2, 0, 1),
        d0=np.moveaxis(d0, 0, 1), d1=np.moveaxis(d1, 0, 1), d2=np.moveaxis(d2, 0, 1),
    )


def risk_set_elements(n: int, grid_size: int, m: int, p: int) -> list[int]:
    """The float64 elements `local_risk_set_sums` allocates for n patients, a grid of
    `grid_size` times and m candidate β over p columns (the weighted outer products and
    their running sums, the released s·/d· arrays and their wire copies), so that a site
    can refuse a query over its memory bound before allocating any of them."""
    square, line = m * p * p, m * p
    return [2 * (n + 1) * (square + line + m),  # w, w·x, w·x·x' and their cumulative sums
            4 * grid_size * (square + line + m)]  # s·, d· and the copies sent


def cell_ok(counts: np.ndarray, min_count: int) -> np.ndarray:
    """Whether each count is 0 or at least `min_count` (a cell of 1…min_count−1 is one or
    two patients' aggregate)."""
    counts = np.asarray(counts)
    return (counts == 0) | (counts >= min_count)


def released_times(times: np.ndarray, events: np.ndarray, levels: np.ndarray,
                   min_difference: int, min_cell_count: int) -> np.ndarray | None:
    """A site's Cox times as it releases them: its binned times grouped, from the earliest,
    into runs of successive times, each patient's time rounded up to the last time of her
    run, so that on any global grid

    - two successive risk sets differ by 0 or ≥ min_difference patients (a run holds ≥
      min_difference), so their Σx, Σxx' are a group's, never one patient's row;
    - the deaths at a released time are 0 or ≥ min_cell_count, so the tied-death sums D0,
      D1, D2 (which Efron needs per time) are a group's too;
    - within a run and within its deaths, each categorical level (`levels`, an (n, k) 0/1
      matrix, one column per level) and its complement hold 0 or ≥ min_cell_count, so a
      dummy's row of Σxx' (Σ age over the HER2-positive leavers) is not one patient's.

    A run closes at the first time where it meets all three; a last run that never does
    is merged into the runs before it. None when even the whole cohort as one run does not
    (the site then refuses Cox). The pooled fit is exact on these times."""
    t = np.asarray(times, dtype=np.float64)
    if len(t) == 0:
        return None
    e = np.asarray(events, dtype=np.float64)
    g = np.asarray(levels, dtype=np.float64).reshape(len(t), -1)
    distinct, slot = np.unique(t, return_inverse=True)
    # per distinct time: patients, deaths, and per level its patients and its deaths
    cells = np.column_stack([np.ones(len(t)), e, g, g * e[:, None]])
    per_time = np.zeros((len(distinct), cells.shape[1]))
    np.add.at(per_time, slot, cells)
    k = g.shape[1]
    ends: list[int] = []
    run = np.zeros(cells.shape[1])
    for i, row in enumerate(per_time):
        run += row
        if _run_ok(run, k, min_difference, min_cell_count):
            ends.append(i)
            run[:] = 0
    last = len(distinct) - 1
    while not ends or ends[-1] != last:  # a tail that never closed joins the run before it
        if ends:
            ends.pop()
        start = ends[-1] + 1 if ends else 0
        if _run_ok(per_time[start:].sum(axis=0), k, min_difference, min_cell_count):
            ends.append(last)
        elif not ends:
            return None
    end_of = np.searchsorted(np.asarray(ends), np.arange(len(distinct)))
    return distinct[np.asarray(ends)[end_of]][slot]


def _run_ok(run: np.ndarray, k: int, min_difference: int, min_cell_count: int) -> bool:
    count, deaths, held, died = run[0], run[1], run[2:2 + k], run[2 + k:]
    if count < min_difference:
        return False
    cells = np.concatenate([[deaths], held, count - held, died, deaths - died])
    return bool(np.all(cell_ok(np.round(cells), min_cell_count)))


def _prefix(values: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Σ of the first `count[k]` rows of `values`, for each k."""
    cum = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(values, axis=0)])
    return cum[count]


def combine_risk_set_sums(parts: Sequence[RiskSetSums]) -> RiskSetSums:
    """Server half: the element-wise sum of the sites' sums (same grid, same betas)."""
    if not parts:
        raise ValueError("no site sums to combine")
    return RiskSetSums(**{name: np.sum([getattr(p, name) for p in parts], axis=0)
                          for name in RiskSetSums.FIELDS})


@dataclass(frozen=True)
class Efron:
    log_likelihood: float
    gradient: np.ndarray
    hessian: np.ndarray


def efron(sums: RiskSetSums, index: int, columns: Sequence[int], beta: np.ndarray) -> Efron:
    """Efron log partial likelihood, gradient and Hessian of candidate `index` over the
    active design `columns` (β of those columns), from the pooled sums."""
    cols = np.asarray(columns, dtype=np.int64)
    beta = np.asarray(beta, dtype=np.float64)
    d = sums.deaths.astype(np.int64)
    times = np.flatnonzero(d > 0)
    tt = np.repeat(times, d[times])
    ll_index = np.concatenate([np.arange(k) for k in d[times]]) if times.size else np.zeros(0)
    c = ll_index / d[tt]
    s0, d0 = sums.s0[index], sums.d0[index]
    den = s0[tt] - c * d0[tt]
    num = sums.s1[index][tt][:, cols] - c[:, None] * sums.d1[index][tt][:, cols]
    s2 = sums.s2[index][tt][:, cols][:, :, cols]
    d2 = sums.d2[index][tt][:, cols][:, :, cols]
    second = s2 - c[:, None, None] * d2
    mean = num / den[:, None]
    ll = float(sums.xsum[cols] @ beta - np.sum(np.log(den)))
    gradient = sums.xsum[cols] - mean.sum(axis=0)
    hessian = -(np.einsum("kab,k->ab", second, 1.0 / den) - mean.T @ mean)
    return Efron(ll, gradient, hessian)


@dataclass
class CoxFit:
    """A fitted model: the active design columns, β there, and ℓ and the Hessian at β."""

    columns: tuple[int, ...]
    beta: np.ndarray
    log_likelihood: float
    hessian: np.ndarray
    iterations: int
    converged: bool
    message: str = ""

    @property
    def k(self) -> int:
        return len(self.columns)

    @property
    def aic(self) -> float:
        return -2.0 * self.log_likelihood + 2.0 * self.k


@dataclass
class _State:
    columns: tuple[int, ...]
    beta: np.ndarray
    best: tuple[np.ndarray, float] | None = None  # last accepted (β, ℓ)
    step: np.ndarray | None = None
    ratio: float = np.inf  # last max |Δ| / SE
    iterations: int = 0
    halvings: int = 0
    fit: CoxFit | None = None


Evaluate = Callable[[np.ndarray], RiskSetSums]  # (m, p) betas -> pooled sums


def fit_models(evaluate: Evaluate, models: Sequence[Sequence[int]], p: int,
               starts: Sequence[np.ndarray | None] | None = None, *, tol: float = 1e-9,
               max_iter: int = 60) -> list[CoxFit]:
    """Newton–Raphson for several models at once, one `evaluate` call per iteration.

    `evaluate(betas)` takes an (m, p) array (zeros outside each model's columns) and
    returns the pooled `RiskSetSums` for those m candidates — in a study one round trip to
    the sites, in tests a loop over split data. A model has converged when every Newton
    step is below `tol` standard errors; it then reports β, ℓ and the Hessian at the last
    point evaluated (as lifelines does). A step that lowers ℓ is halved.
    """
    starts = list(starts) if starts is not None else [None] * len(models)
    states = []
    for cols, start in zip(models, starts, strict=True):
        cols = tuple(int(c) for c in cols)
        beta = np.zeros(len(cols)) if start is None else np.asarray(start, dtype=np.float64)
        states.append(_State(cols, beta.copy()))
    while True:
        active = [s for s in states if s.fit is None]
        if not active:
            break
        betas = np.zeros((len(active), p))
        for row, state in enumerate(active):
            betas[row, list(state.columns)] = state.beta
        sums = evaluate(betas)
        for row, state in enumerate(active):
            _advance(state, efron(sums, row, state.columns, state.beta), tol, max_iter)
    return [s.fit for s in states]  # type: ignore[misc]


def _advance(state: _State, value: Efron, tol: float, max_iter: int) -> None:
    if state.best is not None and state.step is not None and (
            not np.isfinite(value.log_likelihood)
            or value.log_likelihood < state.best[1] - 1e-10 * (1 + abs(state.best[1]))):
        if state.halvings >= 40:
            state.fit = CoxFit(state.columns, state.best[0], state.best[1],
                               np.full((len(state.columns),) * 2, np.nan), state.iterations,
                               False, "step halving did not increase the likelihood")
            return
        state.halvings += 1
        state.step = state.step / 2
        state.beta = state.best[0] + state.step
        return
    state.iterations += 1
    state.halvings = 0
    k = len(state.columns)
    if k == 0:
        state.fit = CoxFit((), state.beta, value.log_likelihood, np.zeros((0, 0)), 1, True)
        return
    try:
        delta, se = _newton_step(value)
    except np.linalg.LinAlgError:
        state.fit = CoxFit(state.columns, state.beta, value.log_likelihood, value.hessian,
                           state.iterations, False, "singular Hessian (collinear covariates "
                           "or a covariate level without events)")
        return
    ratio = float(np.max(np.abs(delta) / se))
    done = ratio < tol or (ratio < 1e-6 and ratio > 0.5 * state.ratio)  # at the noise floor
    if done or state.iterations >= max_iter:
        message = "" if done else f"no convergence in {max_iter} iterations"
        state.fit = CoxFit(state.columns, state.beta.copy(), value.log_likelihood,
                           value.hessian, state.iterations, done, message)
        return
    state.ratio = ratio
    state.best = (state.beta.copy(), value.log_likelihood)
    state.step = delta
    state.beta = state.beta + delta


def _newton_step(value: Efron) -> tuple[np.ndarray, np.ndarray]:
    """Δ = (−H)⁻¹ g and the standard errors √diag((−H)⁻¹), solved on the Jacobi-scaled
    system (the design is not standardised)."""
    info = -value.hessian
    diag = np.diag(info)
    if not np.all(np.isfinite(info)) or np.any(diag <= 0):
        raise np.linalg.LinAlgError("information matrix is not positive definite")
    scale = 1.0 / np.sqrt(diag)
    scaled = info * np.outer(scale, scale)
    inverse = np.linalg.inv(scaled) * np.outer(scale, scale)
    delta = inverse @ value.gradient
    variance = np.diag(inverse)
    if np.any(variance <= 0) or not np.all(np.isfinite(delta)):
        raise np.linalg.LinAlgError("information matrix is not positive definite")
    return delta, np.sqrt(variance)


@dataclass(frozen=True)
class CoxSummary:
    """What results.json reports for one model (per design column)."""

    covariates: list[str]
    coef: np.ndarray
    se: np.ndarray
    z: np.ndarray
    p_value: np.ndarray
    hazard_ratio: np.ndarray
    ci_lower: np.ndarray  # of the hazard ratio
    ci_upper: np.ndarray
    log_likelihood: float
    aic: float


def _inverse_information(hessian: np.ndarray) -> np.ndarray:
    """(−H)⁻¹, or NaN where the information is singular or not finite (too few events for
    the model, a constant column): the standard errors are then undefined, not an error."""
    k = hessian.shape[0]
    if not np.all(np.isfinite(hessian)):
        return np.full((k, k), np.nan)
    try:
        return np.linalg.inv(-hessian)
    except np.linalg.LinAlgError:
        return np.full((k, k), np.nan)


def summarize(fit: CoxFit, names: Sequence[str], alpha: float = 0.05) -> CoxSummary:
    """Wald summary as lifelines' `CoxPHFitter.summary`: SE from the inverse observed
    information, p = P(χ²₁ > z²), HR = e^β with CI e^{β ± z_{1−α/2} SE}, AIC = −2ℓ + 2k."""
    k = fit.k
    if k:
        with np.errstate(invalid="ignore"):
            se = np.sqrt(np.diag(_inverse_information(fit.hessian)))
    else:
        se = np.zeros(0)
    z_crit = Z95 if alpha == 0.05 else float(ndtri(1 - alpha / 2))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        z = fit.beta / se
        p_value = chdtrc(1, z**2)
        lower, upper = np.exp(fit.beta - z_crit * se), np.exp(fit.beta + z_crit * se)
        hazard_ratio = np.exp(fit.beta)
    return CoxSummary([names[c] for c in fit.columns], fit.beta.copy(), se, z, p_value,
                      hazard_ratio, lower, upper, fit.log_likelihood, fit.aic)


# --------------------------------------------------------------------------- stepwise AIC

DIRECTIONS = ("both", "backward", "none")


@dataclass
class Stepwise:
    """The final model of the search and the path: `steps[0]` is the start (full model)."""

    terms: tuple[int, ...]
    fit: CoxFit
    steps: list[dict] = field(default_factory=list)


FitTerms = Callable[[list[tuple[int, ...]], list[np.ndarray | None]], list[CoxFit]]


def stepwise(fit_terms: FitTerms, term_columns: Sequence[Sequence[int]],
             term_names: Sequence[str], direction: str = "both",
             full: CoxFit | None = None) -> Stepwise:
    """R's `step()` on AIC = −2ℓ + 2k over terms, from the full model.

    At each step every single drop (`backward`, `both`) and every single re-add of a term
    not in the model (`both`) is fitted — all in one batch — and the candidate with the
    lowest AIC is taken if it is strictly below the current AIC; otherwise the search stops.
    Candidates are ordered drops then adds, each in covariate order, and the first of equal
    AICs wins (R's stable `order`). `fit_terms(models, starts)` fits term sets (sorted term
    indices) from warm starts (None: zeros).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"stepwise must be one of {DIRECTIONS}, got {direction!r}")
    all_terms = tuple(range(len(term_columns)))
    current = all_terms
    fit = full if full is not None else fit_terms([current], [None])[0]
    steps = [{"action": "start", "covariate": None, "aic": fit.aic,
              "covariates": [term_names[t] for t in current]}]
    if direction == "none":
        return Stepwise(current, fit, steps)
    while True:
        candidates: list[tuple[str, int, tuple[int, ...]]] = []
        candidates += [("drop", t, tuple(u for u in current if u != t)) for t in current]
        if direction == "both":
            candidates += [("add", t, tuple(sorted((*current, t))))
                           for t in all_terms if t not in current]
        if not candidates:
            break
        starts = [_warm_start(fit, current, terms, term_columns) for _, _, terms in candidates]
        fits = fit_terms([terms for _, _, terms in candidates], starts)
        aics = [f.aic if f.converged else np.inf for f in fits]
        best = int(np.argmin(aics))  # first of equal values
        if not aics[best] < fit.aic:
            break
        action, term, current = candidates[best]
        fit = fits[best]
        steps.append({"action": action, "covariate": term_names[term], "aic": fit.aic,
                      "covariates": [term_names[t] for t in current]})
    return Stepwise(current, fit, steps)


def _warm_start(fit: CoxFit, current: tuple[int, ...], terms: tuple[int, ...],
                term_columns: Sequence[Sequence[int]]) -> np.ndarray:
    """β of the current fit for the columns the candidate keeps, 0 for an added term."""
    value = dict(zip(fit.columns, fit.beta, strict=True))
    columns = [c for t in terms for c in term_columns[t]]
    return np.array([value.get(c, 0.0) for c in sorted(columns)])


def columns_of(terms: Sequence[int], term_columns: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The design columns of a set of terms, in design order."""
    return tuple(sorted(c for t in terms for c in term_columns[t]))
