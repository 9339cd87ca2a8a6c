"""The site half of `dp=…` on the CNN weight rounds, and the site's `require_dp` policy.

For each unit of a `train.<model>` message the training handler (client/stages/training.py) hands
its update (local − received weights) to `SiteDP.release`, which returns what crosses the
wire — the update under `delta.<key>` in the wire dtype: as is (`server-fixed`: the server
clips), clipped to the unit's norm C (`client-fixed`, `client-adaptive`, which also sends
`dp_unclipped`, 1 when the update was within C: Flower's norm bit), or clipped and noised
with N(0, (σC)²) (`local`, from a key that stays in `<site>/cache/training/<train-id>/`) —
and, when the site's policy says `require_dp: {max_epsilon: X, noise_multiplier: σ,
clipping_norm: C}`, the update clipped to the site's C and noised with N(0, (σC)²) by the
site itself, whatever mode the server announces (a coordinator that announces server-fixed
with a large σ would otherwise receive the raw update: issue 25), flagged `dp_site_noised`;
or why the update must not leave: the round asks no DP (the server would average it as
plain FedAvg), or the site's privacy loss would pass X. The handler marks the unit's
statistic refused with that reason, so the guard withholds, audits and reports it like any
refusal.

The site's privacy loss is its own account, kept in `<site>/audit/dp-releases.json`
(never sent; it outlives runs, like the disclosure ledger): every noised release this site
has made — (train id, model, unit, round) with its noise multiplier — composed by the RDP
accountant at δ = 1/n, n the site's patients. A replayed round (a resumed run) is the same
release, not a second one. The count is conservative: an update the guard then refuses
for another reason is counted too. Without `require_dp`, central modes rely on the
coordinator adding the noise it announces; a hospital that does not trust that sets
`require_dp`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neural import accounting
from shared import dp, fedavg
from shared.policy import DPRequirement

LEDGER_FILE = "dp-releases.json"
KEY_FILE = "dp-noise.key"


@dataclass
class SiteDP:
    """DP for one training message at one site (see the module)."""

    request: dp.RoundDP | None  # what the query asks; None: no DP
    requirement: DPRequirement | None  # the site's policy
    n: int  # the site's patients: δ = 1/n
    ledger: Path
    key_dir: Path
    release_id: tuple[str, str, int]  # (train id, model, round)

    @classmethod
    def for_round(cls, query: Mapping[str, Any], units: list[str], train_id: str,
                  model: str, round_no: int, requirement: DPRequirement | None, n: int,
                  audit_dir: Path, state_dir: Path) -> SiteDP | None:
        """None when the query asks for no DP and the site requires none (today's path)."""
        request = dp.RoundDP.from_query(query, units)
        if request is None and requirement is None:
            return None
        return cls(request, requirement, n, audit_dir / LEDGER_FILE, state_dir / train_id,
                   (train_id, model, round_no))

    # -- the update ----------------------------------------------------------------------
    def release(self, unit: str, update: Mapping[str, np.ndarray],
                wire: str) -> tuple[dict[str, Any], str | None]:
        """(the unit statistic's values — `delta.<key>` and, client-adaptive,
        `dp_unclipped`; under `require_dp` `dp_site_noised` —, the reason it is refused or
        None). A refused update is not counted in the ledger."""
        refused = self.refusal(unit)
        if refused is not None:
            return {}, refused
        request = self.request
        if self.requirement is not None:  # the site's own clipping and noise, whatever is asked
            sigma, norm = self.site_noise(unit)
            values = self._noised(unit, update, wire, sigma, norm)
            values[dp.SITE_NOISED] = 1
            self._record(unit, sigma)
            return values, None
        if request is None:  # no DP asked, none required
            return _delta(fedavg.encode(update, wire)), None
        values = self._privatized(request, unit, update, wire)
        if request.noise_multiplier > 0:
            self._record(unit, request.noise_multiplier)
        return values, None

    def site_noise(self, unit: str) -> tuple[float, float]:
        """(σ, C) of the noise the site adds under `require_dp`: its own σ, or the round's
        when a `local` round asks more; its own C, or the round's when smaller (a central
        mode's server then finds the update within its norm up to the noise). Never less
        than the site's: a server-fixed, un-noised or low-σ round gets the site's."""
        need, request = self.requirement, self.request
        assert need is not None and request is not None
        asked = request.noise_multiplier if request.mode == "local" else 0.0
        return (max(need.noise_multiplier, asked),
                min(need.clipping_norm, request.clipping_norms[unit]))

    def _noised(self, unit: str, update: Mapping[str, np.ndarray], wire: str, sigma: float,
                norm: float) -> dict[str, Any]:
        """Clipped to C, + N(0, (σC)²) from the site's key (a replayed round: the same draw)."""
        clipped, _ = dp.clip(update, norm)
        rng = dp.noise_rng(self._secret(), *self.release_id, unit)
        return _delta(fedavg.encode(dp.add_noise(clipped, sigma * norm, rng), wire))

    def _privatized(self, request: dp.RoundDP, unit: str, update: Mapping[str, np.ndarray],
                    wire: str) -> dict[str, Any]:
        norm = request.clipping_norms[unit]
        if request.mode == "server-fixed":
            return _delta(fedavg.encode(update, wire))
        if request.mode == "local":
            return self._noised(unit, update, wire, request.noise_multiplier, norm)
        encoded, was_clipped = dp.clip_encoded(update, norm, wire)
        values = _delta(encoded)
        if request.mode == "client-adaptive":
            values[dp.UNCLIPPED] = int(not was_clipped)
        return values

    # -- the policy ----------------------------------------------------------------------
    def refusal(self, unit: str) -> str | None:
        """Why `require_dp` forbids this unit's update (None: it may leave, noised by the
        site): a round without DP (the server would average it as plain FedAvg), or a
        release that would take the site's ε past its budget."""
        need = self.requirement
        if need is None:
            return None
        if self.request is None:
            return (f"policy requires DP with ε ≤ {need.max_epsilon:g}; this update is not "
                    f"noised")
        history = self._history()
        if self._key(unit) not in history:
            history[self._key(unit)] = self.site_noise(unit)[0]
        eps = self.epsilon(history)
        if eps is None or eps > need.max_epsilon:
            shown = "unbounded" if eps is None else f"{eps:.3g}"
            return (f"over budget: ε would be {shown} (policy: ε ≤ {need.max_epsilon:g} at "
                    f"δ = 1/{self.n}, {len(history)} noised releases)")
        return None

    def epsilon(self, history: Mapping[str, float] | None = None) -> float | None:
        """The site's ε at δ = 1/n over `history` (default: its ledger)."""
        history = self._history() if history is None else history
        counts: dict[float, int] = {}
        for sigma in history.values():
            counts[sigma] = counts.get(sigma, 0) + 1
        return accounting.epsilon_of(counts.items(), 1 / max(self.n, 2))

    # -- files ---------------------------------------------------------------------------
    def _key(self, unit: str) -> str:
        train_id, model, round_no = self.release_id
        return f"{train_id}/{model}/{unit}/{round_no}"

    def _history(self) -> dict[str, float]:
        try:
            raw = json.loads(self.ledger.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {str(k): float(v["noise_multiplier"]) for k, v in raw["releases"].items()}

    def _record(self, unit: str, sigma: float) -> None:
        try:
            raw = json.loads(self.ledger.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raw = {"releases": {}}
        raw["releases"].setdefault(self._key(unit), {"noise_multiplier": sigma})
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ledger.with_name(f".{self.ledger.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.ledger)

    def _secret(self) -> bytes:
        """The site's noise key for this training (created once, never sent)."""
        path = self.key_dir / KEY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "xb") as out:
                out.write(os.urandom(32))
            os.chmod(path, 0o600)
        except FileExistsError:
            pass
        return path.read_bytes()


def _delta(encoded: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {f"delta.{k}": v for k, v in encoded.items()}
