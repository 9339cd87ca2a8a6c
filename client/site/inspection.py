"""One pass over a site folder (`client.site.folder`'s `load_site`, `inspect_site`): site.yaml,
clinical.csv's columns, ids and label values, each patient's images, features.csv and
predictions.csv, the task's targets — every problem recorded as a `Problem`, every patient
to leave out with its reasons, and what loading did that is not a problem (the notes: levels
normalized, a mask resampled from another grid, a column read as missing).

site.yaml's keys and parsing are in `client.site.config`, clinical.csv's reading in
`client.site.clinical`, the row values in `client.site.values`, the image checks in
`client.site.images`; `client.site.folder` turns a pass into a `Site` or a `SiteCheck`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from client.site.clinical import plain_cells, read_clinical
from client.site.config import SITE_YAML, CsvFormat, SiteConfig, parse_config
from client.site.images import IMAGES_DIR, find_image, patient_image_problems
from client.site.messages import Problem, one_line
from client.site.values import (
    LABEL_PARSERS,
    decimal_number,
    prediction_problem,
    survival_problems,
)
from shared.labels import TASK_COLUMNS, LabelError, task_label

CLINICAL_CSV = "clinical.csv"
FEATURES_CSV = "features.csv"
PREDICTIONS_CSV = "predictions.csv"
SURVIVAL_COLUMNS = ("dfs_time", "dfs_event")
PREDICTION_COLUMNS = ("patient_id", "model", "score")


def parse_site_yaml(root: Path, label: str) -> tuple[SiteConfig | None, list[Problem]]:
    """site.yaml as a SiteConfig (None when it cannot be), and its problems."""
    config, messages = parse_config(root)
    return config, [Problem(label, SITE_YAML, None, message) for message in messages]


class SiteInspection:
    """One pass over a site folder, collecting problems, exclusions and notes.

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
        self.noted: list[tuple[str | None, str, str]] = []  # (patient, file, note)
        self.numeric: set[str] = set()  # clinical.csv's numeric columns
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

    def nonfatal_problem(self, file: str, message: str) -> None:
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
        self.config, config_problems = parse_site_yaml(self.root, self.label)
        if self.config is not None:
            self.label = self.config.site_id
        self.problems += config_problems
        self.fatal += config_problems
        self.raw = self._read_clinical()
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
            if any(find_image(folder, kind) for folder in folders):
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
            self.site_problem(name, f"cannot read CSV: {one_line(error)}")
            return None
        table.columns = [str(column).strip() for column in table.columns]
        return table.apply(lambda column: column.str.strip())

    def _read_clinical(self) -> pd.DataFrame | None:
        """clinical.csv in its declared format, its cells made plain (client/site_clinical)."""
        fmt = self.config.clinical_csv if self.config is not None else CsvFormat()
        raw, problem = read_clinical(self.root / CLINICAL_CSV, fmt)
        if raw is None:
            self.site_problem(CLINICAL_CSV, problem or "cannot read CSV")
            return None
        cells = plain_cells(raw, fmt)
        self.numeric = cells.numeric
        for message in cells.site_problems:
            self.site_problem(CLINICAL_CSV, message)
        for patient, message in cells.bad_cells:
            self.patient_problem(patient, CLINICAL_CSV, message)
        self.noted += [(None, CLINICAL_CSV, note) for note in cells.notes]
        return raw

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
        parsers = {column: LABEL_PARSERS[column] for column in self._label_columns()}
        parsers = {c: parse for c, parse in parsers.items() if c in self.raw.columns}
        for patient, row in self._rows():
            for column, parse in parsers.items():
                try:
                    parse(row[column])
                except LabelError as error:
                    self.patient_problem(patient, CLINICAL_CSV, str(error))
            if "survival" in self.needs:
                for message in survival_problems(row):
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
                notes: list[tuple[str, str]] = []
                for file, message in patient_image_problems(
                    self.root, patient, image_needs, full_read=self.full_read,
                    mask_label=self.config.mask_label if self.config else None, notes=notes,
                ):
                    self.patient_problem(patient, file, message)
                self.noted += [(patient, file, note) for file, note in notes]
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
        scores = table.score.map(decimal_number)  # correctly rounded, as float() reads it
        for i, row in table.iterrows():
            patient = row.patient_id
            if patient not in self.ids:
                continue
            message = prediction_problem(row, scores[i], keys[i] in duplicated)
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
                self.nonfatal_problem(file, "a row has an empty patient_id (ignored)")
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

    def notes(self) -> list[Problem]:
        """What loading did that is not a problem, each naming its file (and patient)."""
        return [Problem(self.label, file, patient, note)
                for patient, file, note in self.noted]


def _safe_id(patient: str) -> bool:
    """A patient id usable as a folder name under images/."""
    return "/" not in patient and "\\" not in patient and patient not in (".", "..")
