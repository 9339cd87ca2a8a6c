"""Server optimizers for the CNN weight rounds: FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi.
Pure numpy; the update rules are those of Flower's Message-API strategies
(`flwr.serverapp.strategy.FedAvgM`, `FedAdagrad`, `FedAdam`, `FedYogi`, flwr 1.42).

Each round the sites send their update (local − global); the server averages them weighted
by patients (shared/fedavg.py) into Δ_t, so the FedAvg weights would be x_t + Δ_t. Reddi et
al. (2021, "Adaptive Federated Optimization", ICLR) treat −Δ_t as a *pseudo-gradient* and
give it to a server optimizer; Flower's FedOpt strategies compute Δ_t = aggregated − current
(the update itself), its FedAvgM g_t = current − aggregated = −Δ_t (a gradient, PyTorch
SGD convention). With t = 1, 2, … the rounds the optimizer has stepped, x_0 the initial
weights, m_0 = v_0 = 0 (zeros, as in Flower — not the paper's v_{−1} ≥ τ²), every operation
per element:

- FedAvg (McMahan et al., 2017):  x_{t+1} = x_t + Δ_t.
- FedAvgM (Hsu et al., 2019, "Measuring the effects of non-identical data distribution"),
  server learning rate η, momentum β:
      b_1 = Δ_1,  b_t = β·b_{t−1} + Δ_t,   x_{t+1} = x_t + η·b_t
  (Flower: momentum_vector = −b_t; with β = 0 no buffer is kept and x_{t+1} = x_t + η·Δ_t;
  with Flower's defaults η = 1, β = 0 it *is* FedAvg.)
- FedAdagrad:  m_t = β₁·m_{t−1} + (1−β₁)·Δ_t,  v_t = v_{t−1} + Δ_t²,
      x_{t+1} = x_t + η·m_t / (√v_t + τ)      (Flower fixes β₁ = 0, so m_t = Δ_t).
- FedAdam:  m_t as above,  v_t = β₂·v_{t−1} + (1−β₂)·Δ_t²,
      η_t = η·√(1 − β₂^(t+1)) / (1 − β₁^(t+1)),   x_{t+1} = x_t + η_t·m_t / (√v_t + τ).
  η_t is Adam's bias-corrected step size (Kingma & Ba, 2015, α_t before §2.1), which Flower
  computes with the exponent `server_round + 1` (round 1 → β^2); reproduced as is.
- FedYogi (Zaheer et al., 2018, in Reddi et al.):  m_t as above,
      v_t = v_{t−1} − (1−β₂)·Δ_t²·sign(v_{t−1} − Δ_t²),   x_{t+1} = x_t + η·m_t / (√v_t + τ).

Flower's defaults, adopted here: FedAvgM η = 1, β = 0; FedAdagrad η = 0.1, τ = 1e-3;
FedAdam η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-3; FedYogi η = 0.01, β₁ = 0.9, β₂ = 0.99,
τ = 1e-3. (Flower's `eta_l`, the client learning rate — 0.1, FedYogi 0.0316 — is never used
in its aggregation; here the client learning rate is the plan's `lr`.) Note that with
|Δ| ≪ τ the adaptive step is ≈ η·Δ/τ and with |Δ| ≫ τ ≈ η·sign(Δ): η is a step in weight
units, not a multiplier of Δ as in FedAvgM, and needs tuning (Reddi et al., App. D).

Only trainable floating parameters are adapted. Integer arrays (BatchNorm's
`num_batches_tracked`) and the keys a caller names in `plain` (BatchNorm running
statistics: estimates, not parameters) take FedAvg, exactly as `fedavg.apply_update`; keys
absent from Δ (FedBN's local normalization layers) are unchanged. Computation is float64,
the new weights are float32 like `fedavg.apply_update`.

State: the round counter t and, per adapted key, the moments (FedAvgM b; FedAdagrad, FedAdam
and FedYogi m and v), float64, shaped like the weights — one optimizer per unit, since the
state is keyed by weight name. Nothing new crosses the wire: the sites still receive the
global weights and send their update; the state never leaves the server. `state_dict()`
gives it as plain arrays (npz-able without pickle) and `load_state_dict` restores it, so a
run resumed after round k ends with the same bits as one never interrupted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from shared import fedavg

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
# Flower's parameter names, accepted by `make_optimizer`
ALIASES = {"eta": "server_lr", "server_learning_rate": "server_lr",
           "server_momentum": "momentum"}


def _check(name: str, value: float, low: float, high: float | None = None, *,
           low_open: bool = False) -> float:
    """A finite float in [low, high) (or (low, high) with `low_open`), else ValueError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    bad_low = x <= low if low_open else x < low
    if not math.isfinite(x) or bad_low or (high is not None and x >= high):
        interval = (("(" if low_open else "[") + f"{low:g}, "
                    + (f"{high:g})" if high is not None else "inf)"))
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return x


class ServerOptimizer:
    """FedAvg: x_{t+1} = x_t + Δ_t (`fedavg.apply_update`). Base of the other optimizers."""

    name = "fedavg"
    moments: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.t = 0
        self.state: dict[str, dict[str, np.ndarray]] = {m: {} for m in self.moments}

    def params(self) -> dict[str, float]:
        """The hyper-parameters (constructor arguments)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ the step

    def step(self, current: Mapping[str, np.ndarray], mean_update: Mapping[str, np.ndarray],
             plain: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """New global weights from the current ones and the weighted mean update Δ (the
        aggregated weights are current + Δ). Keys not in Δ are unchanged; integer arrays and
        the `plain` keys take FedAvg; the other keys the optimizer's rule."""
        plain = set(plain)
        for key, delta in mean_update.items():
            if key not in current:
                raise ValueError(f"update for {key!r}, which the global weights lack")
            if np.shape(delta) != np.shape(current[key]):
                raise ValueError(f"update for {key!r} has shape {np.shape(delta)}, "
                                 f"the weights {np.shape(current[key])}")
        adapted = [k for k in mean_update if self._adapts() and k not in plain
                   and np.issubdtype(np.asarray(current[k]).dtype, np.floating)]
        for moment in self.state.values():
            for key in adapted:
                if key in moment and moment[key].shape != np.shape(current[key]):
                    raise ValueError(f"optimizer state for {key!r} has shape "
                                     f"{moment[key].shape}, the weights "
                                     f"{np.shape(current[key])}")
        averaged = {k: v for k, v in mean_update.items() if k not in adapted}
        out = fedavg.apply_update(current, averaged)
        self.t += 1
        if adapted:
            x = {k: np.asarray(current[k], dtype=np.float64) for k in adapted}
            d = {k: np.asarray(mean_update[k], dtype=np.float64) for k in adapted}
            for key, value in self._rule(x, d).items():
                out[key] = value.astype(np.float32)
        return out

    def _adapts(self) -> bool:
        """False where the rule is FedAvg: every key then goes through fedavg.apply_update."""
        return False

    def _rule(self, x: dict[str, np.ndarray], d: dict[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
        """x_{t+1} per adapted key, float64, from x_t and Δ_t (float64); self.t is t."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the state

    def state_dict(self) -> dict[str, np.ndarray]:
        """The optimizer (name, hyper-parameters) and its state (t, moments) as arrays:
        `optimizer`, `param.<name>`, `t`, `<moment>.<weight key>`."""
        out: dict[str, np.ndarray] = {"optimizer": np.array(self.name),
                                      "t": np.array(self.t, dtype=np.int64)}
        for key, value in self.params().items():
            out[f"param.{key}"] = np.array(value, dtype=np.float64)
        for moment, arrays in self.state.items():
            for key, value in arrays.items():
                out[f"{moment}.{key}"] = value.copy()
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `state_dict()`'s output; ValueError if it is another optimizer's or was
        saved with other hyper-parameters."""
        name = str(np.asarray(state.get("optimizer", "")))
        if name != self.name:
            raise ValueError(f"optimizer state is {name or 'missing'!r}, not {self.name!r}")
        for key, value in self.params().items():
            saved = state.get(f"param.{key}")
            if saved is None or float(np.asarray(saved)) != value:
                raise ValueError(f"optimizer state saved with {key}="
                                 f"{None if saved is None else float(np.asarray(saved))}, "
                                 f"now {key}={value}")
        if "t" not in state or int(np.asarray(state["t"])) < 0:
            raise ValueError("optimizer state lacks a round counter t >= 0")
        moments: dict[str, dict[str, np.ndarray]] = {m: {} for m in self.moments}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if key in ("optimizer", "t") or head == "param":
                continue
            if head not in moments or not rest:
                raise ValueError(f"unknown entry {key!r} in {self.name} optimizer state")
            moments[head][rest] = np.array(value, dtype=np.float64, copy=True)
        self.t = int(np.asarray(state["t"]))
        self.state = moments


class FedAvgM(ServerOptimizer):
    """FedAvgM (Hsu et al., 2019): b_t = β·b_{t−1} + Δ_t (b_1 = Δ_1), x_{t+1} = x_t + η·b_t.
    Flower's defaults (η = 1, β = 0) make it FedAvg."""

    name = "fedavgm"
    moments = ("momentum",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.0) -> None:
        self.server_lr = _check("server_lr", server_lr, 0.0, low_open=True)
        self.momentum = _check("momentum", momentum, 0.0, 1.0)
        super().__init__()

    def params(self) -> dict[str, float]:
        return {"server_lr": self.server_lr, "momentum": self.momentum}

    def _adapts(self) -> bool:
        return self.server_lr != 1.0 or self.momentum != 0.0  # Flower's `server_opt`

    def _rule(self, x, d):
        buf = self.state["momentum"]
        out = {}
        for k in x:
            if self.momentum > 0.0:
                buf[k] = d[k].copy() if k not in buf else self.momentum * buf[k] + d[k]
                out[k] = x[k] + self.server_lr * buf[k]
            else:
                out[k] = x[k] + self.server_lr * d[k]
        return out


class _Adaptive(ServerOptimizer):
    """FedOpt (Reddi et al., 2021): x_{t+1} = x_t + η_t·m_t / (√v_t + τ), m_t the
    exponential mean of Δ; v_t per subclass (`_second`)."""

    moments = ("m", "v")

    def __init__(self, server_lr: float, beta_1: float, beta_2: float, tau: float) -> None:
        self.server_lr = _check("server_lr", server_lr, 0.0, low_open=True)
        self.beta_1 = _check("beta_1", beta_1, 0.0, 1.0)
        self.beta_2 = _check("beta_2", beta_2, 0.0, 1.0)
        self.tau = _check("tau", tau, 0.0, low_open=True)
        super().__init__()

    def params(self) -> dict[str, float]:
        return {"server_lr": self.server_lr, "beta_1": self.beta_1, "beta_2": self.beta_2,
                "tau": self.tau}

    def _adapts(self) -> bool:
        return True

    def _lr(self) -> float:
        return self.server_lr

    def _second(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _rule(self, x, d):
        m, v = self.state["m"], self.state["v"]
        lr = self._lr()
        out = {}
        for k in x:
            m[k] = self.beta_1 * m.get(k, np.zeros_like(d[k])) + (1.0 - self.beta_1) * d[k]
            v[k] = self._second(v.get(k, np.zeros_like(d[k])), d[k])
            out[k] = x[k] + lr * m[k] / (np.sqrt(v[k]) + self.tau)
        return out


class FedAdagrad(_Adaptive):
    """FedAdagrad: v_t = v_{t−1} + Δ_t²; Flower: η = 0.1, τ = 1e-3, β₁ = 0 (m_t = Δ_t)."""

    name = "fedadagrad"

    def __init__(self, server_lr: float = 0.1, tau: float = 1e-3, beta_1: float = 0.0) -> None:
        super().__init__(server_lr=server_lr, beta_1=beta_1, beta_2=0.0, tau=tau)

    def params(self) -> dict[str, float]:
        return {"server_lr": self.server_lr, "beta_1": self.beta_1, "tau": self.tau}

    def _second(self, v, d):
        return v + d * d


class FedAdam(_Adaptive):
    """FedAdam: v_t = β₂·v_{t−1} + (1−β₂)·Δ_t², step η·√(1−β₂^(t+1))/(1−β₁^(t+1)) (Flower's
    exponent); Flower: η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-3."""

    name = "fedadam"

    def __init__(self, server_lr: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(server_lr=server_lr, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _lr(self) -> float:
        t = self.t + 1.0  # Flower: np.power(beta, server_round + 1.0)
        return self.server_lr * math.sqrt(1.0 - self.beta_2 ** t) / (1.0 - self.beta_1 ** t)

    def _second(self, v, d):
        return self.beta_2 * v + (1.0 - self.beta_2) * d * d


class FedYogi(_Adaptive):
    """FedYogi: v_t = v_{t−1} − (1−β₂)·Δ_t²·sign(v_{t−1} − Δ_t²); Flower: η = 0.01,
    β₁ = 0.9, β₂ = 0.99, τ = 1e-3."""

    name = "fedyogi"

    def __init__(self, server_lr: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(server_lr=server_lr, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _second(self, v, d):
        d2 = d * d
        return v - (1.0 - self.beta_2) * d2 * np.sign(v - d2)


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "fedavg": ServerOptimizer, "fedavgm": FedAvgM, "fedadagrad": FedAdagrad,
    "fedadam": FedAdam, "fedyogi": FedYogi}


def make_optimizer(name: str, **params: float) -> ServerOptimizer:
    """The server optimizer `name` (SERVER_OPTIMIZERS) with the given hyper-parameters
    (others: Flower's defaults). Flower's names (`eta`, `server_learning_rate`,
    `server_momentum`) are accepted for `server_lr` and `momentum`."""
    key = str(name).strip().lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; known: {list(SERVER_OPTIMIZERS)}")
    cls = OPTIMIZERS[key]
    known = set(cls().params())
    args: dict[str, float] = {}
    for param, value in params.items():
        target = ALIASES.get(param, param)
        if target not in known:
            raise ValueError(f"unknown parameter {param!r} for server optimizer {key!r}; "
                             f"known: {sorted(known)}")
        if target in args:
            raise ValueError(f"parameter {target!r} given twice (as {param!r})")
        args[target] = value
    return cls(**args)
