"""Load and validate a hospital's site folder (see DESIGN.md, "Site folder").

Every bad input becomes a `Problem` naming the site, the file (relative to the site folder),
the patient when there is one, and what is wrong. Two kinds of problem:

- site-level: the site cannot serve at all (site.yaml missing or invalid, clinical.csv
  missing or unreadable, a required column wholly missing, features.csv/predictions.csv
  missing or with bad columns when needed). `load_site` raises `SiteError` for these.
- patient-level: the patient is put in `Site.excluded` with the reason, and the other
  patients go on. A patient is never silently dropped.

A required column that is wholly missing is a site-level problem naming the column; a
missing or bad *value* in it excludes that patient only.

`load_site(needs=...)` checks only what the stages to run need; `check_site` checks
everything the folder holds (reading every image in full) and never raises for data errors.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml

from shared.labels import (
    TASK_COLUMNS,
    LabelError,
    check_task,
    is_missing,
    parse_binary_label,
    parse_ihc,
    parse_ish,
    task_label,
)
from shared.policy import PolicyError, PrivacyPolicy

# what a stage can need of a site folder; `label` = the task label's columns (a survival-only or
# cohort-without-label query does not need them)
NEEDS = ("clinical", "label", "survival", "mri", "mri_r2", "us", "features", "predictions")
ROLES = ("train", "external", "survival")
TIME_UNITS = ("days", "months", "years")
FREE_FORM_KEYS = ("scanner", "description", "contact")
CONFIG_KEYS = ("site_id", "roles", "time_unit", "privacy", *FREE_FORM_KEYS)
SITE_ID_PATTERN = re.compile(r"^[a-z0-9-]+$")

SITE_YAML = "site.yaml"
CLINICAL_CSV = "clinical.csv"
FEATURES_CSV = "features.csv"
PREDICTIONS_CSV = "predictions.csv"
IMAGES_DIR = "images"
SURVIVAL_COLUMNS = ("dfs_time", "dfs_event")
PREDICTION_COLUMNS = ("patient_id", "model", "score")

# Candidate file names per image kind, in the order they are looked for. "mri" as a folder
# is a DICOM series.
IMAGE_NAMES: dict[str, tuple[str, ...]] = {
    "mri": ("mri.nii.gz", "mri.nii", "mri.nrrd", "mri"),
    "mri_mask": ("mri_mask.nii.gz", "mri_mask.nii", "mri_mask.nrrd"),
    "mri_mask_r2": ("mri_mask_r2.nii.gz", "mri_mask_r2.nii", "mri_mask_r2.nrrd"),
    "us": ("us.png", "us.nii.gz", "us.nii", "us.nrrd"),
    "us_mask": ("us_mask.png", "us_mask.nii.gz", "us_mask.nii", "us_mask.nrrd"),
}
GEOMETRY_TOLERANCE = 1e-4  # relative; also absolute for values near zero


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class Problem:
    """One problem with a site folder, always naming where it is."""

    site: str
    file: str
    patient: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.site}: {self.file}: "
        if self.patient is not None:
            where += f"patient {self.patient}: "
        return where + self.message


class SiteError(Exception):
    """The site cannot serve at all; `.problems` lists every site-level problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    roles: tuple[str, ...]
    time_unit: str
    privacy: PrivacyPolicy


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
        found = {kind: _find_image(folder, kind) for kind in IMAGE_NAMES}
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
    config, problems = _parse_config(root, root.name)
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
    inspection = _Inspection(Path(root), task, needs, full_read=full_read, stop_on_fatal=True)
    inspection.run()
    if inspection.fatal:
        raise SiteError(inspection.fatal)
    return inspection.site()


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
    inspection = _Inspection(Path(root), task, needs, full_read=True, stop_on_fatal=False)
    inspection.run()
    return inspection.summary()


# --------------------------------------------------------------------------- site.yaml

_Report = Callable[[str], None]  # records one problem message


def _parse_config(root: Path, label: str) -> tuple[SiteConfig | None, list[Problem]]:
    problems: list[Problem] = []

    def problem(message: str) -> None:
        problems.append(Problem(label, SITE_YAML, None, message))

    path = root / SITE_YAML
    if not path.is_file():
        problem("missing (every site folder needs site.yaml)")
        return None, problems
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        problem(f"cannot parse YAML: {_one_line(error)}")
        return None, problems
    if not isinstance(raw, dict):
        problem("must be a mapping with site_id, roles, time_unit and privacy")
        return None, problems

    for key in sorted(set(map(str, raw)) - set(CONFIG_KEYS)):
        problem(f"unknown key {key!r}; known: {', '.join(CONFIG_KEYS)}")
    site_id = _config_site_id(raw.get("site_id"), problem)
    roles = _config_roles(raw.get("roles"), problem)
    time_unit = _config_time_unit(raw.get("time_unit"), problem)
    privacy = _config_privacy(raw.get("privacy"), problem)
    if problems or site_id is None or roles is None or time_unit is None or privacy is None:
        return None, problems
    return SiteConfig(site_id, roles, time_unit, privacy), problems


def _config_site_id(value: Any, problem: _Report) -> str | None:
    if value is None:
        problem("site_id is missing")
    elif not isinstance(value, str) or not SITE_ID_PATTERN.match(value):
        problem(f"site_id {value!r} must match {SITE_ID_PATTERN.pattern} (lowercase, digits, -)")
    else:
        return value
    return None


def _config_roles(value: Any, problem: _Report) -> tuple[str, ...] | None:
    if value is None:
        problem(f"roles is missing (a list of any of: {', '.join(ROLES)})")
        return None
    if not isinstance(value, list) or not value:
        problem(f"roles must be a non-empty list, e.g. [train]; got {value!r}")
        return None
    unknown = [role for role in value if role not in ROLES]
    if unknown:
        problem(f"unknown role(s) {unknown}; known: {', '.join(ROLES)}")
        return None
    if "train" in value and "external" in value:
        problem("roles cannot hold both train and external (external sites are never fitted on)")
        return None
    return tuple(dict.fromkeys(value))


def _config_time_unit(value: Any, problem: _Report) -> str | None:
    if value not in TIME_UNITS:
        shown = "is missing" if value is None else f"{value!r} is not allowed"
        problem(f"time_unit {shown}; one of: {', '.join(TIME_UNITS)}")
        return None
    return value


def _config_privacy(value: Any, problem: _Report) -> PrivacyPolicy | None:
    if value is not None and not isinstance(value, dict):
        problem(f"privacy must be a mapping; got {value!r}")
        return None
    try:
        return PrivacyPolicy.from_mapping(value)
    except (PolicyError, TypeError) as error:
        problem(f"privacy: {error}")
        return None


# --------------------------------------------------------------------------- inspection


class _Inspection:
    """One pass over a site folder, collecting problems and exclusions.

    `needs=None` means check mode: check whatever the folder holds.
    """

    def __init__(
        self,
        root: Path,
        task: str | None,
        needs: tuple[str, ...] | None,
        *,
        full_read: bool,
        stop_on_fatal: bool,
    ) -> None:
        self.root = root
        self.task = task
        self.needs: tuple[str, ...] = ("clinical",) if needs is None else needs
        self.auto_needs = needs is None
        self.full_read = full_read
        self.stop_on_fatal = stop_on_fatal
        self.label = root.name
        self.config: SiteConfig | None = None
        self.problems: list[Problem] = []
        self.fatal: list[Problem] = []
        self.reasons: dict[str, list[str]] = {}
        self.not_in_task: dict[str, str] = {}
        self.raw: pd.DataFrame | None = None
        self.ids: list[str] = []  # unique, non-empty patient ids in file order
        self.targets: dict[str, int] = {}
        self.features: pd.DataFrame | None = None
        self.predictions: pd.DataFrame | None = None

    # -- recording

    def site_problem(self, file: str, message: str) -> None:
        problem = Problem(self.label, file, None, message)
        self.problems.append(problem)
        self.fatal.append(problem)

    def note(self, file: str, message: str) -> None:
        """A site-level problem that does not stop the site from serving."""
        self.problems.append(Problem(self.label, file, None, message))

    def patient_problem(
        self, patient: str, file: str, message: str, *, exclude: bool = True
    ) -> None:
        self.problems.append(Problem(self.label, file, patient, message))
        if exclude:
            self.reasons.setdefault(patient, []).append(f"{file}: {message}")

    # -- the pass

    def run(self) -> None:
        if not self.root.is_dir():
            self.site_problem(".", f"site folder {self.root} does not exist")
            return
        self.config, config_problems = _parse_config(self.root, self.label)
        if self.config is not None:
            self.label = self.config.site_id
        self.problems += config_problems
        self.fatal += config_problems
        self.raw = self._read_table(CLINICAL_CSV)
        if self.raw is None:
            return
        if self.auto_needs:
            self.needs = self._present_needs()
        self._check_columns()
        if "patient_id" not in self.raw.columns or (self.fatal and self.stop_on_fatal):
            return
        self._check_ids()
        self._check_rows()
        self._check_images()
        self._check_features()
        self._check_predictions()
        self._apply_task()

    def _present_needs(self) -> tuple[str, ...]:
        assert self.raw is not None
        needs = ["clinical", "label"]
        if any(column in self.raw.columns for column in SURVIVAL_COLUMNS):
            needs.append("survival")
        images = self.root / IMAGES_DIR
        folders = [p for p in images.iterdir() if p.is_dir()] if images.is_dir() else []
        for need, kind in (("mri", "mri"), ("mri_r2", "mri_mask_r2"), ("us", "us")):
            if any(_find_image(folder, kind) for folder in folders):
                needs.append(need)
        if "mri_r2" in needs and "mri" not in needs:
            needs.append("mri")
        for need, name in (("features", FEATURES_CSV), ("predictions", PREDICTIONS_CSV)):
            if (self.root / name).exists():
                needs.append(need)
        return tuple(needs)

    def _read_table(self, name: str) -> pd.DataFrame | None:
        """A CSV as stripped text; a site-level problem (and None) if it cannot be read."""
        path = self.root / name
        if not path.is_file():
            self.site_problem(name, "missing")
            return None
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            self.site_problem(name, f"cannot read CSV: {_one_line(error)}")
            return None
        table.columns = [str(column).strip() for column in table.columns]
        return table.apply(lambda column: column.str.strip())

    def _required_columns(self) -> dict[str, str]:
        """Required clinical.csv columns -> why they are needed."""
        assert self.raw is not None
        required = {"patient_id": "every site"}
        why = f"task {self.task}" if self.task else "labels"
        required |= {column: why for column in self._label_columns()}
        if "survival" in self.needs:
            required |= {column: "survival" for column in SURVIVAL_COLUMNS}
        return required

    def _check_columns(self) -> None:
        assert self.raw is not None
        for column, why in self._required_columns().items():
            if column not in self.raw.columns:
                self.site_problem(CLINICAL_CSV, f"missing column {column!r} (needed for {why})")

    def _check_ids(self) -> None:
        assert self.raw is not None
        ids = self.raw["patient_id"]
        counts = Counter(ids)
        for row, patient in enumerate(ids):
            line = row + 2  # 1-based, after the header line
            if patient == "":
                message = f"line {line}: patient_id is empty; the row is excluded"
                self.problems.append(Problem(self.label, CLINICAL_CSV, None, message))
                self.reasons.setdefault(f"<line {line}>", []).append(message)
            elif not _safe_id(patient):
                self.patient_problem(
                    patient, CLINICAL_CSV, "patient_id must not contain '/', '\\' or be '.'/'..'"
                )
        for patient, count in counts.items():
            if patient and count > 1:
                lines = [str(i + 2) for i, p in enumerate(ids) if p == patient]
                self.patient_problem(
                    patient,
                    CLINICAL_CSV,
                    f"duplicate patient_id on {count} rows (lines {', '.join(lines)}); "
                    "all are excluded",
                )
        self.ids = [p for p in dict.fromkeys(ids) if p]

    def _rows(self) -> Iterable[tuple[str, pd.Series]]:
        """(patient_id, row) for each row with a non-empty id (first row of a duplicate)."""
        assert self.raw is not None
        seen: set[str] = set()
        for _, row in self.raw.iterrows():
            patient = row["patient_id"]
            if patient and patient not in seen:
                seen.add(patient)
                yield patient, row

    def _check_rows(self) -> None:
        assert self.raw is not None
        parsers = {column: _LABEL_PARSERS[column] for column in self._label_columns()}
        parsers = {c: parse for c, parse in parsers.items() if c in self.raw.columns}
        for patient, row in self._rows():
            for column, parse in parsers.items():
                try:
                    parse(row[column])
                except LabelError as error:
                    self.patient_problem(patient, CLINICAL_CSV, str(error))
            if "survival" in self.needs:
                for message in _survival_problems(row):
                    self.patient_problem(patient, CLINICAL_CSV, message)

    def _label_columns(self) -> tuple[str, ...]:
        """The label columns required and validated where the stage needs the label: the
        task's, or (no task: a site check) the HER2 pair unless the file has only `label`,
        plus `label` if present. A query that needs no label reads none of them."""
        assert self.raw is not None
        if "label" not in self.needs:
            return ()
        if self.task is not None:
            return TASK_COLUMNS[self.task]
        present = set(self.raw.columns)
        columns: tuple[str, ...] = ()
        if present & {"her2_ihc", "her2_ish"} or "label" not in present:
            columns += TASK_COLUMNS["her2-positive"]
        if "label" in present:
            columns += ("label",)
        return columns

    def _check_images(self) -> None:
        image_needs = {"mri", "mri_r2", "us"} & set(self.needs)
        if not image_needs:
            return
        for patient in self.ids:
            if not _safe_id(patient):
                continue
            try:
                for file, message in _patient_image_problems(
                    self.root, patient, image_needs, full_read=self.full_read
                ):
                    self.patient_problem(patient, file, message)
            except Exception as error:  # a bad patient never stops the others
                self.patient_problem(
                    patient, f"{IMAGES_DIR}/{patient}/", f"{type(error).__name__}: {error}"
                )
        self._check_unknown_image_folders()

    def _check_unknown_image_folders(self) -> None:
        images = self.root / IMAGES_DIR
        if not images.is_dir():
            return
        known = set(self.ids)
        for folder in sorted(images.iterdir()):
            if folder.is_dir() and folder.name not in known:
                self.patient_problem(
                    folder.name,
                    f"{IMAGES_DIR}/{folder.name}/",
                    "image folder of a patient not in clinical.csv",
                    exclude=False,
                )

    def _check_features(self) -> None:
        if "features" not in self.needs:
            return
        table = self._read_table(FEATURES_CSV)
        if table is None:
            return
        if "patient_id" not in table.columns:
            self.site_problem(FEATURES_CSV, "missing column 'patient_id'")
            return
        values = table.drop(columns="patient_id").apply(pd.to_numeric, errors="coerce")
        if values.shape[1] == 0 or table.empty:
            self.site_problem(FEATURES_CSV, "no feature columns or no rows")
            return
        empty_columns = list(values.columns[values.isna().all()])
        for column in empty_columns:
            self.site_problem(FEATURES_CSV, f"column {column!r} holds no numeric value")
        if self.fatal and self.stop_on_fatal:
            return
        values.index = table["patient_id"]
        self._check_table_ids(FEATURES_CSV, list(table["patient_id"]), what="row")
        checked = [c for c in values.columns if c not in empty_columns]
        known = set(self.ids)
        for i, patient in enumerate(table["patient_id"]):
            bad = [c for c in checked if patient in known and not math.isfinite(values.iat[i,
                   values.columns.get_loc(c)])]
            if bad:
                shown = ", ".join(f"{c}={table[c].iat[i]!r}" for c in bad[:3])
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                self.patient_problem(patient, FEATURES_CSV, f"not a finite number: {shown}{more}")
        self.features = values[~values.index.duplicated(keep=False)].astype(float)

    def _check_predictions(self) -> None:
        if "predictions" not in self.needs:
            return
        table = self._read_table(PREDICTIONS_CSV)
        if table is None:
            return
        missing = [c for c in PREDICTION_COLUMNS if c not in table.columns]
        for column in missing:
            self.site_problem(PREDICTIONS_CSV, f"missing column {column!r}")
        if missing:
            return
        keys = [f"{p}\x00{m}" for p, m in zip(table.patient_id, table.model, strict=True)]
        duplicated = {k for k, n in Counter(keys).items() if n > 1}
        self._check_table_ids(PREDICTIONS_CSV, list(table["patient_id"]), what="score")
        models = sorted({m for m in table.model if m})
        scores = pd.to_numeric(table.score, errors="coerce")
        for i, row in table.iterrows():
            patient = row.patient_id
            if patient not in self.ids:
                continue
            message = _prediction_problem(row, scores[i], keys[i] in duplicated)
            if message:
                self.patient_problem(patient, PREDICTIONS_CSV, message)
        for patient in self.ids:
            have = set(table.model[table.patient_id == patient])
            for model in models:
                if model not in have:
                    self.patient_problem(patient, PREDICTIONS_CSV, f"no score for model {model!r}")
        self.predictions = pd.DataFrame(
            {"patient_id": table.patient_id, "model": table.model, "score": scores}
        )

    def _check_table_ids(self, file: str, ids: list[str], *, what: str) -> None:
        """Ids of a side table: unknown ones reported; patients without one excluded."""
        known = set(self.ids)
        for patient in dict.fromkeys(ids):
            if patient == "":
                self.note(file, "a row has an empty patient_id (ignored)")
            elif patient not in known:
                self.patient_problem(patient, file, "patient not in clinical.csv", exclude=False)
        if what == "row":
            counts = Counter(ids)
            for patient in self.ids:
                if counts[patient] == 0:
                    self.patient_problem(patient, file, "no row for this patient")
                elif counts[patient] > 1:
                    self.patient_problem(patient, file, f"duplicate patient_id on {counts[patient]}"
                                         " rows; all are excluded")

    def _apply_task(self) -> None:
        """Targets for the task; valid patients outside it are excluded with the reason."""
        if self.task is None or self.raw is None or "label" not in self.needs:
            return
        for patient, row in self._rows():
            if patient in self.reasons:
                continue
            try:
                self.targets[patient] = task_label(
                    self.task, row.get("her2_ihc"), row.get("her2_ish"), row.get("label")
                )
            except LabelError as error:
                self.not_in_task[patient] = str(error)

    # -- results

    def excluded(self) -> dict[str, str]:
        excluded = {patient: "; ".join(reasons) for patient, reasons in self.reasons.items()}
        return excluded | self.not_in_task

    def usable_ids(self) -> list[str]:
        excluded = self.excluded()
        return [p for p in self.ids if p not in excluded]

    def site(self) -> Site:
        assert self.config is not None and self.raw is not None
        usable = self.usable_ids()
        clinical = _typed_clinical(self.raw, usable)
        if self.task is not None and "label" in self.needs:
            clinical["target"] = [self.targets[p] for p in usable]
        features = self.features.loc[usable] if self.features is not None else None
        predictions = None
        if self.predictions is not None:
            predictions = self.predictions[self.predictions.patient_id.isin(usable)]
            predictions = predictions.reset_index(drop=True)
        return Site(
            root=self.root,
            config=self.config,
            clinical=clinical,
            excluded=self.excluded(),
            problems=list(self.problems),
            task=self.task,
            needs=self.needs,
            features=features,
            predictions=predictions,
        )

    def summary(self) -> SiteCheck:
        return SiteCheck(
            site=self.label,
            config=self.config,
            problems=list(self.problems),
            n_patients=len(self.usable_ids()),
            excluded=self.excluded(),
            not_in_task=dict(self.not_in_task),
        )


def _check_needs(needs: Iterable[str]) -> tuple[str, ...]:
    needs = tuple(dict.fromkeys(needs))
    unknown = [need for need in needs if need not in NEEDS]
    if unknown:
        raise ValueError(f"unknown need(s) {unknown}; known: {', '.join(NEEDS)}")
    if "mri_r2" in needs and "mri" not in needs:
        needs += ("mri",)
    return needs


def _safe_id(patient: str) -> bool:
    return "/" not in patient and "\\" not in patient and patient not in (".", "..")


# --------------------------------------------------------------------------- row values


def _survival_problems(row: pd.Series) -> list[str]:
    problems = []
    time = row.get("dfs_time")
    if is_missing(time):
        problems.append("dfs_time is missing")
    else:
        number = _number(time)
        if number is None:
            problems.append(f"dfs_time {time} is not a number")
        elif number < 0:
            problems.append(f"dfs_time {time} is negative")
    event = row.get("dfs_event")
    if is_missing(event):
        problems.append("dfs_event is missing")
    elif _number(event) not in (0.0, 1.0):
        problems.append(f"dfs_event {event} is not 0 or 1")
    return problems


def _prediction_problem(row: pd.Series, score: float, duplicated: bool) -> str | None:
    if row.model == "":
        return "model is empty"
    if duplicated:
        return f"duplicate score for model {row.model!r}"
    if not math.isfinite(score):
        return f"score {row.score!r} for model {row.model!r} is not a number"
    if not 0.0 <= score <= 1.0:
        return f"score {row.score} for model {row.model!r} is not in [0, 1]"
    return None


def _number(text: object) -> float | None:
    """A finite float from text, or None."""
    try:
        number = float(str(text))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _typed_clinical(raw: pd.DataFrame, usable: list[str]) -> pd.DataFrame:
    """The usable rows, indexed by patient_id, with typed columns."""
    rows = raw.drop_duplicates("patient_id").set_index("patient_id").loc[usable]
    frame = pd.DataFrame(index=pd.Index(usable, name="patient_id", dtype=object))
    for column in rows.columns:
        frame[column] = _typed_column(column, rows[column])
    return frame


def _typed_column(column: str, values: pd.Series) -> pd.Series:
    if column == "her2_ihc":
        return values.map(lambda v: _lenient(parse_ihc, v)).astype("Int64")
    if column == "her2_ish":
        return values.map(lambda v: _lenient(parse_ish, v)).astype(object)
    if column in ("label", "dfs_event"):
        return values.map(lambda v: _lenient(parse_binary_label, v)).astype("Int64")
    if column == "dfs_time":
        return values.map(_number).astype(float)
    present = values[~values.map(is_missing)]
    numbers = pd.to_numeric(present, errors="coerce")
    if len(present) and numbers.notna().all():
        return pd.to_numeric(values.where(~values.map(is_missing)), errors="coerce")
    return values.where(~values.map(is_missing), None).astype(object)


_LABEL_PARSERS: dict[str, Callable[[object], object]] = {
    "her2_ihc": parse_ihc,
    "her2_ish": parse_ish,
    "label": parse_binary_label,
}


def _lenient(parse: Callable[[object], object], value: object) -> object:
    try:
        return parse(value)
    except LabelError:
        return None


# --------------------------------------------------------------------------- images


class _ImageError(Exception):
    """An image that cannot be read; the message is the problem text."""


@dataclass(frozen=True)
class _Geometry:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def differences(self, other: _Geometry) -> list[str]:
        """What differs from `other`, e.g. "size (16, 16, 8) vs (16, 16, 10)"."""
        if self.size != other.size:
            return [f"size {self.size} vs {other.size}"]
        found = []
        for name in ("spacing", "origin", "direction"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if not all(_close(a, b) for a, b in zip(mine, theirs, strict=True)):
                found.append(f"{name} {_rounded(mine)} vs {_rounded(theirs)}")
        return found


@dataclass
class _Read:
    geometry: _Geometry
    components: int
    image: sitk.Image | None = None  # pixels, when read in full

    @property
    def dimension(self) -> int:
        return len(self.geometry.size)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=GEOMETRY_TOLERANCE, abs_tol=GEOMETRY_TOLERANCE)


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(v, 6) for v in values)


def _find_image(folder: Path, kind: str) -> Path | None:
    """The first existing candidate for `kind` in a patient's folder (a folder = DICOM)."""
    for name in IMAGE_NAMES[kind]:
        path = folder / name
        found = path.is_dir() if name == "mri" else path.is_file()
        if found:
            return path
    return None


def _patient_image_problems(
    root: Path, patient: str, needs: set[str], *, full_read: bool
) -> list[tuple[str, str]]:
    """(file, message) for every image problem of one patient under `needs`."""
    folder = root / IMAGES_DIR / patient
    where = f"{IMAGES_DIR}/{patient}/"
    if not folder.is_dir():
        return [(where, f"no image folder (needed for {', '.join(sorted(needs))})")]
    problems: list[tuple[str, str]] = []
    if needs & {"mri", "mri_r2"}:
        problems += _pair_problems(
            root, folder, "mri", "mri_mask", "MRI image", "reader-1 mask", full_read=full_read,
            dims=(3,), optional_mask="mri_mask_r2" if "mri_r2" in needs else None,
        )
    if "us" in needs:
        problems += _pair_problems(
            root, folder, "us", "us_mask", "ultrasound image", "ultrasound mask",
            full_read=full_read, dims=(2,),
        )
    return problems


def _pair_problems(
    root: Path,
    folder: Path,
    image_kind: str,
    mask_kind: str,
    image_name: str,
    mask_name: str,
    *,
    full_read: bool,
    dims: tuple[int, ...],
    optional_mask: str | None = None,
) -> list[tuple[str, str]]:
    """An image and its mask(s): present, readable, right dimension, same geometry, non-empty."""
    problems: list[tuple[str, str]] = []
    image_path = _find_image(folder, image_kind)
    image = None
    if image_path is None:
        names = ", ".join(n + ("/ (DICOM)" if n == "mri" else "") for n in IMAGE_NAMES[image_kind])
        problems.append((_rel(root, folder) + "/", f"missing {image_name} (one of {names})"))
    else:
        image = _checked_read(root, image_path, full_read, dims, problems)
    masks = [(mask_kind, mask_name, True)]
    if optional_mask:
        masks.append((optional_mask, "reader-2 mask", False))
    for kind, name, required in masks:
        path = _find_image(folder, kind)
        if path is None:
            if required:
                expected = IMAGE_NAMES[kind][0]
                problems.append((_rel(root, folder / expected), f"missing {name}"))
            continue
        mask = _checked_read(root, path, True, dims, problems)
        if mask is None:
            continue
        if image is not None and image_path is not None:
            differences = mask.geometry.differences(image.geometry)
            if differences:
                problems.append((
                    _rel(root, path),
                    f"{name} geometry differs from {_shown_name(image_path)}: "
                    f"{'; '.join(differences)}",
                ))
        if not sitk.GetArrayViewFromImage(mask.image).any():
            problems.append((_rel(root, path), f"{name} is empty (no non-zero voxel)"))
    return problems


def _checked_read(
    root: Path, path: Path, full: bool, dims: tuple[int, ...], problems: list[tuple[str, str]]
) -> _Read | None:
    """Read an image; on failure append the problem and return None."""
    try:
        read = _read_image(path, full=full)
    except _ImageError as error:
        problems.append((_rel(root, path), f"cannot read image: {_tidy(str(error), root)}"))
        return None
    dimension = read.dimension
    if dimension == 3 and 2 in dims and read.geometry.size[2] == 1:
        dimension = 2  # a single-slice volume is a 2D image
    if dimension not in dims:
        expected = " or ".join(f"{d}D" for d in dims)
        problems.append((_rel(root, path), f"image is {read.dimension}D; expected {expected}"))
        return None
    return read


def _read_image(path: Path, *, full: bool) -> _Read:
    """Geometry (and pixels when `full`) of an image file or DICOM series folder."""
    try:
        if path.is_dir():
            read = _read_dicom(path)
        elif full:
            image = sitk.ReadImage(str(path))
            read = _Read(_geometry_of(image), image.GetNumberOfComponentsPerPixel(), image)
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            read = _Read(_geometry_of(reader), reader.GetNumberOfComponents())
    except RuntimeError as error:
        raise _ImageError(_sitk_message(error)) from None
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path, thorough=full)
    return read


def _read_dicom(folder: Path) -> _Read:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise _ImageError("no DICOM series found in the folder")
    if len(series) > 1:
        raise _ImageError(f"the folder holds {len(series)} DICOM series; expected one")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    image = reader.Execute()
    return _Read(_geometry_of(image), image.GetNumberOfComponentsPerPixel(), image)


def _geometry_of(source: Any) -> _Geometry:
    return _Geometry(
        tuple(int(v) for v in source.GetSize()),
        tuple(float(v) for v in source.GetSpacing()),
        tuple(float(v) for v in source.GetOrigin()),
        tuple(float(v) for v in source.GetDirection()),
    )


def _check_nifti_complete(path: Path, *, thorough: bool) -> None:
    """SimpleITK reads truncated NIfTI files without error; check the data is all there.

    Uncompressed: file size. Gzip: the trailer's length field (cheap), and with `thorough`
    (or when the trailer disagrees) a full decompression, which also checks the CRC.
    """
    compressed = path.name.endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as stream:
            expected = _nifti_total_bytes(stream.read(540))
    except EOFError:
        raise _ImageError("file is truncated (compressed stream ends early)") from None
    except (OSError, zlib.error) as error:
        raise _ImageError(f"corrupt file ({_one_line(error)})") from None
    if expected is None:
        return  # not a header we understand; SimpleITK accepted it
    if not compressed:
        actual = path.stat().st_size
    elif not thorough and _gzip_trailer_size(path) == expected % 2**32:
        return
    else:
        actual = _gunzipped_size(path)
    if actual < expected:
        raise _ImageError(f"file is truncated ({actual} of {expected} bytes)")


def _nifti_total_bytes(header: bytes) -> int | None:
    """vox_offset + data bytes from a NIfTI-1/2 header, or None if not a NIfTI header."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = max(struct.unpack(endian + "q", header[168:176])[0], 544)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]]))
    return offset + voxels * bitpix // 8


def _gzip_trailer_size(path: Path) -> int:
    with path.open("rb") as handle:
        handle.seek(-4, 2)
        return struct.unpack("<I", handle.read(4))[0]


def _gunzipped_size(path: Path) -> int:
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    except EOFError:
        raise _ImageError("file is truncated (compressed stream ends early)") from None
    except (OSError, zlib.error) as error:
        raise _ImageError(f"corrupt compressed data ({_one_line(error)})") from None
    return total


# --------------------------------------------------------------------------- text helpers


def _shown_name(path: Path) -> str:
    return path.name + "/" if path.is_dir() else path.name


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _sitk_message(error: RuntimeError) -> str:
    """The useful last line of a SimpleITK exception, without source-file noise."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[-1] if lines else "unknown SimpleITK error"
    message = re.sub(r"^(sitk::ERROR|ITK ERROR):\s*", "", message)
    return re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", message)


def _tidy(message: str, root: Path) -> str:
    """Absolute site paths in a message shown relative to the site folder."""
    return message.replace(str(root) + "/", "").replace(str(root.resolve()) + "/", "")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


__all__ = [
    "NEEDS",
    "ROLES",
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
