"""The data path of the CNN stages' patients at a site (`dsfr`, `deep`): each patient's
inputs for model `p.model` (client/local/imaging.py's data path: tumour slices for DSFR, tumour
crops for the deep models), cached per patient in `cache/training/<model>/<key>.npz` (keyed
by the preparation settings and the patient's image files; a torn file is made again); the
site's prepared samples with its CV folds (kept in the session while its data are
unchanged); the training and validation rows of a unit; several sites' data as one (the
pooled reference). The messages that use them are in client/stages/training.py, a round in
client/stages/training_round.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from client.local import imaging
from client.site.image_pair import MISSING, PREPARATION, ImageRefused, category_of, one_source
from client.site.session import SiteSession
from shared.folds import site_folds
from shared.training_params import DSFR_UNIT, TrainParams

IMAGE_KINDS = {"dsfr": ("mri", "mri_mask"), "dl_mri": ("mri", "mri_mask"),
               "dl_us": ("us", "us_mask")}
CACHE = Path("cache") / "training"


def preparation(p: TrainParams) -> imaging.Preparation:
    """The data path's settings of a round's parameters."""
    return imaging.Preparation(size=p.size, spacing=p.spacing, margin_mm=p.margin_mm,
                               margin_px=p.margin, reference=p.reference)


@dataclass
class ModelData:
    """A site's (or the pooled) prepared samples for one model."""

    patients: np.ndarray  # (P,) patient ids
    y: np.ndarray  # (P,) 0/1 labels
    x: np.ndarray  # (S, 1, ...) float32 inputs
    mask: np.ndarray  # (S, 1, ...) uint8 masks (DSFR targets; ROI masks otherwise)
    owner: np.ndarray  # (S,) sample -> patient index
    folds: np.ndarray | None = None  # (P,) fold per patient; None: external site
    failed: dict[str, str] = field(default_factory=dict)
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # category -> patients

    def samples(self, patients: np.ndarray) -> np.ndarray:
        """Sample indices of the patients where `patients` (bool, (P,)) is true."""
        return np.flatnonzero(patients[self.owner])


PREP_FORMAT = 4  # bump when the data path changes: old per-patient cache files are ignored


def prepare_patient(found: dict[str, Path], p: TrainParams,
                    mask_label: int | None = None) -> imaging.Prepared:
    """One patient's inputs for model `p.model` (client/local/imaging.py's data path; images and
    masks accepted as every stage accepts them, client/site/image_pair.py)."""
    image_kind, mask_kind = IMAGE_KINDS[p.model]
    make = {"dsfr": imaging.tumour_slices, "dl_mri": imaging.mri_roi,
            "dl_us": imaging.us_roi}[p.model]
    return make(found[image_kind], found[mask_kind], preparation(p), mask_label)


def preparation_key(p: TrainParams) -> str:
    """What a prepared input depends on besides the image files."""
    return json.dumps([PREP_FORMAT, p.model, asdict(preparation(p))], sort_keys=True)


def patient_cache_file(folder: Path, found: dict[str, Path], p: TrainParams,
                       mask_label: int | None = None) -> Path:
    """`cache/training/<model>/<key>.npz`: the key covers the preparation settings, the
    site's mask_label and the patient's image and mask files (name, size, modification
    time)."""
    digest = hashlib.sha256(f"{preparation_key(p)}:{mask_label}".encode())
    for kind in IMAGE_KINDS[p.model]:
        path = Path(found[kind])
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return folder / p.model / f"{digest.hexdigest()[:32]}.npz"


def cached_patient(folder: Path, found: dict[str, Path], p: TrainParams,
                   mask_label: int | None = None) -> imaging.Prepared:
    """The patient's prepared inputs from the site's cache, made and cached if absent."""
    image_kind, mask_kind = IMAGE_KINDS[p.model]
    if image_kind not in found or mask_kind not in found:
        raise ImageRefused(MISSING, f"no {image_kind} image with mask")
    for kind in (image_kind, mask_kind):  # a stale copy beside a file is not in the key
        one_source(Path(found[kind]))
    path = patient_cache_file(folder, found, p, mask_label)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as saved:
                return imaging.Prepared(saved["x"], saved["mask"], float(saved["mm"]))
        except (OSError, KeyError, ValueError):
            path.unlink(missing_ok=True)  # a torn file: make it again
    prepared = prepare_patient(found, p, mask_label)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, x=prepared.x, mask=prepared.mask, mm=np.float64(prepared.mm_per_voxel))
    os.replace(tmp, path)
    return prepared


def prepare(folder: Path, patients: list[str], paths: Callable[[str], dict[str, Path]],
            y: np.ndarray, p: TrainParams, mask_label: int | None = None,
            say: Callable[[str], None] | None = None) -> ModelData:
    """Every patient's inputs for model `p.model` (cached per patient under `folder`); a
    patient whose images cannot be prepared is left out with the reason and its category
    (never silently). `say` hears each failure and a summary line."""
    xs, masks, owner, kept, labels, failed, why = [], [], [], [], [], {}, {}
    for i, patient in enumerate(patients):
        try:
            prepared = cached_patient(folder, paths(patient), p, mask_label)
        except ImageRefused as err:
            failed[patient] = f"{err.file.name + ': ' if err.file else ''}{err}"
            why[patient] = err.category
        except Exception as err:  # one bad patient never stops the site
            failed[patient] = f"{type(err).__name__}: {err}"
            why[patient] = PREPARATION
        if patient in failed:
            if say is not None:
                say(f"{p.model} images {i + 1}/{len(patients)} ({patient}) failed: "
                    f"{failed[patient]}")
            continue
        xs.append(prepared.x)
        masks.append(prepared.mask)
        owner += [len(kept)] * len(prepared.x)
        kept.append(patient)
        labels.append(int(y[i]))
    if say is not None:
        say(f"{p.model} images: {len(kept)} patients prepared, {len(failed)} failed")
    dims = (1, p.size, p.size) + ((p.size,) if p.model == "dl_mri" else ())
    return ModelData(
        patients=np.asarray(kept, dtype=str), y=np.asarray(labels, dtype=np.int64),
        x=np.concatenate(xs) if xs else np.zeros((0, *dims), np.float32),
        mask=np.concatenate(masks) if masks else np.zeros((0, *dims), np.uint8),
        owner=np.asarray(owner, dtype=np.int64), failed=failed,
        failed_by_reason=dict(Counter(why.values())))


def site_data(session: SiteSession, p: TrainParams) -> ModelData:
    """The site's prepared samples (each patient's cached on the site's disk; the whole set
    kept in the session while the site's data are unchanged), with its folds for `p`."""
    from client.stages.handshake import data_hash

    site = session.site
    patients = [str(i) for i in site.clinical.index]
    labels = session.labels()
    key = json.dumps([preparation_key(p), session.task, patients, labels.tolist(),
                      data_hash(site.root)])
    memo = session.cache.get(key)
    if memo is None:
        from client.stages.patients import progress

        memo = prepare(site.root / CACHE, patients, site.image_paths, labels, p,
                       site.config.mask_label, progress(session, p.model))
        for patient, reason in memo.failed.items():
            session.log_exclusion(patient, f"{p.model} image preparation: {reason}")
        session.cache[key] = memo
    data = ModelData(memo.patients, memo.y, memo.x, memo.mask, memo.owner, None, memo.failed,
                     memo.failed_by_reason)
    if "train" in site.config.roles:
        data.folds, _ = site_folds(data.y, p.folds, p.seed, session.site_id,
                                   site.config.privacy.difference)
    return data


def cnn_excluded(session: SiteSession, data: ModelData) -> list:
    """The `excluded` statistic of a CNN stage's reply: the patients left out for their
    images, by category — at loading (client.site.images) and at preparation."""
    from client.stages.patients import excluded_statistic

    counts = Counter(data.failed_by_reason)
    for reasons in session.site.excluded.values():
        found = [category_of(reason) for reason in reasons.split("; ")]
        category = next((c for c in found if c is not None), None)
        if category is not None:
            counts[category] += 1
    return excluded_statistic(counts, session)


def unit_rows(data: ModelData, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(training patients, validation patients) of a unit, as boolean masks over patients:
    CV fold `f<k>` trains on the other folds and validates on fold k; DSFR's `all` trains on
    every fold but 0 and validates on fold 0."""
    if data.folds is None:
        raise ValueError("this site has no training rows (role external)")
    held = 0 if unit == DSFR_UNIT else int(unit[1:])
    return data.folds != held, data.folds == held


def concat(parts: list[ModelData]) -> ModelData:
    """Several sites' data as one (the pooled reference); each keeps its own folds."""
    offsets = np.cumsum([0] + [len(d.patients) for d in parts[:-1]])
    return ModelData(
        patients=np.concatenate([d.patients for d in parts]),
        y=np.concatenate([d.y for d in parts]),
        x=np.concatenate([d.x for d in parts]),
        mask=np.concatenate([d.mask for d in parts]),
        owner=np.concatenate([d.owner + o for d, o in zip(parts, offsets, strict=True)]),
        folds=np.concatenate([d.folds for d in parts]) if all(
            d.folds is not None for d in parts) else None,
        failed={k: v for d in parts for k, v in d.failed.items()},
        failed_by_reason=dict(sum((Counter(d.failed_by_reason) for d in parts), Counter())))
