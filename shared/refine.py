"""Score-grid refinement: make histogram statistics exact on the sites' raw scores.

Why. A grid bin that holds patients of both labels hides how they are ordered: the AUC,
DeLong placements and Youden cut computed from the histogram are those of the scores
snapped to the grid, not of the scores a clinician reads. They equal the raw-score values
exactly when every such *mixed* bin holds one distinct score value (all its pairs are true
ties, which the histogram already counts ½). Refinement splits the mixed bins until that is
proven.

Score keys. A float64 in [0, 1] is identified with its bit pattern (`keys`): an int64 that
is monotone in the value, so a bin is an integer interval [lo, hi) of keys and a bin with
hi − lo = 1 (*atomic*) holds one float64 value by construction. The shared grid's edges map
to keys (`bit_edges`; its last bin, closed at 1.0, becomes [key(e), key(1) + 1)). A split
bin is cut into `SUB_BINS` sub-bins of equal key width w = ⌈(hi − lo)/SUB_BINS⌉; since
[0, 1] holds fewer than 2^62 float64 values, two rounds make any bin atomic.

Site side (`site_cells`). Each round's query carries every split list so far; the site
recomputes its earlier releases (deterministic) and answers, for each bin split this round
and each label, the sub-histogram of its patients there, coarsened within the bin to its
min_cell_count (`roc.coarsen` over the non-empty sub-bins). It refines a label's cells only
where its previous release had that exact bin as a cell of its own: a bin inside a merged
cell stays merged, so no release can be subtracted from an earlier one to expose a cell
below min_cell_count. Per split bin the site also says whether all its patients in it share
one value (`one_value`: 1 / 0, or −1 — withheld — when it holds fewer than min_cell_count
patients there or is not one of its cells); no value is sent.

Above min_cell_count 1 (issue 25) a sub-cell's first and last sub-bin would be its lowest
and highest patient's score to 2⁻³² of the bin — order statistics of real patients. There a
bin's sub-cells are released only when each is a tie: ≥ min_cell_count patients of one
label sharing one float64 value (theirs together, like a histogram cell's count); a bin of
several values stays one cell. The first-round grid is the server's within the site's
resolution (`roc.site_edges`: n // min_cell_count bins), so at a site with fewer than
bins × min_cell_count patients the first-round cells span several of the server's bins and
no round splits them: exactness at min_cell_count ≥ 2 needs both a large site and mixed
bins that are ties. At min_cell_count 1 nothing changed: the policy releases cells of one
patient, and two rounds make any bin atomic.

Server side. The server keeps every site's cells as key intervals, merges each round's
sub-cells in (`merge`), and builds the refined grid from all cell bounds (`refined_edges`).
A bin is *proven single-valued* for a set of sites when it is atomic, or when exactly one
site of the set holds patients in it and that site flagged an enclosing bin as one value
(`proven`): several sites each with one value may hold different values, so their flags
prove nothing together. A set's histogram statistics are exact on the raw scores when every
bin covered by cells of both labels is a single-bin cell at every site and proven
(`is_exact`); the AUC bound (`auc_bound`) then collapses to the AUC, and otherwise bounds the
raw-score AUC (an unresolved pair may fall either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared import roc

SUB_BINS = 1 << 32  # sub-bins per split bin: two rounds make any bin of [0, 1] atomic
MAX_ROUNDS = 3
ONE_KEY = int(np.float64(1.0).view(np.int64))


# --------------------------------------------------------------------------- keys, grid


def keys(scores: np.ndarray) -> np.ndarray:
    """int64 keys of float64 scores in [0, 1] (bit patterns; −0.0 read as 0.0)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.where(s == 0.0, 0.0, s).astype(np.float64).view(np.int64)


def bit_edges(edges: np.ndarray) -> np.ndarray:
    """Keys of a grid's edges; the last edge becomes key(1.0) + 1 (its bin is closed)."""
    bits = keys(np.asarray(edges, dtype=np.float64)).copy()
    bits[-1] = max(int(bits[-1]), ONE_KEY) + 1
    return bits


def float_edges(bits: np.ndarray) -> np.ndarray:
    """A refined grid's edges as float64 (the last one is the float just above 1.0): the
    bins are half-open, so `roc.local_histogram` and `validation.bin_index` put every score
    in [0, 1] where the keys do."""
    return np.asarray(bits, dtype=np.int64).view(np.float64).copy()


def sub_width(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Key width of the sub-bins of each split bin [lo, hi)."""
    span = np.asarray(hi, dtype=np.int64) - np.asarray(lo, dtype=np.int64)
    return np.maximum(-(-span // SUB_BINS), 1)


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class KeyCells:
    """One label's cells as key intervals [lo, hi) and patient counts."""

    lo: np.ndarray
    hi: np.ndarray
    count: np.ndarray

    @classmethod
    def from_grid(cls, first: np.ndarray, last: np.ndarray, count: np.ndarray,
                  bits: np.ndarray) -> KeyCells:
        """Cells given as grid-bin ranges first … last (`roc.coarsen`) on grid keys `bits`."""
        first, last = (np.asarray(v, dtype=np.int64) for v in (first, last))
        return cls(bits[first], bits[last + 1], np.asarray(count, dtype=np.int64))

    def on(self, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first, last, count) on a grid whose keys include every bound (`roc.Cells`)."""
        return (np.searchsorted(bits, self.lo), np.searchsorted(bits, self.hi) - 1,
                self.count)


def sparse_coarsen(index: np.ndarray, min_cell: int) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """`roc.coarsen` of the histogram of the sub-bin indices `index`, without building the
    dense histogram (its bins are the non-empty sub-bins, in order): (first, last, count)."""
    values, counts = np.unique(np.asarray(index, dtype=np.int64), return_counts=True)
    if not len(values):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    first, last, merged = roc.coarsen(counts, min_cell)
    return values[first], values[last], merged


@dataclass(frozen=True)
class SiteRelease:
    """What a site releases in one refinement round for one patient group: per label, the
    sub-cells of the split bins (`split` = index into the round's split list, `first`/
    `last` sub-bin indices, `count`); `one_value` per split bin (group `all` only)."""

    split: tuple[np.ndarray, np.ndarray]
    first: tuple[np.ndarray, np.ndarray]
    last: tuple[np.ndarray, np.ndarray]
    count: tuple[np.ndarray, np.ndarray]
    own: np.ndarray | None = None  # per split bin: a cell of its own (either label) before it


def site_cells(k: np.ndarray, y: np.ndarray, bits0: np.ndarray,
               rounds: list[tuple[np.ndarray, np.ndarray]], min_cell: int) -> SiteRelease:
    """The site's release for the last of `rounds` (each a split list (lo, hi) of keys),
    after recomputing its earlier releases: the first-round cells on the grid `bits0`, then
    each round's sub-cells of the bins it could refine (see the module note)."""
    y = np.asarray(y).astype(bool)
    cells = [_first_round(k[y == g], bits0, min_cell) for g in (0, 1)]
    out: list[tuple[np.ndarray, ...]] = []
    own = np.zeros(0, dtype=bool)
    for lo, hi in rounds:
        out = []
        own = _own(cells, lo, hi)
        for g in (0, 1):
            cells[g], released = _refine_label(k[y == g], cells[g], lo, hi, min_cell)
            out.append(released)
    if not out:
        raise ValueError("no refinement round to answer")
    return SiteRelease(*(tuple(o[i] for o in out) for i in range(4)), own)  # type: ignore[arg-type]


def _own(cells: list[KeyCells], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per split bin [lo, hi): is it one of the site's cells (of either label)?"""
    mine = {(int(a), int(b)) for c in cells for a, b in zip(c.lo, c.hi, strict=True)}
    return np.array([(int(a), int(b)) in mine for a, b in zip(lo, hi, strict=True)], dtype=bool)


def _first_round(k: np.ndarray, bits0: np.ndarray, min_cell: int) -> KeyCells:
    index = np.clip(np.searchsorted(bits0, k, side="right") - 1, 0, len(bits0) - 2)
    first, last, count = roc.cells_of(np.bincount(index, minlength=len(bits0) - 1), min_cell)
    return KeyCells.from_grid(first, last, count, bits0)


def _refine_label(k: np.ndarray, cells: KeyCells, lo: np.ndarray, hi: np.ndarray,
                  min_cell: int) -> tuple[KeyCells, tuple[np.ndarray, ...]]:
    """Split each of this label's own single-bin cells that is in the split list; return the
    new cells and the release (split index, first, last, count)."""
    own = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(cells.lo, cells.hi, strict=True))}
    width = sub_width(lo, hi)
    keep = np.ones(len(cells.lo), dtype=bool)
    new: list[tuple[int, int, int]] = []
    released: list[tuple[int, int, int, int]] = []
    for s, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        cell = own.get((a, b))
        if cell is None:
            continue  # no cell of its own here (none, or inside a merged cell)
        inside = k[(k >= a) & (k < b)]
        sub = (inside - a) // width[s]
        first, last, count = sparse_coarsen(sub, min_cell)
        if min_cell > 1 and not _tied_groups(inside, sub, first, last):
            continue  # its sub-cells' bounds would be patients' scores: the cell stays whole
        keep[cell] = False
        for f, la, c in zip(first.tolist(), last.tolist(), count.tolist(), strict=True):
            new.append((a + f * int(width[s]), min(a + (la + 1) * int(width[s]), b), c))
            released.append((s, f, la, c))
    table = np.asarray(new, dtype=np.int64).reshape(-1, 3)
    merged = KeyCells(np.concatenate([cells.lo[keep], table[:, 0]]),
                      np.concatenate([cells.hi[keep], table[:, 1]]),
                      np.concatenate([cells.count[keep], table[:, 2]]))
    order = np.argsort(merged.lo, kind="stable")
    rel = np.asarray(released, dtype=np.int64).reshape(-1, 4)
    return (KeyCells(merged.lo[order], merged.hi[order], merged.count[order]),
            (rel[:, 0], rel[:, 1], rel[:, 2], rel[:, 3]))


def _tied_groups(inside: np.ndarray, sub: np.ndarray, first: np.ndarray,
                 last: np.ndarray) -> bool:
    """Whether every sub-cell holds patients of one score value only. A sub-cell of several
    values has its first and last sub-bin at its lowest and highest patient's score (to
    2⁻³² of the bin): order statistics of real patients. A tie of min_cell_count or more
    patients at one value is theirs together, as a histogram cell's count is."""
    for f, la in zip(first.tolist(), last.tolist(), strict=True):
        group = inside[(sub >= f) & (sub <= la)]
        if f != la or group.min() != group.max():
            return False
    return True


def one_value(k: np.ndarray, lo: np.ndarray, hi: np.ndarray, min_cell: int,
              own: np.ndarray | None = None) -> np.ndarray:
    """Per split bin: 1 when all the site's patients in it share one value, 0 when not,
    −1 (withheld) when it holds fewer than max(min_cell, 1) of them or is not one of the
    site's cells (`own`; `SiteRelease.own`): asked of any key interval, the flag would say
    whether fewer than min_cell_count patients lie in it, and bisection would find them."""
    out = np.full(len(lo), -1, dtype=np.int8)
    for s, (a, b) in enumerate(zip(np.asarray(lo).tolist(), np.asarray(hi).tolist(),
                                   strict=True)):
        if own is not None and not own[s]:
            continue
        inside = k[(k >= a) & (k < b)]
        if len(inside) >= max(min_cell, 1):
            out[s] = int(inside.min() == inside.max())
    return out


# --------------------------------------------------------------------------- server side


def merge(cells: KeyCells, lo: np.ndarray, hi: np.ndarray, split: np.ndarray,
          first: np.ndarray, last: np.ndarray, count: np.ndarray) -> KeyCells:
    """A site's label cells after its release for split bins (lo, hi): each bin it released
    sub-cells of replaces the cell [lo, hi); the counts must add up to that cell's."""
    split, first, last, count = (np.asarray(v, dtype=np.int64) for v in
                                 (split, first, last, count))
    if not len(split):
        return cells
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    width = sub_width(lo, hi)[split]
    new_lo = lo[split] + first * width
    new_hi = np.minimum(lo[split] + (last + 1) * width, hi[split])
    keep = np.ones(len(cells.lo), dtype=bool)
    for s in np.unique(split):
        match = np.flatnonzero((cells.lo == lo[s]) & (cells.hi == hi[s]))
        if len(match) != 1 or cells.count[match[0]] != count[split == s].sum():
            raise ValueError(f"refined cells of bin {s} do not match the site's cell there")
        keep[match[0]] = False
    all_lo = np.concatenate([cells.lo[keep], new_lo])
    order = np.argsort(all_lo, kind="stable")
    return KeyCells(all_lo[order], np.concatenate([cells.hi[keep], new_hi])[order],
                    np.concatenate([cells.count[keep], count])[order])


def refined_edges(base: np.ndarray, cells: list[KeyCells]) -> np.ndarray:
    """Keys of the refined grid: the first-round grid's and every cell bound."""
    parts = [np.asarray(base, dtype=np.int64)]
    parts += [c.lo for c in cells] + [c.hi for c in cells]
    return np.unique(np.concatenate(parts))


def coverage(cells: list[tuple[np.ndarray, np.ndarray, np.ndarray]], bins: int) -> np.ndarray:
    """Per bin of the refined grid, how many non-empty cells (first … last) cover it."""
    diff = np.zeros(bins + 1, dtype=np.int64)
    for first, last, count in cells:
        nonzero = np.asarray(count) > 0
        np.add.at(diff, np.asarray(first)[nonzero], 1)
        np.add.at(diff, np.asarray(last)[nonzero] + 1, -1)
    return np.cumsum(diff)[:-1]


@dataclass(frozen=True)
class SitePart:
    """One site's cells of one (model, group) on the refined grid keys, and the bins it
    flagged as holding one value (key intervals)."""

    cells: tuple[KeyCells, KeyCells]  # label 0, label 1
    flagged: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))


def proven(bits: np.ndarray, parts: list[SitePart]) -> np.ndarray:
    """Per refined bin: is it proven to hold one score value over these sites' patients?
    Atomic, or a single site holds patients there and flagged an enclosing bin."""
    bins = len(bits) - 1
    atomic = np.diff(bits) == 1
    holders = np.zeros(bins, dtype=np.int64)
    flagged_by_holder = np.zeros(bins, dtype=bool)
    for part in parts:
        held = coverage([c.on(bits) for c in part.cells], bins) > 0
        holders += held
        lo, hi = part.flagged
        inside = np.zeros(bins + 1, dtype=np.int64)
        np.add.at(inside, np.searchsorted(bits, lo), 1)
        np.add.at(inside, np.searchsorted(bits, hi), -1)
        flagged_by_holder |= held & (np.cumsum(inside)[:-1] > 0)
    return atomic | ((holders == 1) & flagged_by_holder)


def mixed(bits: np.ndarray, parts: list[SitePart]) -> np.ndarray:
    """Per refined bin: covered by cells of both labels (pooled over the parts)."""
    bins = len(bits) - 1
    cover = [coverage([p.cells[g].on(bits) for p in parts], bins) for g in (0, 1)]
    return (cover[0] > 0) & (cover[1] > 0)


def is_exact(bits: np.ndarray, parts: list[SitePart]) -> bool:
    """True when every mixed bin is a single-bin cell at every site and proven
    single-valued: the histogram statistics then equal those of the raw scores."""
    mix = mixed(bits, parts)
    if not mix.any():
        return True
    if not np.all(proven(bits, parts)[mix]):
        return False
    for part in parts:
        for cells in part.cells:
            first, last, count = cells.on(bits)
            wide = (last > first) & (np.asarray(count) > 0)
            for f, la in zip(first[wide], last[wide], strict=True):
                if mix[f:la + 1].any():
                    return False
    return True


def splittable(bits: np.ndarray, parts: list[SitePart]) -> np.ndarray:
    """Per refined bin: worth splitting — mixed, not proven, and a cell of its own at some
    site (a bin inside merged cells only, no site can refine)."""
    own = np.zeros(len(bits) - 1, dtype=bool)
    for part in parts:
        for cells in part.cells:
            first, last, count = cells.on(bits)
            own[first[(first == last) & (np.asarray(count) > 0)]] = True
    return mixed(bits, parts) & ~proven(bits, parts) & own


def to_split(bits: np.ndarray, parts: list[SitePart]) -> tuple[np.ndarray, np.ndarray]:
    """The next round's split list (key bounds of the `splittable` bins)."""
    index = np.flatnonzero(splittable(bits, parts))
    return bits[index], bits[index + 1]


def auc_bound(bits: np.ndarray, parts: list[SitePart]) -> tuple[float, float]:
    """Bounds of the raw-score AUC (Mann–Whitney, ties ½): a pair is known when its cells
    do not overlap, or both lie in one proven single-valued bin (a tie, ½); every other
    pair may fall either way."""
    cells = [[p.cells[g].on(bits) for p in parts] for g in (0, 1)]
    a0, b0, n0 = (np.concatenate(v).astype(float) for v in zip(*cells[0], strict=True))
    a1, b1, n1 = (np.concatenate(v).astype(float) for v in zip(*cells[1], strict=True))
    b0, b1 = b0 + 1, b1 + 1
    total = n0.sum() * n1.sum()
    if total == 0:
        return float("nan"), float("nan")
    pairs = np.outer(n1, n0)
    proof = proven(bits, parts)
    single = (b1[:, None] - a1[:, None] == 1) & (a1[:, None] == a0[None, :]) & (
        b1[:, None] == b0[None, :])
    tie = single & proof[np.minimum(a1, len(proof) - 1).astype(int)][:, None]
    concordant = a1[:, None] >= b0[None, :]
    discordant = b1[:, None] <= a0[None, :]
    unknown = ~(concordant | discordant | tie)
    lower = np.sum(pairs * (concordant + 0.5 * tie)) / total
    upper = np.sum(pairs * (concordant + 0.5 * tie + unknown)) / total
    return float(lower), float(upper)


def no_mixed_bins(negatives: list[roc.Cells], positives: list[roc.Cells]) -> bool:
    """True when no grid bin is covered by cells of both labels (cells as `roc.coarsen`
    gives them, over all sites): the histogram AUC is then exact on the raw scores without
    refinement (every pair is ordered by its bins)."""
    last = [np.asarray(c[1]) for c in negatives + positives if len(c[1])]
    if not last:
        return True
    bins = int(max(v.max() for v in last)) + 1
    cover = [coverage(cells, bins) for cells in (negatives, positives)]
    return not np.any((cover[0] > 0) & (cover[1] > 0))
