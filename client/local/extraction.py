"""Site-side radiomics: pyradiomics features of each patient's MRI tumour, extracted locally.

`extract_features(site)` runs pyradiomics (paper 1's parameters by default: the `paper`
preset, `shared/radiomics_params.yaml`, 1130 features) on every usable patient of a loaded
site and returns one row per patient with pyradiomics' own column names
(`original_glcm_Contrast`, `wavelet-LLH_firstorder_Mean`,
`log-sigma-1-0-mm-3D_firstorder_Mean`; no `diagnostics_*`).

- **Parameters a query names** (`params_file`): a preset shipped with the app (`PRESETS`)
  or a YAML file inside the site folder, read up to `MAX_PARAMS_BYTES`; nothing else is
  opened, and no error quotes the file (issue 25: the coordinator is not trusted).

- **Readers.** `reader="r1"` uses `mri_mask`; `reader="r2"` uses `mri_mask_r2` with the
  same parameters (for ICC), for the patients that have one.
- **Images and masks** go through `client.site.image_pair`, the acceptance path of check-site
  and the CNN stages: one source per image, uneven DICOM slices refused, the mask put on
  the image's grid in physical space (refused with its offset in mm when it lies
  elsewhere), every non-zero voxel tumour unless site.yaml's `mask_label` picks one; the
  tumour is passed to pyradiomics as the parameters' `label`.
- **Failures.** A patient whose extraction fails (refused images, too few voxels after
  resampling, a crashed worker process) is skipped and returned in the failures dict with
  the reason; the other patients go on. `attrs["failed_by_reason"]` counts them by
  category (client.site.image_pair's, or `radiomics extraction failed`).
- **Cache.** One JSON file per patient and reader under `<site>/cache/radiomics/`, named by
  the sha256 of the image bytes (every file of a DICOM folder), the mask bytes, the
  parameter file bytes and the pyradiomics version. A re-run reads it; any change misses.
- **Parallelism.** A process pool (spawned processes, safe beside gRPC/Ray threads) over the
  site's CPU cores, ITK single-threaded in each worker; `workers=1` runs in-process.
- **features.csv.** A site that has one uses it instead of extracting (`attrs["source"]`).

The returned frame's `attrs` say where the rows came from: `source` (`pyradiomics` or
`features.csv`), `reader`, `params`, `params_sha256`, `n_extracted`, `n_cached`, `n_failed`
and `n_without_mask` (reader-2 patients without a second mask; not failures).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import radiomics
import yaml

from client.local.extraction_job import (
    CACHE_FORMAT,
    EXTRACTION_FAILED,
    Job,
    Outcome,
    extract_one,
    extractor,
    init_worker,
    one_line,
    reason,
)
from client.site import image_pair
from client.site.files import SiteFileMissing, SiteFileRefused, read_bounded, site_file
from client.site.folder import FEATURES_CSV, Site, SiteError, load_site
from client.site.image_pair import MISSING, UNREADABLE

DEFAULT_PARAMS = Path(__file__).resolve().parents[2] / "shared" / "radiomics_params.yaml"
# Parameter presets shipped with the app, by the name a query may send (`radiomics-params`)
PRESETS: dict[str, Path] = {"paper": DEFAULT_PARAMS}  # paper 1's: 1130 features
PARAMS_SUFFIXES = (".yaml", ".yml")
MAX_PARAMS_BYTES = 256 << 10  # a pyradiomics parameter file is a few kB
CACHE_DIR = Path("cache") / "radiomics"
MASKS: dict[str, str] = {"r1": "mri_mask", "r2": "mri_mask_r2"}

Reader = Literal["r1", "r2"]
Progress = Callable[[str], None]

@dataclass(frozen=True)
class _Params:
    path: Path
    sha256: str
    label: int


# --------------------------------------------------------------------------- public API


def extract_features(
    site: Site,
    *,
    params: Path | None = None,
    reader: Reader = "r1",
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Radiomics features of the site's usable patients and {patient_id: reason} failures.

    `params` is a pyradiomics parameter file the site chose (default: the paper's; a
    query's name goes through `params_file` first); an invalid one raises ValueError,
    quoting nothing of the file, before any patient is touched. `workers` defaults to the
    usable CPU cores.
    """
    if reader not in MASKS:
        raise ValueError(f"reader must be one of {', '.join(MASKS)}; got {reader!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    say = progress or (lambda _message: None)
    chosen = _load_params(Path(params) if params is not None else DEFAULT_PARAMS)
    from_csv = _from_features_csv(site, reader, say)
    if from_csv is not None:
        return from_csv
    cache = Path(cache_dir) if cache_dir is not None else site.root / CACHE_DIR
    jobs, failures, without_mask, refused = _plan_jobs(site, reader, chosen, cache)
    categories = dict.fromkeys(failures, MISSING)
    categories |= {p: UNREADABLE for p, r in failures.items() if r.startswith("cannot read")}
    categories |= refused
    outcomes = _run(jobs, workers, _Reporter(say, site.site_id, reader, len(jobs), site.root))
    failures |= {o.patient_id: o.reason for o in outcomes if o.reason}
    categories |= {o.patient_id: o.category or EXTRACTION_FAILED for o in outcomes if o.reason}
    frame = _frame(outcomes, list(site.clinical.index))
    frame.attrs.update(_summary(outcomes, failures, without_mask, chosen, reader))
    # why each failed patient failed, counted (client.site.image_pair's categories)
    frame.attrs["failed_by_reason"] = dict(Counter(categories.values()))
    say(f"{site.site_id}: radiomics {reader}: {_summary_text(frame.attrs)}")
    return frame, {p: _tidy(failures[p], site.root) for p in site.clinical.index if p in failures}


def cache_key(image: Path, mask: Path, params: Path, mask_label: int | None = None) -> str:
    """The sha256 naming a patient's cache file (image, mask, params, pyradiomics version,
    site.yaml's mask_label)."""
    return _cache_key(image, mask, _file_sha256(params), mask_label)


# --------------------------------------------------------------------------- parameters


def params_file(name: str, root: Path) -> Path:
    """The parameter file a query's `radiomics-params` names: a preset shipped with the app
    (`PRESETS`; "" = `paper`) or a YAML file inside the site folder (client.site.files:
    nothing outside it is opened, whether or not it exists)."""
    name = name.strip()
    if name in PRESETS or not name:
        return PRESETS[name or "paper"]
    try:
        return site_file(name, [root], PARAMS_SUFFIXES, "radiomics params", MAX_PARAMS_BYTES)
    except (SiteFileRefused, SiteFileMissing) as error:
        raise type(error)(f"{error} (or a preset: {', '.join(PRESETS)})") from None


def _load_params(path: Path) -> _Params:
    """Validated parameters, read up to MAX_PARAMS_BYTES; ValueError naming the file (its
    name only) and the kind of problem, never a line or value of it."""
    shown = path.name
    try:
        data = read_bounded(path, MAX_PARAMS_BYTES, f"radiomics params {shown!r}")
        sha256 = hashlib.sha256(data).hexdigest()
        settings = (yaml.safe_load(data) or {}).get("setting") or {}
        label = int(settings.get("label", 1))
        extractor(path, sha256)
    except SiteFileRefused:
        raise
    except Exception as error:  # pyradiomics', YAML's and int()'s messages quote the file
        raise ValueError(f"radiomics params {shown!r}: {_params_problem(error)}") from None
    return _Params(path, sha256, label)


def _params_problem(error: Exception) -> str:
    """What is wrong with a parameter file, in words that quote nothing of it."""
    if isinstance(error, OSError):
        return "unreadable at this site"
    if isinstance(error, yaml.YAMLError | UnicodeDecodeError):
        return "not a YAML file"
    if isinstance(error, AttributeError | TypeError):
        return "not a mapping of pyradiomics settings"
    if isinstance(error, ValueError):
        return "setting.label is not an integer"
    return "not a valid pyradiomics parameter file (pyradiomics refused it)"


# --------------------------------------------------------------------------- features.csv


def _from_features_csv(
    site: Site, reader: Reader, say: Progress
) -> tuple[pd.DataFrame, dict[str, str]] | None:
    """The site's features.csv rows when it has one (reader 1); None to extract."""
    if site.features is None and not (site.root / FEATURES_CSV).is_file():
        return None
    if reader == "r2":
        say(f"{site.site_id}: features.csv present: reader-2 features are not extracted "
            "(both readers must come from the same extraction for ICC)")
        return _with_attrs(_empty_frame(), **_csv_attrs(reader, 0)), {}
    table, excluded = _features_table(site)
    ids = list(site.clinical.index)
    present = [p for p in ids if p in table.index]
    failures = {
        p: excluded.get(p, f"{FEATURES_CSV}: no usable row for this patient")
        for p in ids if p not in table.index
    }
    frame = table.loc[present].astype(float)
    frame.index = pd.Index(present, name="patient_id", dtype=object)
    frame = _with_attrs(frame, **_csv_attrs(reader, len(failures)))
    say(f"{site.site_id}: using {FEATURES_CSV} ({len(present)} patients, "
        f"{frame.shape[1]} features) instead of extracting")
    return frame, failures


def _features_table(site: Site) -> tuple[pd.DataFrame, dict[str, str]]:
    """features.csv as loaded by `load_site` (validated), and why patients lack a row."""
    if site.features is not None:
        return site.features, {}
    try:
        loaded = load_site(site.root, task=site.task, needs=("features",))
    except SiteError as error:
        raise ValueError(f"{site.site_id}: {FEATURES_CSV} cannot be used:\n{error}") from None
    assert loaded.features is not None
    return loaded.features, loaded.excluded


def _csv_attrs(reader: str, n_failed: int) -> dict[str, Any]:
    return {"source": FEATURES_CSV, "reader": reader, "params": None, "params_sha256": None,
            "n_extracted": 0, "n_cached": 0, "n_failed": n_failed, "n_without_mask": 0,
            "failed_by_reason": {f"no usable row in {FEATURES_CSV}": n_failed}}


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame(index=pd.Index([], name="patient_id", dtype=object), dtype=float)


def _with_attrs(frame: pd.DataFrame, **attrs: Any) -> pd.DataFrame:
    frame.attrs.update(attrs)
    return frame


# --------------------------------------------------------------------------- planning


def _plan_jobs(
    site: Site, reader: Reader, params: _Params, cache: Path
) -> tuple[list[Job], dict[str, str], list[str], dict[str, str]]:
    """Jobs (with their cache file) for patients with image and mask; failures; reader-2
    patients without a mask; the category of each patient refused here."""
    jobs: list[Job] = []
    failures: dict[str, str] = {}
    without_mask: list[str] = []
    refused: dict[str, str] = {}
    for patient in site.clinical.index:
        paths = site.image_paths(patient)
        mask = paths.get(MASKS[reader])
        if "mri" not in paths:
            failures[patient] = "no MRI image (mri.nii.gz, mri.nii, mri.nrrd or mri/ DICOM)"
        elif mask is None and reader == "r2":
            without_mask.append(patient)
        elif mask is None:
            failures[patient] = "no reader-1 mask (mri_mask.nii.gz, .nii or .nrrd)"
        else:
            label = site.config.mask_label
            try:
                # a folder's second source is no part of the cache key (its content is):
                # refused before the cache, else the copy beside it hits a cached entry
                image_pair.one_source(paths["mri"])
                image_pair.one_source(mask)
                key = _cache_key(paths["mri"], mask, params.sha256, label)
            except image_pair.ImageRefused as error:
                failures[patient], refused[patient] = reason(error), error.category
                continue
            except OSError as error:
                failures[patient] = f"cannot read the image files: {one_line(error)}"
                continue
            jobs.append(Job(patient, paths["mri"], mask, params.path, params.sha256,
                             params.label, cache / f"{key}.json", label))
    return jobs, failures, without_mask, refused


def _worker_count(workers: int | None, n_jobs: int) -> int:
    available = workers or _cpu_count()
    return max(1, min(available, n_jobs))


def _cpu_count() -> int:
    """CPU cores this process may use (affinity-aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# --------------------------------------------------------------------------- running


def _run(jobs: list[Job], workers: int | None, report: _Reporter) -> list[Outcome]:
    """Cache hits read here; the misses extracted in-process or over a process pool."""
    outcomes: list[Outcome] = []
    missing: list[Job] = []
    for job in jobs:
        cached = _read_cache(job.cache_file)
        if cached is None:
            missing.append(job)
        else:
            outcomes.append(report(Outcome(job.patient_id, cached, cached=True)))
    count = _worker_count(workers, len(missing))
    # largest tumours first (mask file size as the proxy), so no long job starts last
    missing.sort(key=lambda job: job.mask.stat().st_size, reverse=True)
    if missing:
        report.say(f"{report.prefix}: extracting {len(missing)} patients on {count} "
                   f"process{'es' if count > 1 else ''} ({len(outcomes)} from cache)")
    if count <= 1:
        return outcomes + [report(extract_one(job)) for job in missing]
    return outcomes + _run_pool(missing, count, report)


class _Reporter:
    """Progress lines, one per patient extracted (cache hits are counted, not listed)."""

    def __init__(self, say: Progress, site_id: str, reader: str, total: int,
                 root: Path) -> None:
        self.say = say
        self.root = root
        self.prefix = f"{site_id}: radiomics {reader}"
        self.total = total
        self.done = 0

    def __call__(self, outcome: Outcome) -> Outcome:
        self.done += 1
        if outcome.cached:  # counted in the "extracting …" and summary lines
            return outcome
        state = "cached" if outcome.cached else "extracted" if outcome.features else "failed"
        line = f"{self.prefix} {self.done}/{self.total} ({outcome.patient_id}) {state}"
        if outcome.reason:
            line += f": {_tidy(outcome.reason, self.root)}"
        if outcome.note:
            line += f" ({outcome.note})"
        self.say(line)
        return outcome


def _run_pool(jobs: list[Job], workers: int, report: _Reporter) -> list[Outcome]:
    """All jobs over a pool; jobs lost to a dying worker are retried each in its own."""
    context = multiprocessing.get_context("spawn")
    outcomes: list[Outcome] = []
    lost: list[Job] = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker) as pool:
        futures = {pool.submit(extract_one, job): job for job in jobs}
        for future in as_completed(futures):
            outcome = _result(future, futures[future])
            if outcome is None:
                lost.append(futures[future])
            else:
                outcomes.append(report(outcome))
    outcomes += [report(_run_isolated(job, context)) for job in lost]
    return outcomes


def _run_isolated(job: Job, context: Any) -> Outcome:
    """One job in a fresh single-process pool, so a crash takes no other patient with it."""
    with ProcessPoolExecutor(1, mp_context=context, initializer=init_worker) as pool:
        outcome = _result(pool.submit(extract_one, job), job)
    if outcome is None:
        reason = "the extraction process died (out of memory or a crash inside ITK?)"
        return Outcome(job.patient_id, None, reason)
    return outcome


def _result(future: Future[Outcome], job: Job) -> Outcome | None:
    """The job's outcome; None when its worker process died."""
    try:
        return future.result()
    except BrokenProcessPool:
        return None
    except Exception as error:  # e.g. the outcome could not be sent back
        return Outcome(job.patient_id, None, reason(error))


# --------------------------------------------------------------------------- one patient


def _tidy(reason: str, root: Path) -> str:
    """Paths in a reason shown relative to the site folder (no local layout leaves)."""
    for prefix in {str(root), str(root.resolve())}:
        reason = reason.replace(prefix + "/", "")
    return reason


# --------------------------------------------------------------------------- cache


def _cache_key(image: Path, mask: Path, params_sha256: str,
               mask_label: int | None = None) -> str:
    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, _path_sha256(image), _file_sha256(mask), params_sha256,
                 f"pyradiomics {radiomics.__version__}", f"mask_label {mask_label}"):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def _path_sha256(path: Path) -> str:
    """A file's bytes, or every file of a folder (DICOM series): names, sizes and bytes."""
    if not path.is_dir():
        return _file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        _update(digest, _chunks(file))
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    _update(digest, _chunks(path))
    return digest.hexdigest()


def _update(digest: Any, chunks: Iterable[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)


def _chunks(path: Path, size: int = 1 << 20) -> Iterable[bytes]:
    with path.open("rb") as stream:
        while chunk := stream.read(size):
            yield chunk


def _read_cache(path: Path) -> dict[str, float] | None:
    """The cached features, or None when absent or unreadable (then re-extracted)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        features = content["features"]
        return {str(name): float(value) for name, value in features.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# --------------------------------------------------------------------------- results


def _frame(outcomes: list[Outcome], order: list[str]) -> pd.DataFrame:
    """Successful patients in site order, columns in pyradiomics' order."""
    rows = {o.patient_id: o.features for o in outcomes if o.features is not None}
    ids = [p for p in order if p in rows]
    if not ids:
        return _empty_frame()
    frame = pd.DataFrame.from_dict({p: rows[p] for p in ids}, orient="index", dtype=float)
    frame.index = pd.Index(ids, name="patient_id", dtype=object)
    return frame


def _summary(outcomes: list[Outcome], failures: dict[str, str], without_mask: list[str],
             params: _Params, reader: str) -> dict[str, Any]:
    return {
        "source": "pyradiomics",
        "reader": reader,
        "params": str(params.path),
        "params_sha256": params.sha256,
        "n_extracted": sum(o.features is not None and not o.cached for o in outcomes),
        "n_cached": sum(o.cached for o in outcomes),
        "n_failed": len(failures),
        "n_without_mask": len(without_mask),
    }


def _summary_text(attrs: dict[str, Any]) -> str:
    text = (f"{attrs['n_extracted']} extracted, {attrs['n_cached']} from cache, "
            f"{attrs['n_failed']} failed")
    if attrs["n_without_mask"]:
        text += f", {attrs['n_without_mask']} without a reader-2 mask"
    return text


__all__ = ["CACHE_DIR", "DEFAULT_PARAMS", "MASKS", "PRESETS", "cache_key", "extract_features",
           "params_file"]
