"""Handshake: who the site is and how many patients it can serve, with small cells hidden."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np

from client.egress.guard import Statistic, suppress_small
from client.site.session import SiteSession
from shared.labels import POSITIVE_NOT_IN_LOW
from shared.schema import SCHEMA_VERSION, Payload


def handshake(session: SiteSession, query: Payload) -> list[Statistic]:
    """Identity, roles, versions and suppressed counts.

    Crosses the wire: site id, roles, time unit, software and schema versions, a hash of the
    site's files (provenance), and counts of included/excluded patients and of each label,
    each count in 1 … min_cell_count−1 replaced by −1 (small-cell suppression). A handshake
    without a task (no stage of the study needs the label) sends no label counts.
    """
    site, policy = session.site, session.site.config.privacy
    labels = session.labels() if session.task is not None else None
    label_counts = np.array([suppress_small(int(np.sum(labels == g)), policy) for g in (0, 1)]
                            if labels is not None else [], dtype=np.int64)
    identity = {
        "site_id": site.config.site_id,
        "roles": list(site.config.roles),
        "time_unit": site.config.time_unit,
        "schema_version": SCHEMA_VERSION,
        "feddlr_version": _version("feddlr"),
        "flwr_version": _version("flwr"),
        "data_sha256": data_hash(site.root),
    }
    counts = {
        "n_patients": np.array([suppress_small(len(site.clinical), policy)], dtype=np.int64),
        "n_excluded": np.array([suppress_small(n_excluded(session), policy)], dtype=np.int64),
        "label_counts": label_counts.astype(np.int64),
    }
    return [
        Statistic("site", identity, n=None),
        Statistic("counts", counts, n=None, counts=tuple(counts)),
    ]


def n_excluded(session: SiteSession) -> int:
    """Patients left out for bad data or an equivocal label; patients who are simply outside
    the task's population (HER2-positive in the her2-low task) are not counted."""
    return sum(reason != POSITIVE_NOT_IN_LOW for reason in session.site.excluded.values())


def data_hash(root: Path) -> str:
    """sha256 over the site's tabular files and image file names, sizes and mtimes."""
    digest = hashlib.sha256()
    for name in ("clinical.csv", "features.csv", "predictions.csv", "site.yaml"):
        path = root / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    images = root / "images"
    if images.is_dir():
        for path in sorted(p for p in images.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}:{stat.st_size}".encode())
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
