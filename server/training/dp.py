"""Differential privacy on the server side of the CNN training engine (server/training/engine.py):
the clipping norm of every unit, the check or the clipping of each update, the noised mean
and ε from the accountant (shared/dp.py holds the math)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neural import accounting
from server.core.transport import StageError
from shared import dp
from shared.config import StudyConfig
from shared.dp import DPConfig


class ServerDP:
    """The server half of `dp=…` for one model (shared/dp.py): the clipping norm of every
    unit (client-adaptive: moved each round), the check or the clipping of each update,
    the equal-weight mean with its Gaussian noise — drawn from a key in the checkpoint
    folder that is never sent and is deleted when training ends —, the updates each site
    sent, and ε from the accountant."""

    KEY = "dp-noise.key"

    def __init__(self, config: DPConfig, units: list[str], sites: list[str],
                 sizes: Mapping[str, int], folder: Path) -> None:
        self.config, self.units, self.sizes = config, list(units), dict(sizes)
        self.clip = dict.fromkeys(units, config.clipping_norm)
        self.sent_count = dict.fromkeys(sites, 0)
        self.releases = 0
        self.key_path, self._key = folder / self.KEY, b""
        self._bits: dict[str, dict[str, int]] = {}
        self.count_std: float | None = None
        self.update_sigma = config.noise_multiplier
        if config.mode == "client-adaptive":
            try:
                self.count_std, self.update_sigma = dp.adaptive_noise(
                    config.noise_multiplier, len(sites), config.count_stddev)
            except ValueError as err:
                raise StageError(str(err)) from None

    def query(self) -> dict[str, Any]:
        """The round's DP fields of `train.<model>`: mode, σ, each unit's clipping norm."""
        return dp.RoundDP.query(self.config.mode, self.config.noise_multiplier, self.clip)

    def sent(self, site: str) -> None:
        self.sent_count[site] = self.sent_count.get(site, 0) + 1

    def admit(self, site: str, unit: str, delta: dict[str, np.ndarray],
              payload: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], str | None]:
        """(the update to average, why it is left out): server-fixed clips it; the
        client-clipped modes check that the site did (and client-adaptive reads its norm
        bit); local's noise hides the norm, so it is taken as sent."""
        mode, norm = self.config.mode, self.clip[unit]
        if mode == "server-fixed":
            return dp.clip(delta, norm)[0], None
        if mode == "local" or payload.get(f"{unit}.{dp.SITE_NOISED}") == 1:
            return delta, None  # noised at the site (its `require_dp`): the norm is hidden
        size = dp.update_norm(delta)
        if size > norm * (1 + 1e-9):
            return delta, (f"its norm {size:.4g} exceeds the clipping norm {norm:.4g} "
                           f"(not clipped at the site)")
        if mode == "client-adaptive":
            bit = payload.get(f"{unit}.{dp.UNCLIPPED}")
            if bit not in (0, 1):
                return delta, "it lacks the norm bit of client-adaptive clipping"
            self._bits.setdefault(unit, {})[site] = int(bit)
        return delta, None

    def aggregate(self, unit: str, round_no: int,
                  updates: list[tuple[str, float, dict[str, np.ndarray]]],
                  entry: dict[str, Any], skip: set[str]) -> dict[str, np.ndarray] | None:
        """The released mean update of `unit` (None without updates); the round's clipping
        norm, noise std and number of updates go in `entry["dp"][unit]`."""
        norm, m = self.clip[unit], len(updates)
        info: dict[str, Any] = {"clipping_norm": norm, "sites": m}
        entry.setdefault("dp", {})[unit] = info
        bits = self._bits.pop(unit, {})
        if not updates:
            return None
        if self.config.mode in dp.CENTRAL:
            std = dp.central_std(self.update_sigma, norm, m)
        else:  # local: each site added σC; on the mean that is σC/√m
            std = 0.0
            info["noise_std_of_mean"] = self.config.noise_multiplier * norm / m ** 0.5
        mean = dp.private_mean([d for _, _, d in updates], std,
                               dp.noise_rng(self._key, unit, round_no), skip=skip)
        info["noise_std"] = std
        self.releases += 1
        if self.config.mode == "client-adaptive":
            # a site that noised its update itself (require_dp) sends no bit: counted clipped
            count = sum(bits.get(s, 0) for s, _, _ in updates)
            noise = dp.noise_rng(self._key, unit, round_no, "count").normal(
                0.0, self.count_std) if self.count_std else 0.0
            fraction = (count + noise) / m
            self.clip[unit] = dp.adaptive_norm(norm, fraction, self.config.target_quantile,
                                               self.config.clip_lr)
            info["unclipped_fraction"] = fraction  # noised: part of the release
        return mean

    def summary(self) -> dict[str, Any]:
        """`dp` of the model's results: the configuration, each site's steps (the unit
        updates it sent) and rounds, δ = 1/n and ε per site and overall (δ = 1/Σn, the
        releases of the aggregate)."""
        sigma, units = self.config.noise_multiplier, max(len(self.units), 1)
        delta = {s: 1 / self.sizes[s] for s in self.sent_count if self.sizes.get(s, 0) > 1}
        total = sum(self.sizes.get(s, 0) for s in self.sent_count)
        if total > 1:
            delta["overall"] = 1 / total
        steps = {**self.sent_count, "overall": self.releases}
        return {
            **self.config.as_dict(), "update_noise_multiplier": self.update_sigma,
            "count_stddev": self.count_std, "aggregation": "equal weights",
            "clipping_norm_final": dict(self.clip), "delta": delta, "steps": steps,
            "rounds": {s: n // units for s, n in steps.items()}, "units": len(self.units),
            "epsilon": {s: (accounting.epsilon(sigma, n, delta[s]) if s in delta else None)
                        for s, n in steps.items()},
            "accountant": "Opacus RDPAccountant: Gaussian, sampling rate 1, one step per "
                          "unit and round, add/remove one site's update"}

    def state(self) -> dict[str, Any]:
        return {"clip": self.clip, "sent": self.sent_count, "releases": self.releases}

    def load(self, state: Mapping[str, Any]) -> None:
        self.clip.update({u: float(c) for u, c in state.get("clip", {}).items()})
        self.sent_count.update({s: int(n) for s, n in state.get("sent", {}).items()})
        self.releases = int(state.get("releases", 0))

    def open_key(self, fresh: bool) -> None:
        """A new noise key for a fresh training, the checkpointed one for a resumed run (a
        replayed round then draws the same noise)."""
        if fresh or not self.key_path.is_file():
            self.key_path.parent.mkdir(parents=True, exist_ok=True)
            self.key_path.write_bytes(os.urandom(32))
            os.chmod(self.key_path, 0o600)
        self._key = self.key_path.read_bytes()

    def close_key(self) -> None:
        self.key_path.unlink(missing_ok=True)


def dp_postprocess(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Noised BatchNorm variances clamped at 0 (post-processing: no privacy cost)."""
    for key, value in weights.items():
        if key.endswith("running_var"):
            weights[key] = np.maximum(value, 0).astype(value.dtype)
    return weights


def dp_settings(config: StudyConfig) -> DPConfig | None:
    """The run config's DP (None: `dp = off`)."""
    try:
        return DPConfig.from_settings(config.settings)
    except ValueError as err:
        raise StageError(f"run config dp: {err}") from None
