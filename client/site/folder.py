"""Load and validate a hospital's site folder (docs/SITE.md).

Every bad input becomes a `Problem` naming the site, the file (relative to the site folder),
the patient when there is one, and what is wrong. Two kinds of problem:

- site-level: the site cannot serve at all (site.yaml missing or invalid, clinical.csv
  missing or unreadable, a required column wholly missing, features.csv/predictions.csv
  missing or with bad columns when needed). `load_site` raises `SiteError` for these.
- patient-level: the patient is put in `Site.excluded` with the reason, and the other
  patients go on. A patient is never silently dropped.

A required column that is wholly missing is a site-level problem naming the column; a
missing or bad *value* in it excludes that patient only. What loading did that is not a
problem (clinical.csv's levels normalized, a mask resampled from another grid, a column
read as missing) is a note, in `Site.notes` and `SiteCheck.notes`.

`load_site(needs=...)` checks only what the stages to run need; `check_site` checks
everything the folder holds (reading every image in full) and never raises for data errors.

This module holds the public types and API; the pass over the folder that finds the problems,
exclusions and notes is `client.site.inspection.SiteInspection` (site.yaml's keys and parsing
are in `client.site.config`, the row values in `client.site.values`, the image checks in
`client.site.images`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from client.site.config import ROLES, SITE_ID_PATTERN, SITE_YAML, TIME_UNITS, SiteConfig
from client.site.images import IMAGE_NAMES, IMAGES_DIR, find_image
from client.site.inspection import (
    CLINICAL_CSV,
    FEATURES_CSV,
    PREDICTIONS_CSV,
    SiteInspection,
    parse_site_yaml,
)
from client.site.messages import Problem
from client.site.values import typed_clinical
from shared.labels import check_task

# what a stage can need of a site folder; `label` = the task label's columns (a survival-only or
# cohort-without-label query does not need them)
NEEDS = ("clinical", "label", "survival", "mri", "mri_r2", "us", "features", "predictions")


# --------------------------------------------------------------------------- public types


class SiteError(Exception):
    """The site cannot serve at all; `.problems` lists every site-level problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass
class Site:
    """A validated site folder: usable patients in `clinical`, the rest in `excluded`."""

    root: Path
    config: SiteConfig
    clinical: pd.DataFrame  # valid rows, index = patient_id (str); `target` when task given
    excluded: dict[str, str]  # patient_id -> reason
    problems: list[Problem]
    task: str | None = None
    needs: tuple[str, ...] = ("clinical",)
    features: pd.DataFrame | None = None  # index = patient_id, float columns (needs features)
    predictions: pd.DataFrame | None = None  # patient_id, model, score (needs predictions)
    # what loading did that is not a problem (levels normalized, a mask resampled, …); the
    # session writes them to the site's own log beside the exclusions
    notes: list[Problem] = field(default_factory=list)

    @property
    def site_id(self) -> str:
        return self.config.site_id

    @property
    def n_patients(self) -> int:
        return len(self.clinical)

    @property
    def n_excluded(self) -> int:
        return len(self.excluded)

    def image_paths(self, patient_id: str) -> dict[str, Path]:
        """The image files found for a usable patient, keyed by mri, mri_mask, mri_mask_r2,
        us, us_mask (an MRI DICOM series is its folder). KeyError for unknown patients."""
        if patient_id not in self.clinical.index:
            raise KeyError(f"{patient_id!r} is not a usable patient of {self.site_id}")
        folder = self.root / IMAGES_DIR / patient_id
        found = {kind: find_image(folder, kind) for kind in IMAGE_NAMES}
        return {kind: path for kind, path in found.items() if path is not None}


@dataclass
class SiteCheck:
    """What `inspect_site` found: every problem, and the patients left for the task."""

    site: str
    config: SiteConfig | None
    problems: list[Problem]
    n_patients: int  # usable patients (not excluded)
    excluded: dict[str, str]  # every excluded patient -> reason
    not_in_task: dict[str, str]  # the excluded ones that are valid but outside the task
    notes: list[Problem] = field(default_factory=list)  # e.g. a mask resampled (not problems)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def problem_patients(self) -> set[str]:
        return {p.patient for p in self.problems if p.patient is not None}


# --------------------------------------------------------------------------- public API


def read_site_config(root: Path) -> SiteConfig:
    """site.yaml as a SiteConfig; SiteError listing every problem in it."""
    root = Path(root)
    config, problems = parse_site_yaml(root, root.name)
    if config is None:
        raise SiteError(problems)
    return config


OPTIONAL_FILES = {"predictions": PREDICTIONS_CSV, "features": FEATURES_CSV}


def present_needs(root: Path, asked: Iterable[str]) -> tuple[str, ...]:
    """The needs to load of `asked`: each as it is, and a `<need>?` (an optional input, e.g.
    `predictions?`) only where the site has its file."""
    needs: list[str] = []
    for need in asked:
        name = need.rstrip("?")
        if need.endswith("?") and not (root / OPTIONAL_FILES.get(name, "")).is_file():
            continue
        if name not in needs:
            needs.append(name)
    return tuple(needs)


def load_site(
    root: Path,
    *,
    task: str | None = None,
    needs: Iterable[str] = ("clinical",),
    full_read: bool = False,
) -> Site:
    """Load a site for stages that need `needs`; bad patients are excluded, not raised.

    With `full_read=False` the main images are checked from their headers only (plus a cheap
    completeness check of NIfTI files); masks are always read to check they are non-empty.
    """
    needs = _check_needs(needs)
    if task is not None:  # a task's label is always needed; without one, only if asked
        check_task(task)
        needs = _check_needs((*needs, "label"))
    inspection = SiteInspection(Path(root), task, needs, full_read=full_read,
                                stop_on_fatal=True)
    inspection.run()
    if inspection.fatal:
        raise SiteError(inspection.fatal)
    return _loaded(inspection)


def check_site(root: Path, *, task: str | None = None) -> list[Problem]:
    """Every problem in the site folder at once (images read in full); never raises for data."""
    return inspect_site(root, task=task).problems


def inspect_site(root: Path, *, task: str | None = None,
                 needs: Iterable[str] | None = None) -> SiteCheck:
    """Check everything the folder holds (or only what `needs` names, e.g. the stages a
    study will run), as `check_site`, with the patient counts."""
    if task is not None:
        check_task(task)
    if needs is not None:
        needs = _check_needs((*needs, "label") if task is not None else needs)
    inspection = SiteInspection(Path(root), task, needs, full_read=True, stop_on_fatal=False)
    inspection.run()
    return _checked(inspection)


# --------------------------------------------------------------------------- results


def _loaded(inspection: SiteInspection) -> Site:
    """The Site of a pass that found no site-level problem: its usable patients' rows."""
    assert inspection.config is not None and inspection.raw is not None
    usable = inspection.usable_ids()
    clinical = typed_clinical(inspection.raw, usable, inspection.numeric)
    if inspection.task is not None and "label" in inspection.needs:
        clinical["target"] = [inspection.targets[p] for p in usable]
    features = inspection.features.loc[usable] if inspection.features is not None else None
    predictions = None
    if inspection.predictions is not None:
        predictions = inspection.predictions[inspection.predictions.patient_id.isin(usable)]
        predictions = predictions.reset_index(drop=True)
    return Site(
        root=inspection.root,
        config=inspection.config,
        clinical=clinical,
        excluded=inspection.excluded(),
        problems=list(inspection.problems),
        task=inspection.task,
        needs=inspection.needs,
        features=features,
        predictions=predictions,
        notes=inspection.notes(),
    )


def _checked(inspection: SiteInspection) -> SiteCheck:
    return SiteCheck(
        site=inspection.label,
        config=inspection.config,
        problems=list(inspection.problems),
        n_patients=len(inspection.usable_ids()),
        excluded=inspection.excluded(),
        not_in_task=dict(inspection.not_in_task),
        notes=inspection.notes(),
    )


def _check_needs(needs: Iterable[str]) -> tuple[str, ...]:
    needs = tuple(dict.fromkeys(needs))
    unknown = [need for need in needs if need not in NEEDS]
    if unknown:
        raise ValueError(f"unknown need(s) {unknown}; known: {', '.join(NEEDS)}")
    if "mri_r2" in needs and "mri" not in needs:
        needs += ("mri",)
    return needs


__all__ = [
    "CLINICAL_CSV",
    "FEATURES_CSV",
    "IMAGES_DIR",
    "NEEDS",
    "PREDICTIONS_CSV",
    "ROLES",
    "SITE_ID_PATTERN",
    "SITE_YAML",
    "TIME_UNITS",
    "Problem",
    "Site",
    "SiteCheck",
    "SiteConfig",
    "SiteError",
    "check_site",
    "inspect_site",
    "load_site",
    "read_site_config",
]
