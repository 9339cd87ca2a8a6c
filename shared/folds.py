"""Stratified k-fold assignment per patient, made at each site from the study seed.

Nothing crosses the wire: each site draws its own patients' folds from (seed, site id), so
the server never sees a patient list. Within a site every class is spread over the folds
round-robin after a seeded shuffle, continuing the rotation from class to class, so per
class and overall the fold sizes at a site differ by at most one. The rotation starts at a
seeded fold per site, so the sites' leftover patients land in different folds: pooled folds
are approximately stratified — per class, fold sizes differ by at most the number of sites,
and usually by less.
"""

from __future__ import annotations

import hashlib

import numpy as np


def stratified_folds(y: np.ndarray, n_folds: int, seed: int, site_id: str = "") -> np.ndarray:
    """Fold number (0..n_folds−1) for each of a site's patients, stratified by label."""
    if n_folds < 2:
        raise ValueError("need at least 2 folds")
    y = np.asarray(y)
    rng = np.random.default_rng([seed, _site_key(site_id)])
    folds = np.empty(len(y), dtype=np.int64)
    position = int(rng.integers(n_folds))
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        folds[members] = (position + np.arange(len(members))) % n_folds
        position = (position + len(members)) % n_folds
    return folds


def site_fold_count(n: int, n_folds: int, min_size: int) -> int:
    """How many of the study's folds a site of n patients uses so that each held-out fold
    holds ≥ min_size patients: fit on all rows and on all but one fold are then two sets
    that differ by ≥ min_size patients (`shared.disclosure`). Fold sizes at a site differ by
    at most one, so that is ⌊n / min_size⌋ folds, and never fewer than 2: a site of fewer
    than 2·min_size patients has folds its ledger refuses to fit without (the stage says
    so), as no split of it can be fitted on safely."""
    return max(2, min(int(n_folds), int(n) // max(1, int(min_size))))


def site_folds(y: np.ndarray, n_folds: int, seed: int, site_id: str,
               min_size: int) -> tuple[np.ndarray, int]:
    """(fold of each patient, folds used): `stratified_folds` over the site's
    `site_fold_count` folds; the study's other folds hold none of this site's patients."""
    k = site_fold_count(len(y), n_folds, min_size)
    return stratified_folds(y, k, seed, site_id), k


def _site_key(site_id: str) -> int:
    """A stable integer from the site id (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.sha256(site_id.encode()).digest()[:8], "little")
