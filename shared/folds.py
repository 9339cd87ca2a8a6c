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


def _site_key(site_id: str) -> int:
    """A stable integer from the site id (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.sha256(site_id.encode()).digest()[:8], "little")
