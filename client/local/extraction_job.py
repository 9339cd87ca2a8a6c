"""One patient's pyradiomics extraction, as the worker processes of
`client.local.extraction` run it.

Kept apart from `client.local.extraction` so that a spawned worker imports only what extracting
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

from client.site.image_pair import ImageRefused, accepted_pair

# bump when what a cache file holds changes (2: masks go through client.site.image_pair)
CACHE_FORMAT = "feddlr-radiomics-cache-2"
EXTRACTION_FAILED = "radiomics extraction failed"
TOO_SMALL = "mask empty at the parameters' voxel spacing"
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
    mask_label: int | None = None  # site.yaml's: the mask value that is tumour (None: non-zero)


@dataclass(frozen=True)
class Outcome:
    patient_id: str
    features: dict[str, float] | None
    reason: str | None = None
    cached: bool = False
    note: str | None = None  # e.g. the cache could not be written
    category: str | None = None  # why it failed, as counted in the stage's reply


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
        return Outcome(job.patient_id, None, reason(error), category=category(error))
    return Outcome(job.patient_id, features, note=write_cache(job.cache_file, job, features))


def _pyradiomics(job: Job) -> dict[str, float]:
    """pyradiomics on the image and the mask as every stage accepts it (client.site.image_pair:
    one source, readable, uneven DICOM slices refused, the mask on the image's region and
    put on its grid, non-zero or `mask_label` = tumour), given the parameters' label."""
    image, tumour = accepted_pair(job.image, job.mask, label=job.mask_label,
                                  mask_name="mask", image_name=_shown(job.image))
    mask = sitk.Cast(tumour, sitk.sitkUInt32) * job.label
    mask.CopyInformation(image)
    pyradiomics = extractor(job.params, job.params_sha256)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        result = pyradiomics.execute(image, mask)
    return {
        name: float(value)
        for name, value in result.items()
        if not name.startswith(DIAGNOSTICS_PREFIX)
    }


def _shown(path: Path) -> str:
    return path.name + "/" if path.is_dir() else path.name


def category(error: BaseException) -> str:
    """The reason a failed patient is counted under in the stage's reply."""
    if isinstance(error, ImageRefused):
        return error.category
    if "No label object with label" in str(error):
        return TOO_SMALL
    return EXTRACTION_FAILED


def reason(error: BaseException) -> str:
    """A one-line reason; ITK's 'no label object' after resampling said plainly."""
    text = one_line(error)
    if "No label object with label" in text:
        return "mask is empty after resampling to the parameters' voxel spacing"
    if isinstance(error, ImageRefused) and error.file is not None:
        return f"{error.file}: {text}"
    if isinstance(error, ValueError):
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
