"""Privacy accounting of the CNN rounds' Gaussian mechanism: ε at δ by Opacus' RDP
accountant, at the orders shared.dp.ORDERS."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from opacus.accountants import RDPAccountant

from shared.dp import ORDERS


def epsilon(noise_multiplier: float, steps: int, delta: float) -> float | None:
    """ε at δ after `steps` releases of the Gaussian mechanism with noise multiplier σ,
    every site in every round (sampling rate 1): Opacus' RDP accountant. None when σ = 0 or
    δ is not in (0, 1) (no finite guarantee); 0 for no step."""
    if steps <= 0:
        return 0.0
    return epsilon_of([(noise_multiplier, steps)], delta)


def epsilon_of(history: Iterable[tuple[float, int]], delta: float) -> float | None:
    """ε at δ of a composition of (σ, steps) Gaussian releases (Opacus' RDPAccountant at
    the orders `ORDERS`)."""
    steps = [(float(s), int(n)) for s, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _ in steps) or not 0 < delta < 1:
        return None
    accountant = RDPAccountant()
    accountant.history = [(s, 1.0, n) for s, n in steps]
    with warnings.catch_warnings():  # at the ends of ORDERS the bound is loose, not wrong
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta, alphas=ORDERS))
