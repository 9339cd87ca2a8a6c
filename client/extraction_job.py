"""One patient's pyradiomics extraction, as the worker processes of `client.extraction` run it.

Kept apart from `client.extraction` so that a spawned worker imports only what extracting
needs (SimpleITK, pyradiomics, numpy) — not pandas, the site loader or YAML — and starts in
about half the time (bench/extraction.py: worker start-up is what bounds the speed-up on
small cohorts).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import radiomics
import SimpleITK as sitk
from radiomics.featureextractor import RadiomicsFeatureExtractor

from client.dicom import DicomSeriesError, read_dicom_series

CACHE_FORMAT = "feddlr-radiomics-cache-1"  # bump when what a cache file holds changes
DIAGNOSTICS_PREFIX = "diagnostics_"

_EXTRACTORS: dict[tuple[str, str], RadiomicsFeatureExtractor] = {}


@dataclass(frozen=True)
class Job:
    """One patient's extraction, as sent to a worker process."""

    patient_id: str
    image: Path
    mask: Path
    params: Path
    params_sha256: str
    label: int
    cache_file: Path  # <cache_dir>/<cache key>.json


@dataclass(frozen=True)
class Outcome:
    patient_id: str
    features: dict[str, float] | None
    reason: str | None = None
    cached: bool = False
    note: str | None = None  # e.g. the cache could not be written


class PatientError(Exception):
    """A patient-level problem; the message is the reason reported."""


def extractor(path: Path, sha256: str) -> RadiomicsFeatureExtractor:
    """One extractor per parameter file content and process."""
    key = (str(path), sha256)
    if key not in _EXTRACTORS:
        quiet()
        with warnings.catch_warnings():  # pykwalify's extension loader is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            _EXTRACTORS[key] = RadiomicsFeatureExtractor(str(path))
    return _EXTRACTORS[key]


def quiet() -> None:
    """pyradiomics (and its schema validator) log every step; keep errors only."""
    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    logging.getLogger("pykwalify").setLevel(logging.ERROR)


def init_worker() -> None:
    """Worker processes: single-threaded ITK (the pool is the parallelism), quiet logs."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    quiet()


def extract_one(job: Job) -> Outcome:
    """pyradiomics on the image and mask, written to the cache; never raises."""
    try:
        features = _pyradiomics(job)
    except Exception as error:
        return Outcome(job.patient_id, None, reason(error))
    return Outcome(job.patient_id, features, note=write_cache(job.cache_file, job, features))


def _pyradiomics(job: Job) -> dict[str, float]:
    image = _read_image(job.image)
    mask = _read_mask(job.mask, job.label)
    pyradiomics = extractor(job.params, job.params_sha256)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        result = pyradiomics.execute(image, mask)
    return {
        name: float(value)
        for name, value in result.items()
        if not name.startswith(DIAGNOSTICS_PREFIX)
    }


def _read_image(path: Path) -> sitk.Image:
    if not path.is_dir():
        return sitk.ReadImage(str(path))
    try:
        return read_dicom_series(path)
    except DicomSeriesError as error:
        raise PatientError(str(error)) from None


def _read_mask(path: Path, label: int) -> sitk.Image:
    """The mask as pyradiomics needs it: unchanged when it holds `label`, else non-zero ->
    `label` (DESIGN.md: non-zero = tumour)."""
    mask = sitk.ReadImage(str(path))
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    if label in values:
        return mask
    if not np.any(values != 0):
        raise PatientError(f"{path.name} is empty (no non-zero voxel)")
    binary = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt32) * label
    binary.CopyInformation(mask)
    return binary


def reason(error: BaseException) -> str:
    """A one-line reason; ITK's 'no label object' after resampling said plainly."""
    text = one_line(error)
    if "No label object with label" in text:
        return "mask is empty after resampling to the parameters' voxel spacing"
    if isinstance(error, PatientError | ValueError):
        return text
    if isinstance(error, RuntimeError) and "SimpleITK" in text:
        text = re.sub(r"^.*?(sitk::ERROR|ITK ERROR):\s*", "", text)
        return "SimpleITK: " + re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", text)
    return f"{type(error).__name__}: {text}"


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def write_cache(path: Path, job: Job, features: dict[str, float]) -> str | None:
    """Atomic write (temporary file + rename); a note instead of an error on failure."""
    content = {
        "format": CACHE_FORMAT,
        "pyradiomics": radiomics.__version__,
        "params_sha256": job.params_sha256,
        "features": features,
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(content), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        return f"cache not written: {one_line(error)}"
    return None
