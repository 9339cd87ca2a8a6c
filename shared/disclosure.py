"""Differencing between releases: the rules of a site's disclosure ledger (`client.egress.ledger`).

One release passing the egress guard's per-release rules (n ≥ min_patients, cells ≥
min_cell_count) can still give patients away next to another: the same statistic over
patient sets S and T whose symmetric difference S Δ T holds a few patients reveals their
aggregate (a feature sum over all rows minus the sum over all rows but one CV fold is that
fold's sum). The ledger therefore records, per *family* — what is aggregated and every
query parameter the value depends on, but not which rows — each patient set released, and
refuses a new set S when 0 < |S Δ T| < min_difference for an earlier T of the family.

Sets are Python ints used as bitsets over the site's own patient numbering; nothing here
does I/O. Also here: the Cox risk-set rule (`allow_risk_set_differences`), which is the
same differencing rule applied along the time axis of one release.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from shared import queries

ROW_KEYS = frozenset({"rows", "fold", "run_id"})  # query keys that choose rows, not values
# How a ledger refusal reads (client.egress.ledger; server.core.disclosures counts them by these).
DIFFERS = "differs from an earlier release of the same statistic"
SHIFTS = "on a grid that shifts an earlier one"


def bitset(indices: Iterable[int]) -> int:
    """The set of patient (or column) numbers as an int bitset."""
    bits = 0
    for i in indices:
        bits |= 1 << int(i)
    return bits


def size(bits: int) -> int:
    return bits.bit_count()


def difference(a: int, b: int) -> int:
    """|A Δ B|: the patients in exactly one of the two sets."""
    return (a ^ b).bit_count()


def too_close(members: int, earlier: Iterable[int], min_difference: int) -> int | None:
    """The smallest |S Δ T| with 0 < |S Δ T| < min_difference over the earlier sets T, or
    None when the new set S can be released next to all of them."""
    close = [d for t in earlier if 0 < (d := difference(members, t)) < min_difference]
    return min(close) if close else None


def nested(a: float | np.ndarray, b: float | np.ndarray) -> bool:
    """Whether two grids of one statistic can both be released over the same patients: one
    refines the other where they overlap, so together they show nothing finer than the
    finer one. A grid is a bin width (cells are multiples of it: nested when one width is a
    whole multiple of the other) or an array of edges (nested when, within the range both
    cover, one's edges contain the other's). Two shifted grids are not nested: their union
    has cells narrower than either (vantage6's reconstruction of event times from Kaplan–
    Meier tables asked with shifted bins)."""
    if np.ndim(a) == 0 and np.ndim(b) == 0:
        small, large = sorted((float(a), float(b)))
        if small == large:
            return True
        if small <= 0:
            return False  # exact times next to binned ones
        ratio = large / small
        return bool(np.isclose(ratio, round(ratio), rtol=0, atol=1e-9))
    if np.ndim(a) != 1 or np.ndim(b) != 1:
        return True  # a width and an edge list are different kinds of table
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    lo, hi = max(a.min(), b.min()), min(a.max(), b.max())
    if lo >= hi:
        return True
    inside_a = set(a[(a >= lo) & (a <= hi)].tolist()) | {lo, hi}
    inside_b = set(b[(b >= lo) & (b <= hi)].tolist()) | {lo, hi}
    return inside_a <= inside_b or inside_b <= inside_a


def family(*parts: Any) -> str:
    """A family key: a readable head (the first part) and a digest of every parameter the
    value depends on (numpy arrays by dtype, shape and bytes)."""
    h = hashlib.sha256()
    for part in parts[1:]:
        h.update(_canonical(part))
        h.update(b"\x00")
    return f"{parts[0]}:{h.hexdigest()[:24]}" if len(parts) > 1 else str(parts[0])


def query_family(head: str, query: Mapping[str, Any], drop: Iterable[str] = ()) -> str:
    """The family of a value computed from a query: every key except those that choose rows
    (`ROW_KEYS`), those no statistic depends on (declared so in `shared.queries`, e.g. a
    run's prediction files or a worker count) and those named in `drop`. The query has
    passed its declaration, so no undeclared key can make a fresh family."""
    skip = ROW_KEYS | queries.NOT_VALUE_KEYS | set(drop)
    return family(head, *[(k, query[k]) for k in sorted(query) if k not in skip])


def _canonical(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        return f"a{a.dtype.str}{a.shape}".encode() + a.tobytes()
    if isinstance(value, tuple | list):
        return b"(" + b",".join(_canonical(v) for v in value) + b")"
    if isinstance(value, float | np.floating):
        return f"f{float(value)!r}".encode()
    if isinstance(value, bool | np.bool_):
        return f"b{bool(value)}".encode()
    if isinstance(value, int | np.integer):
        return f"i{int(value)}".encode()
    return f"s{value!s}".encode()


# --------------------------------------------------------------------------- Cox risk sets


def risk_set_leavers(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """How many of a site's patients leave its risk set between successive released risk
    sets: the whole cohort (released as its totals), then R(t) = {i: T_i ≥ t} at each
    grid time t. Entry j is |R(t_{j−1}) \\ R(t_j)| (R(t_{−1}) the cohort); the patients
    still at risk after the last grid time are not a difference of two releases."""
    times = np.asarray(times, dtype=np.float64)
    at_risk = np.array([len(times), *[(times >= t).sum() for t in np.asarray(grid)]])
    return -np.diff(at_risk)


def small_risk_set_differences(times: np.ndarray, grid: np.ndarray, min_difference: int) -> int:
    """How many successive released risk sets differ by 0 < k < min_difference patients."""
    leavers = risk_set_leavers(times, grid)
    return int(np.sum((leavers > 0) & (leavers < min_difference)))


def coarsened_time_bin(times: np.ndarray, base: float, min_difference: int,
                       max_factor: int = 1000) -> float | None:
    """The smallest multiple m·base (m = 1, 2, …) of a site's time bin at which every
    distinct rounded-up time of its cohort holds 0 or ≥ min_difference patients, so that no
    two successive risk sets on any global grid differ by fewer (the patients leaving
    between two grid times are then whole groups of one rounded time). None when even one
    bin over all times does not (fewer patients than min_difference)."""
    times = np.asarray(times, dtype=np.float64)
    if len(times) < min_difference:
        return None
    base = float(base) if base > 0 else 1.0
    for m in range(1, max_factor + 1):
        step = m * base
        _, counts = np.unique(np.ceil(times / step) * step, return_counts=True)
        if np.all(counts >= min_difference):
            return step
    return None


def pinned(*arrays: np.ndarray) -> np.ndarray:
    """What a statistic was evaluated on (a grid, placement rows), as the ledger's grid:
    three edges 0 < u < 1, u a digest of the arrays. Two different ones are never nested,
    so over the same patients the ledger releases a family for one of them only; the same
    one again (a re-run) passes.

    Why not the edges themselves: the ledger lets nested grids pass (one refines the
    other), but a site's cells are merged to min_cell_count, and a coarser grid's cell
    minus the finer grid's merged one is a cell of one or two patients. For placements: each
    set's sums are one equation in the joint table of the patients' cells under two models;
    one placement function per set keeps a coordinator from solving for it."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        h.update(b"\x00")
    u = (int(h.hexdigest()[:13], 16) + 1) / (16**13 + 2)
    return np.array([0.0, u, 1.0])
