"""A site's state while it serves a run: its loaded folder and its egress guard.

Loading is cached per (folder, task) in the ClientApp process, so a stage with several
rounds reads the folder once, and on the site's disk (`<site>/cache/session/`, keyed by the
folder's stamp and the loader's code), so a fresh ClientApp process — one per message on a
deployment — does not read and check every table and image header again. Reasons that name
patients, and the notes of what loading did (levels normalized, a mask resampled), are
written only to the site's own log, `<site>/audit/site.log`; the server is told counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from client.egress.guard import EgressGuard
from client.egress.ledger import LEDGER_FILE, DisclosureLedger
from client.site.folder import (
    CLINICAL_CSV,
    FEATURES_CSV,
    IMAGES_DIR,
    PREDICTIONS_CSV,
    SITE_YAML,
    Site,
    load_site,
)
from shared.labels import task_label

SESSION_CACHE = ("cache", "session")
SESSION_CACHE_KEEP = 32  # newest loaded folders kept on disk
LOADER_MODULES = ("client.site.folder", "client.site.inspection", "client.site.messages",
                  "client.site.config", "client.site.values", "client.site.clinical",
                  "client.site.images", "client.site.image_pair", "client.site.nifti",
                  "client.site.dicom",
                  "shared.labels", "shared.policy")
AUDIT_DIR = "audit"
EGRESS_LOG = "egress.jsonl"
SITE_LOG = "site.log"


@dataclass
class SiteSession:
    site: Site
    guard: EgressGuard
    task: str | None  # None: the query needs no task label
    cache: dict[str, Any] = field(default_factory=dict)  # a stage's working data, per process

    @property
    def site_id(self) -> str:
        return self.site.config.site_id

    def labels(self) -> np.ndarray:
        """The task label (0/1) of every included patient, in `site.clinical` order."""
        if self.task is None:
            raise ValueError("this query names no task, so the site has no task label")
        rows = self.site.clinical
        label = rows["label"] if "label" in rows else [None] * len(rows)
        return np.array(
            [task_label(self.task, ihc, ish, lab) for ihc, ish, lab in
             zip(rows.get("her2_ihc", label), rows.get("her2_ish", label), label, strict=True)],
            dtype=np.int64,
        )


    def log_exclusion(self, patient: str, reason: str) -> None:
        """Note a patient left out of a stage, in the site's own log (never sent)."""
        _site_log(self.site, self.site.root / AUDIT_DIR / SITE_LOG,
                  [f"excluded patient {patient}: {reason}"])


def open_session(root: str, task: str | None,
                 needs: tuple[str, ...] = ("clinical",)) -> SiteSession:
    """Load the site folder for `task` (None: no task label) and the inputs a stage `needs`
    (see `client.site.folder.NEEDS`) and build its guard; cached per process while the folder's
    files are unchanged (`folder_stamp`), so an edited site folder is read again."""
    return _open_session(root, task, needs, folder_stamp(Path(root)))


def folder_stamp(root: Path) -> tuple:
    """Size and mtime of the site's tables and of every image file: cheap (a stat per
    file, no read), and it moves whenever one is edited, added or removed."""
    tables = [root / n for n in (SITE_YAML, CLINICAL_CSV, FEATURES_CSV, PREDICTIONS_CSV)]
    images = root / IMAGES_DIR
    files = tables + (sorted(images.rglob("*")) if images.is_dir() else [])
    return tuple((str(p.relative_to(root)), s.st_size, s.st_mtime_ns) for p in files
                 if (s := _stat(p)) is not None)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def clear_sessions() -> None:
    """Forget every cached site session of this process."""
    _open_session.cache_clear()


@lru_cache(maxsize=16)
def _open_session(root: str, task: str | None, needs: tuple[str, ...],
                  stamp: tuple) -> SiteSession:
    site = _stored_site(Path(root), task, needs, stamp)
    patient_ids = frozenset(map(str, site.clinical.index)) | frozenset(site.excluded)
    audit = Path(root) / AUDIT_DIR
    policy = site.config.privacy
    guard = EgressGuard(site.config.site_id, policy, patient_ids, audit / EGRESS_LOG,
                        DisclosureLedger(audit / LEDGER_FILE, policy.difference))
    _log_loading(site, audit / SITE_LOG)
    return SiteSession(site=site, guard=guard, task=task)


def _stored_site(root: Path, task: str | None, needs: tuple[str, ...], stamp: tuple) -> Site:
    """`load_site`, or the Site this folder gave last time with the same stamp, task, needs
    and loader code. The pickle is the site's own, in its own folder, written by this
    ClientApp: whoever can write it could as well edit the site's tables. A folder that
    cannot be written is loaded every time."""
    key = json.dumps([_loader_code(), task, list(needs), [list(s) for s in stamp]])
    folder = root.joinpath(*SESSION_CACHE)
    path = folder / f"{hashlib.sha256(key.encode()).hexdigest()}.pkl"
    try:
        with path.open("rb") as stored:
            site = pickle.load(stored)
        if isinstance(site, Site) and site.root == root:
            return site
    except (OSError, pickle.PickleError, EOFError, AttributeError, ImportError, TypeError):
        pass
    site = load_site(root, task=task, needs=needs)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(pickle.dumps(site, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(partial, path)
        for old in sorted(folder.glob("*.pkl"), key=lambda p: p.stat().st_mtime)[
                :-SESSION_CACHE_KEEP]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
    return site


@lru_cache(maxsize=1)
def _loader_code() -> str:
    """sha256 of the code that turns a folder into a Site: a changed loader reloads."""
    digest = hashlib.sha256()
    for name in LOADER_MODULES:
        source = getattr(sys.modules.get(name), "__file__", None)
        if source:
            digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def _log_loading(site: Site, path: Path) -> None:
    """Write every exclusion, with its patient, and every note of what loading did (levels
    normalized, a mask resampled, …; as check-site words them) to the site's own log (never
    sent)."""
    lines = [f"loaded {site.root}: {len(site.clinical)} patients included, "
             f"{len(site.excluded)} excluded"]
    lines += [f"excluded patient {p}: {r}" for p, r in sorted(site.excluded.items())]
    lines += [note.as_note() for note in site.notes]
    _site_log(site, path, lines)


def _site_log(site: Site, path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"feddlr.site.{site.config.site_id}")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        for line in lines:
            logger.info("%s", line)
    finally:
        logger.removeHandler(handler)
        handler.close()
