"""Differential privacy of the CNN weight rounds (`dp=…`): clipping, Gaussian noise, the
adaptive clipping norm and the RDP accountant. Pure numpy (the accountant is Opacus').

The formulas are Flower's (`flwr.serverapp.strategy.DifferentialPrivacy*`,
`flwr.clientapp.mod.fixedclipping_mod` / `adaptiveclipping_mod` / `LocalDpMod`,
`flwr.supercore.differential_privacy`); tests/test_dp.py checks them against Flower's own
functions. Flower's pieces themselves cannot act on FedDLR's training messages: every
array of a payload travels packed in one npz blob (wire/), the reply carries the update
`<unit>.delta.<key>` (not weights under the sent keys `w.<unit>.<key>`) beside validation
statistics, several units travel in one message, and the server sends its own messages
through the grid instead of running a Flower Strategy. So the site's training handler
(client/local/dp.py) and the training engine (server/training/engine.py) call the functions here.

What is protected: the site's whole contribution to one aggregate (client-level DP,
add/remove one site's update; McMahan et al. 2018, Andrew et al. 2021). A *release* is one
unit's noised aggregate of one round; the units of a message (CV folds) are separate
releases, so a site that took part in R rounds of a model with K units has taken R·K
steps of the Gaussian mechanism. Updates are averaged with equal weights under DP (as
Flower's accounted path requires): the mean then moves by at most C/m when one site's
update changes, which is what the noise σ·C/m is calibrated to.

Modes:
- `server-fixed`: sites send their update as is; the server clips each to C and adds
  N(0, (σC/m)²) to the mean (Flower's `DifferentialPrivacyServerSideFixedClipping`).
- `client-fixed`: each site clips its update to C (`fixedclipping_mod`); the server checks
  the norm and adds N(0, (σC/m)²) to the mean (`…ClientSideFixedClipping`).
- `client-adaptive`: as client-fixed with a clipping norm per unit that follows the target
  quantile γ of the update norms (Andrew et al.): each site also sends whether its update
  was within C (`adaptiveclipping_mod`'s norm bit), the server counts them with noise
  N(0, σ_b²) and sets C ← C·exp(−η(b̄ − γ)); the update noise σ_Δ = (σ⁻² − (2σ_b)⁻²)^−½
  keeps the pair at noise multiplier σ (`compute_adaptive_noise_params`).
- `local`: each site clips to C and adds N(0, (σC)²) itself (`LocalDpMod`, whose ε/δ
  parameters are this σ by the Gaussian mechanism σ = √(2 ln(1.25/δ))/ε).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from shared.settings import BY_KEY, check_value, config_values, setting

MODES = tuple(m for m in BY_KEY["dp"].choices if m != "off")  # the run config's `dp`
CENTRAL = ("client-fixed", "client-adaptive", "server-fixed")  # the server adds the noise
CLIENT_CLIPPED = ("client-fixed", "client-adaptive", "local")  # the site clips
# query keys (what the server tells a site each round)
Q_MODE, Q_SIGMA, Q_CLIP = "dp.mode", "dp.noise_multiplier", "dp.clipping_norm"
UNCLIPPED = "dp_unclipped"  # reply value next to `<unit>.delta.*` (client-adaptive)
# reply value next to `<unit>.delta.*`: the site clipped and noised the update with its own
# `require_dp` parameters (its norm is hidden by the noise, as under `local`)
SITE_NOISED = "dp_site_noised"
# RDP orders of the accountant: Opacus' defaults (1.1 … 63) widened at both ends, for the
# small noise multipliers (optimal order near 1) and the large ones
ORDERS = ([1 + x / 100 for x in range(1, 10)] + [1 + x / 10.0 for x in range(1, 100)]
          + list(range(12, 64)) + [80, 96, 128, 192, 256, 512])


@dataclass(frozen=True)
class DPConfig:
    """The run config's `dp*` keys (shared/settings.py: defaults and ranges are declared
    there). `count_stddev` None: Flower's default, m/20 for m training sites."""

    mode: str = setting("dp", default=False)
    clipping_norm: float = setting("dp-clipping-norm", default=False)
    noise_multiplier: float = setting("dp-noise-multiplier", default=False)
    target_quantile: float = setting("dp-target-quantile")
    clip_lr: float = setting("dp-clip-lr")
    count_stddev: float | None = setting("dp-count-stddev")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> DPConfig | None:
        """None when `dp = off` (nothing changes anywhere)."""
        if settings["dp"] in (None, "off"):
            return None
        return cls(**config_values(cls, settings))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"dp mode {self.mode!r} is not one of {list(MODES)}")
        for f in fields(self):  # each value within its run-config key's range
            try:
                check_value(f.metadata["setting"], getattr(self, f.name))
            except (TypeError, ValueError) as err:
                raise ValueError(f"dp parameters out of range: {f.name}: {err}") from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RoundDP:
    """What a site reads from a `train.<model>` query: the mode, σ and the clipping norm of
    each unit (client-adaptive: this round's; server-fixed: the server's, unused here)."""

    mode: str
    noise_multiplier: float
    clipping_norms: Mapping[str, float]

    @staticmethod
    def query(mode: str, noise_multiplier: float,
              clipping_norms: Mapping[str, float]) -> dict[str, Any]:
        """The query fields (scalars only: `dp.mode`, `dp.noise_multiplier`,
        `dp.clipping_norm.<unit>`)."""
        out: dict[str, Any] = {Q_MODE: mode, Q_SIGMA: float(noise_multiplier)}
        out.update({f"{Q_CLIP}.{u}": float(c) for u, c in clipping_norms.items()})
        return out

    @classmethod
    def from_query(cls, query: Mapping[str, Any], units: Sequence[str]) -> RoundDP | None:
        """None when the query asks for no DP; ValueError for a malformed request."""
        if Q_MODE not in query:
            return None
        mode = str(query[Q_MODE])
        sigma = float(query.get(Q_SIGMA, -1))
        norms = {u: float(query.get(f"{Q_CLIP}.{u}", 0)) for u in units}
        if mode not in MODES or not sigma >= 0 or not all(
                math.isfinite(c) and c > 0 for c in norms.values()):
            raise ValueError(f"bad DP request (mode {mode!r}, noise multiplier {sigma}, "
                             f"clipping norms {norms})")
        return cls(mode, sigma, norms)


# --------------------------------------------------------------------------- formulas


def _floating(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the floating arrays flattened together, in float64 (Flower's
    `get_norm`); integer counters (BatchNorm's `num_batches_tracked`) are not weights."""
    return float(math.sqrt(sum(float(np.sum(np.square(np.asarray(update[k], np.float64))))
                               for k in _floating(update))))


def clip(update: Mapping[str, np.ndarray], clipping_norm: float,
         ) -> tuple[dict[str, np.ndarray], bool]:
    """(update scaled by min(1, C/‖update‖), whether it was scaled): Flower's FlatClip
    (`clip_inputs_inplace`). Float arrays keep their dtype; other arrays are unchanged."""
    norm = update_norm(update)
    factor = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    out = {k: np.asarray(v) for k, v in update.items()}
    if factor < 1:
        for key in _floating(out):
            out[key] = (out[key].astype(np.float64) * factor).astype(out[key].dtype)
    return out, factor < 1


def clip_encoded(update: Mapping[str, np.ndarray], clipping_norm: float,
                 wire: str) -> tuple[dict[str, np.ndarray], bool]:
    """(the update clipped to C and encoded in the wire dtype, whether it was clipped),
    such that what the server decodes has norm ≤ C: the float32 cast or the wire's rounding
    (bfloat16: up to 2⁻⁸ of each value) could otherwise push a clipped update just past C,
    so the update is shrunk a little more until its decoded form is within C."""
    from shared import fedavg

    clipped, was = clip(update, clipping_norm)
    for _ in range(16):
        encoded = fedavg.encode(clipped, wire)
        norm = update_norm(fedavg.decode(encoded, wire, like=update))
        if norm <= clipping_norm:
            return encoded, was
        clipped, _ = clip(clipped, clipping_norm * clipping_norm / norm * (1 - 2 ** -10))
    raise ValueError(f"could not clip the update to {clipping_norm} in {wire}")


def central_std(noise_multiplier: float, clipping_norm: float, sites: int) -> float:
    """Standard deviation of the noise on the mean of `sites` clipped updates: σ·C/m
    (Flower's `compute_stdv`)."""
    return float(noise_multiplier * clipping_norm / sites)


def adaptive_noise(noise_multiplier: float, sites: int,
                   count_stddev: float | None) -> tuple[float, float]:
    """(σ_b, σ_Δ): the noise on the count of unclipped updates and the noise multiplier of
    the updates so that the two releases together have noise multiplier σ (Andrew et al.
    Theorem 1; Flower's `compute_adaptive_noise_params`, same default σ_b = m/20)."""
    if noise_multiplier <= 0:
        return (0.0 if count_stddev is None else float(count_stddev)), 0.0
    count = sites / 20 if count_stddev is None else float(count_stddev)
    if noise_multiplier >= 2 * count:
        raise ValueError(f"client-adaptive: noise multiplier {noise_multiplier} needs "
                         f"dp-count-stddev > {noise_multiplier / 2:g} (it is {count:g}; "
                         f"Flower's default is sites/20)")
    return count, float((noise_multiplier ** -2 - (2 * count) ** -2) ** -0.5)


def adaptive_norm(clipping_norm: float, unclipped_fraction: float, target_quantile: float,
                  lr: float) -> float:
    """Andrew et al.'s geometric update: C·exp(−η(b̄ − γ)), b̄ the (noised) fraction of
    updates within C. (Flower 1.42's Message-API wrapper feeds the *clipped* fraction into
    the same expression, which moves C away from the quantile; this is the paper's.)"""
    return float(clipping_norm * math.exp(-lr * (unclipped_fraction - target_quantile)))


def add_noise(arrays: Mapping[str, np.ndarray], std: float,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Floating arrays + N(0, std²) per element (`add_gaussian_noise_inplace`), drawn in
    float64 and added in the array's dtype; integer arrays unchanged."""
    out = {k: np.asarray(v) for k, v in arrays.items()}
    if std <= 0:
        return out
    for key in _floating(out):
        noise = rng.normal(0.0, std, out[key].shape)
        out[key] = (out[key].astype(np.float64) + noise).astype(out[key].dtype)
    return out


def noise_rng(secret: bytes, *labels: object) -> np.random.Generator:
    """A generator for one release, from a secret key that never leaves its holder (the
    server's for central noise, the site's for local noise) and the release's labels, so a
    replayed round draws the same noise (no second, independent release of it) while no one
    who knows the run config can regenerate it."""
    digest = hashlib.sha256(secret + repr(labels).encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))


def private_mean(updates: Sequence[Mapping[str, np.ndarray]], std: float,
                 rng: np.random.Generator, skip: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The equal-weight mean of the (already clipped) updates plus N(0, std²) on every
    floating element: the aggregate the server releases under a central mode."""
    from shared import fedavg

    mean = fedavg.fedavg([(1.0, u) for u in updates], skip=skip)
    return add_noise(mean, std, rng)


# --------------------------------------------------------------------------- accountant
