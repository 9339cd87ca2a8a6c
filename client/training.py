"""Site side of the CNN stages (`dsfr`, `deep`): prepare the tumour crops, train the global
model locally for a round, validate it, score patients, extract DSFR features, Grad-CAM.

Messages (see shared/schema.py):
- `query.train_setup`: which patients can serve the model, the training rows' label counts
  (small counts suppressed) and the site's device (a fact, not patient data).
- `train.<model>`: the global weights of every unit (CV fold `f<k>`, or `all` for DSFR) in
  the ArrayRecord. The site first validates the weights it received on its held-out rows
  (the unit's fold; for DSFR a fixed validation split), then trains each unit for
  `local_steps` optimizer steps (or `epochs` local epochs) and replies with the update
  (local − received) in the wire dtype. With pretrained weights, round 1 also checks that
  the received weights are the site's own copy of the file.
- `evaluate.<model>`: the validation half alone (after the last round).
- `query.train_score`: the chosen fold models; each training patient is scored by the
  model of the fold that held it out (out-of-fold), an external site's patients by the mean
  of the fold models. Probabilities go to `<site>/predictions/<model>-<run>.csv`, Grad-CAM
  maps of a few patients to `<site>/gradcam/<model>-<run>/`; only coarsened
  label-stratified histograms and validation sums leave.
- `query.dsfr_features`: the U-Net's chosen weights; per patient the feature maps of the
  chosen ReLU layer on its tumour slices, global-average-pooled, K-means (k=2, seeded) over
  slices, larger cluster averaged; the table is kept at the site for the radiomics
  machinery (`client.radiomics` with source `dsfr`), only its column names leave.

A weight update is a statistic over the patients trained on: the guard refuses it when
they are fewer than `min_patients` (the server then averages the other sites).

State between messages lives on the site's disk (in the Simulation Engine consecutive
messages of one site may run in different processes): each patient's prepared inputs
(client/imaging.py's data path) in `cache/training/<model>/<key>.npz` (keyed by the
preparation settings and the patient's image files), FedBN's local normalization layers
per unit and round in `cache/training/<train-id>/`.
Every random draw (shuffling, augmentation, Mixup, dropout) comes from a generator seeded
by (seed, site, model, unit, round), so a round replayed after a crash gives the same
update. Optimizer state starts afresh each round (the server holds no client state).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from client import imaging
from client.guard import Statistic, suppress_small
from client.session import SiteSession
from shared import fedavg, networks, pretrained, roc
from shared.folds import stratified_folds
from shared.schema import Payload, nest
from shared.training_params import DSFR_UNIT, NAME, TrainParams

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS

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

    def samples(self, patients: np.ndarray) -> np.ndarray:
        """Sample indices of the patients where `patients` (bool, (P,)) is true."""
        return np.flatnonzero(patients[self.owner])


# --------------------------------------------------------------------------- devices


def pick_device(wanted: str) -> torch.device:
    """`auto`: CUDA when this machine has it, else CPU. `cuda` without a GPU is an error."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but this site has no CUDA GPU")
    if wanted in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def amp_dtype(device: torch.device, wanted: str) -> torch.dtype | None:
    """Autocast dtype on CUDA: bf16 where the GPU supports it, else fp16 (`auto`); None on
    CPU or with `off`."""
    if device.type != "cuda" or wanted == "off":
        return None
    if wanted == "fp16":
        return torch.float16
    if wanted == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def device_info() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "name": torch.cuda.get_device_name(0) if cuda else "cpu",
            "count": torch.cuda.device_count() if cuda else 0,
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
            "torch": torch.__version__}


def set_determinism(on: bool, device: torch.device) -> None:
    """Deterministic kernels on CUDA (cuDNN, cuBLAS); CPU kernels already are, for a given
    thread count (and `torch.use_deterministic_algorithms` costs seconds of imports)."""
    if device.type != "cuda":
        torch.set_flush_denormal(True)  # tiny focal-loss gradients: no subnormal slow path
        return
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def round_seed(seed: int, site: str, model: str, unit: str, round_no: int) -> int:
    key = json.dumps([seed, site, model, unit, round_no]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------- data


PREP_FORMAT = 3  # bump when the data path changes: old per-patient cache files are ignored


def prepare_patient(found: dict[str, Path], p: TrainParams) -> imaging.Prepared:
    """One patient's inputs for model `p.model` (client/imaging.py's data path)."""
    image_kind, mask_kind = IMAGE_KINDS[p.model]
    make = {"dsfr": imaging.tumour_slices, "dl_mri": imaging.mri_roi,
            "dl_us": imaging.us_roi}[p.model]
    return make(found[image_kind], found[mask_kind], preparation(p))


def preparation_key(p: TrainParams) -> str:
    """What a prepared input depends on besides the image files."""
    return json.dumps([PREP_FORMAT, p.model, asdict(preparation(p))], sort_keys=True)


def patient_cache_file(folder: Path, found: dict[str, Path], p: TrainParams) -> Path:
    """`cache/training/<model>/<key>.npz`: the key covers the preparation settings and the
    patient's image and mask files (name, size, modification time)."""
    digest = hashlib.sha256(preparation_key(p).encode())
    for kind in IMAGE_KINDS[p.model]:
        path = Path(found[kind])
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return folder / p.model / f"{digest.hexdigest()[:32]}.npz"


def cached_patient(folder: Path, found: dict[str, Path], p: TrainParams) -> imaging.Prepared:
    """The patient's prepared inputs from the site's cache, made and cached if absent."""
    image_kind, mask_kind = IMAGE_KINDS[p.model]
    if image_kind not in found or mask_kind not in found:
        raise ValueError(f"no {image_kind} image with mask")
    path = patient_cache_file(folder, found, p)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as saved:
                return imaging.Prepared(saved["x"], saved["mask"], float(saved["mm"]))
        except (OSError, KeyError, ValueError):
            path.unlink(missing_ok=True)  # a torn file: make it again
    prepared = prepare_patient(found, p)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, x=prepared.x, mask=prepared.mask, mm=np.float64(prepared.mm_per_voxel))
    os.replace(tmp, path)
    return prepared


def prepare(folder: Path, patients: list[str], paths: Callable[[str], dict[str, Path]],
            y: np.ndarray, p: TrainParams) -> ModelData:
    """Every patient's inputs for model `p.model` (cached per patient under `folder`); a
    patient whose images cannot be prepared is left out with the reason (never silently)."""
    xs, masks, owner, kept, labels, failed = [], [], [], [], [], {}
    for i, patient in enumerate(patients):
        try:
            prepared = cached_patient(folder, paths(patient), p)
        except Exception as err:  # one bad patient never stops the site
            failed[patient] = f"{type(err).__name__}: {err}"
            continue
        xs.append(prepared.x)
        masks.append(prepared.mask)
        owner += [len(kept)] * len(prepared.x)
        kept.append(patient)
        labels.append(int(y[i]))
    dims = (1, p.size, p.size) + ((p.size,) if p.model == "dl_mri" else ())
    return ModelData(
        patients=np.asarray(kept, dtype=str), y=np.asarray(labels, dtype=np.int64),
        x=np.concatenate(xs) if xs else np.zeros((0, *dims), np.float32),
        mask=np.concatenate(masks) if masks else np.zeros((0, *dims), np.uint8),
        owner=np.asarray(owner, dtype=np.int64), failed=failed)


def site_data(session: SiteSession, p: TrainParams) -> ModelData:
    """The site's prepared samples (each patient's cached on the site's disk; the whole set
    kept in the session while the site's data are unchanged), with its folds for `p`."""
    from client.handshake import data_hash

    site = session.site
    patients = [str(i) for i in site.clinical.index]
    labels = session.labels()
    key = json.dumps([preparation_key(p), session.task, patients, labels.tolist(),
                      data_hash(site.root)])
    memo = session.cache.get(key)
    if memo is None:
        memo = prepare(site.root / CACHE, patients, site.image_paths, labels, p)
        for patient, reason in memo.failed.items():
            session.log_exclusion(patient, f"{p.model} image preparation: {reason}")
        session.cache[key] = memo
    data = ModelData(memo.patients, memo.y, memo.x, memo.mask, memo.owner, None, memo.failed)
    if "train" in site.config.roles:
        data.folds = stratified_folds(data.y, p.folds, p.seed, session.site_id)
    return data


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
        failed={k: v for d in parts for k, v in d.failed.items()})


# --------------------------------------------------------------------------- weights


def build(p: TrainParams, device: torch.device) -> nn.Module:
    return p.spec().build(p.seed).to(device)


def shared_keys(net: nn.Module, p: TrainParams) -> list[str]:
    """State keys that travel and are averaged (all but normalization layers with FedBN)."""
    local = networks.norm_keys(net) if p.fedbn else set()
    return [k for k in net.state_dict() if k not in local]


def load_weights(net: nn.Module, received: dict[str, np.ndarray],
                 local: dict[str, np.ndarray] | None) -> None:
    state = net.state_dict()
    merged = dict(local or {})
    merged.update(received)
    missing = [k for k in merged if k not in state]
    if missing:
        raise ValueError(f"weights for unknown keys {missing[:3]}")
    for key, value in merged.items():
        target = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"weight {key}: shape {tuple(value.shape)} is not "
                             f"{tuple(target.shape)}")
        state[key] = torch.from_numpy(np.asarray(value)).to(target.dtype)
    net.load_state_dict(state)


def numpy_state(net: nn.Module, keys: list[str] | set[str]) -> dict[str, np.ndarray]:
    state = net.state_dict()
    return {k: state[k].detach().cpu().numpy().copy() for k in keys}


def received_weights(query: Payload, unit: str, p: TrainParams,
                     like: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The unit's global weights in the message, for the keys in `like` (the shared keys:
    with FedBN, normalization layers in a message are ignored), as float32."""
    raw = nest(query, f"w.{unit}")
    if not raw:
        raise ValueError(f"no weights for unit {unit!r} in the message")
    missing = [k for k in like if k not in raw]
    if missing:
        raise ValueError(f"the message lacks weights {missing[:3]} for unit {unit!r}")
    return fedavg.decode({k: raw[k] for k in like}, p.wire,
                         like={k: v.cpu().numpy() for k, v in like.items()})


def local_state_path(state_dir: Path, p: TrainParams, unit: str, round_no: int) -> Path:
    return state_dir / p.train_id / f"{p.model}-{unit}-r{round_no}.npz"


def load_local(state_dir: Path, p: TrainParams, unit: str,
               round_no: int) -> dict[str, np.ndarray] | None:
    """FedBN: this site's own normalization layers after round `round_no` (None: initial)."""
    if not p.fedbn or round_no <= 0:
        return None
    path = local_state_path(state_dir, p, unit, round_no)
    if not path.is_file():
        raise ValueError(f"FedBN: no local normalization state for {unit} after round "
                         f"{round_no} at this site")
    with np.load(path, allow_pickle=False) as saved:
        return {k: saved[k] for k in saved.files}


def save_local(state_dir: Path, p: TrainParams, unit: str, round_no: int,
               net: nn.Module) -> None:
    if not p.fedbn:
        return
    path = local_state_path(state_dir, p, unit, round_no)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **numpy_state(net, networks.norm_keys(net)))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- losses


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float,
               reduction: str = "mean") -> torch.Tensor:
    """Binary focal loss (Lin et al.), per pixel: −α_t (1 − p_t)^γ log p_t."""
    target = target.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    loss = alpha_t * (1 - p_t) ** gamma * ce
    return loss.mean() if reduction == "mean" else loss.flatten(1).mean(dim=1)


def classification_loss(logits: torch.Tensor, target: torch.Tensor,
                        p: TrainParams) -> torch.Tensor:
    """Class-weighted BCE (pos_weight = negatives/positives), on smoothed targets."""
    target = target.to(logits.dtype)
    if p.smoothing:
        target = target * (1 - p.smoothing) + 0.5 * p.smoothing
    weight = torch.tensor(p.pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.view(-1), target.view(-1),
                                              pos_weight=weight)


# --------------------------------------------------------------------------- training


def _optimizer(net: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    params = [q for q in net.parameters() if q.requires_grad]
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum,
                               weight_decay=p.weight_decay)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    return torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)


def _batches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Batches of `size`; a last batch of one joins the previous one (BatchNorm needs two)."""
    chunks = list(torch.split(order, size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def local_batches(samples: np.ndarray, p: TrainParams,
                  gen: torch.Generator) -> list[np.ndarray]:
    """The round's batches: `p.local_steps` batches when set (reshuffling at each pass over
    the samples, so a small site still moves the model each round), else `p.epochs`
    passes."""
    batches: list[np.ndarray] = []
    passes = 0
    while len(samples) and (len(batches) < p.local_steps if p.local_steps
                            else passes < p.epochs):
        order = torch.from_numpy(samples)[torch.randperm(len(samples), generator=gen)]
        batches += [b.numpy() for b in _batches(order, p.batch_size)]
        passes += 1
    return batches[:p.local_steps] if p.local_steps else batches


def train_unit(net: nn.Module, data: ModelData, samples: np.ndarray, p: TrainParams,
               device: torch.device, gen: torch.Generator,
               anchor: dict[str, torch.Tensor] | None) -> tuple[float, int]:
    """Local training on `samples` (`local_batches`); returns (mean training loss, steps)."""
    dtype = amp_dtype(device, p.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    optimizer = _optimizer(net, p)
    spatial = data.x.ndim - 2
    augmenter = imaging.augmenter(spatial, p.size) if p.augment and p.model != "dsfr" else None
    net.train()
    total, steps = 0.0, 0
    for idx in local_batches(samples, p, gen):
        x = torch.from_numpy(data.x[idx])
        if p.model == "dsfr":
            target = torch.from_numpy(data.mask[idx]).float()
        else:
            target = torch.from_numpy(data.y[data.owner[idx]]).float()
            if augmenter is not None:
                seeds = torch.randint(2**31, (len(idx),), generator=gen).tolist()
                x = imaging.augment(x, seeds, augmenter)
            if p.mix:
                x, target = imaging.mix_batch(x, target,
                                              int(torch.randint(2**31, (1,), generator=gen)))
        x, target = x.to(device), target.to(device)
        autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype
                    else nullcontext())
        with autocast:
            logits = net(x)
            if p.model == "dsfr":
                loss = focal_loss(logits.float(), target, p.focal_alpha, p.focal_gamma)
            else:
                loss = classification_loss(logits.float(), target, p)
        if anchor is not None and p.strategy == "fedprox" and p.mu > 0:
            prox = sum(((w - anchor[n]) ** 2).sum() for n, w in net.named_parameters()
                       if n in anchor)
            loss = loss + 0.5 * p.mu * prox
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1), steps


@torch.no_grad()
def predict(net: nn.Module, x: np.ndarray, device: torch.device, p: TrainParams,
            batch: int = 32) -> np.ndarray:
    """Logits of the samples (eval mode; for DSFR the per-pixel logits)."""
    net.eval()
    dtype = amp_dtype(device, p.amp)
    out = []
    for start in range(0, len(x), batch):
        xb = torch.from_numpy(x[start:start + batch]).to(device)
        with torch.autocast(device_type=device.type, dtype=dtype) if dtype else nullcontext():
            out.append(net(xb).float().cpu())
    if not out:
        return np.zeros((0,), np.float32)
    return torch.cat(out).numpy()


def dice_per_patient(logits: np.ndarray, masks: np.ndarray,
                     owner: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patient (over its slices): Dice at 0.5, intersection, |pred| + |mask|."""
    pred = logits > 0
    truth = masks > 0
    inter = np.bincount(owner, weights=(pred & truth).reshape(len(pred), -1).sum(axis=1))
    total = np.bincount(owner, weights=(pred.reshape(len(pred), -1).sum(axis=1)
                                        + truth.reshape(len(truth), -1).sum(axis=1)))
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    return dice, inter, total


# --------------------------------------------------------------------------- a round


def validate(nets: dict[str, nn.Module], data: ModelData, p: TrainParams,
             device: torch.device, min_cell: int) -> list[Statistic]:
    """Validation of the received weights on the held-out rows of every unit (each patient
    once: by the unit that holds it out). Deep models: BCE sum and label-stratified
    histograms of the probabilities (AUC); DSFR: focal loss and Dice on the validation
    patients' tumour slices."""
    if data.folds is None:
        return []
    if p.model == "dsfr":
        _, val = unit_rows(data, DSFR_UNIT)
        samples = data.samples(val)
        logits = predict(nets[DSFR_UNIT], data.x[samples], device, p)
        if not len(samples):
            return []
        loss = focal_loss(torch.from_numpy(logits), torch.from_numpy(data.mask[samples]),
                          p.focal_alpha, p.focal_gamma, reduction="none").numpy()
        local_owner = np.unique(data.owner[samples], return_inverse=True)[1]
        dice, inter, total = dice_per_patient(logits, data.mask[samples], local_owner)
        return [Statistic("val", {"loss_sum": float(loss.sum()), "n_slices": len(samples),
                                  "dice_sum": float(dice.sum()), "n": len(dice),
                                  "inter": float(inter.sum()), "total": float(total.sum())},
                          n=len(dice))]
    probs = np.full(len(data.patients), np.nan)
    for unit in p.units:
        _, val = unit_rows(data, unit)
        samples = data.samples(val)
        if len(samples):
            logits = predict(nets[unit], data.x[samples], device, p).reshape(-1)
            probs[data.owner[samples]] = 1 / (1 + np.exp(-logits))
    seen = ~np.isnan(probs)
    return [Statistic("val", {"loss_sum": _bce_sum(probs[seen], data.y[seen]),
                              "n": int(seen.sum())}, n=int(seen.sum())),
            *histograms(probs[seen], data.y[seen], min_cell)]


def _bce_sum(probs: np.ndarray, y: np.ndarray) -> float:
    q = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.sum(y * np.log(q) + (1 - y) * np.log(1 - q)))


def histograms(scores: np.ndarray, y: np.ndarray, min_cell: int,
               bins: int = roc.DEFAULT_BINS) -> list[Statistic]:
    """Per label, the scores' histogram on the shared grid, coarsened to min_cell."""
    hist = roc.local_histogram(scores, y, roc.grid(bins))
    out = []
    for label in (0, 1):
        first, last, counts = roc.coarsen(hist[label], min_cell)
        out.append(Statistic(f"hist{label}", {"first": first, "last": last, "count": counts},
                             n=int(np.sum(y == label)), counts=("count",)))
    return out


def run_round(data: ModelData, p: TrainParams, query: Payload, state_dir: Path, site: str,
              *, train: bool, min_cell: int, site_root: Path | None = None) -> list[Statistic]:
    """Validate the received weights, then (train=True) train every unit and return its
    update. The core of `train.<model>` / `evaluate.<model>`, also run by the pooled
    reference on all sites' data at once."""
    started = time.perf_counter()
    device = pick_device(p.device)
    set_determinism(p.deterministic, device)
    nets, starts = {}, {}
    file: dict[str, np.ndarray] | None = None  # the pretrained file's weights (round 1)
    if p.pretrained and p.round == 1 and site_root is not None:
        file = pretrained_weights(p, site_root)
    for unit in p.units:
        net = build(p, device)
        state = net.state_dict()  # once: state_dict() walks every module
        received = received_weights(query, unit, p, {k: state[k] for k in shared_keys(net, p)})
        local = load_local(state_dir, p, unit, p.round - 1)
        if file is not None:  # every unit starts from the file (w_0)
            local_keys = check_pretrained(file, p, received)
            local = local_keys if p.fedbn else None
        load_weights(net, received, local)
        nets[unit], starts[unit] = net, received
    out = validate(nets, data, p, device, min_cell)
    if train:
        if data.folds is None:
            raise ValueError("an external site does not train")
        for unit in p.units:
            rows, _ = unit_rows(data, unit)
            samples = data.samples(rows)
            gen = torch.Generator().manual_seed(round_seed(p.seed, site, p.model, unit,
                                                           p.round))
            torch.manual_seed(round_seed(p.seed, site, p.model, unit, p.round))
            net = nets[unit]
            anchor = {n: w.detach().clone() for n, w in net.named_parameters()
                      if n in starts[unit]} if p.strategy == "fedprox" else None
            loss, steps = train_unit(net, data, samples, p, device, gen, anchor)
            save_local(state_dir, p, unit, p.round, net)
            after = numpy_state(net, list(starts[unit]))
            update = {k: (after[k] - starts[unit][k] if np.issubdtype(after[k].dtype,
                                                                      np.floating)
                          else after[k]) for k in after}
            values: dict[str, Any] = {f"delta.{k}": v for k, v in
                                      fedavg.encode(update, p.wire).items()}
            values.update(n=int(rows.sum()), samples=len(samples), loss=loss, steps=steps)
            out.append(Statistic(unit, values, n=int(rows.sum())))
    out.append(Statistic("device", {"type": device.type, "amp": str(amp_dtype(device, p.amp)),
                                    "seconds": time.perf_counter() - started,
                                    "wire": p.wire}, n=None))
    return out


def _params(query: Payload) -> TrainParams:
    return TrainParams.from_query(query)


def _state_dir(session: SiteSession) -> Path:
    return session.site.root / CACHE


def train_round(session: SiteSession, query: Payload) -> list[Statistic]:
    """`train.<model>`: validate the received global weights, train, send the updates."""
    p = _params(query)
    return run_round(site_data(session, p), p, query, _state_dir(session), session.site_id,
                     train=True, min_cell=session.site.config.privacy.min_cell_count,
                     site_root=session.site.root)


def evaluate_round(session: SiteSession, query: Payload) -> list[Statistic]:
    """`evaluate.<model>`: validation of the received global weights only."""
    p = _params(query)
    return run_round(site_data(session, p), p, query, _state_dir(session), session.site_id,
                     train=False, min_cell=session.site.config.privacy.min_cell_count)


# --------------------------------------------------------------------------- setup


def train_setup(session: SiteSession, query: Payload) -> list[Statistic]:
    """Which of the site's patients can serve the model (they have its images), the label
    counts of its training rows (small counts suppressed), its roles and its device.

    Crosses the wire: counts (suppressed below min_cell_count), roles, a hash of the site's
    files (as the handshake's), the device (CUDA or not, GPU name, bf16 support)."""
    from client.handshake import data_hash

    policy = session.site.config.privacy
    labels = session.labels()
    counts = {"n": np.array([suppress_small(len(labels), policy)], dtype=np.int64),
              "labels": np.array([suppress_small(int(np.sum(labels == g)), policy)
                                  for g in (0, 1)], dtype=np.int64)}
    return [Statistic("setup", {"roles": list(session.site.config.roles),
                                "data_sha256": data_hash(session.site.root),
                                "usable": len(labels) > 0}, n=None),
            Statistic("counts", counts, n=None, counts=tuple(counts)),
            Statistic("device", {k: v for k, v in device_info().items()}, n=None),
            *pretrained_hash(session, str(query.get("pretrained", "") or ""))]


def pretrained_hash(session: SiteSession, path: str) -> list[Statistic]:
    """The sha256 of the site's copy of the pretrained file, or why there is none (a
    reason naming the file: missing, unreadable, not a weights file)."""
    if not path:
        return []
    try:
        target = pretrained.resolve(path, session.site.root)
        if not target.is_file():
            raise ValueError(f"pretrained file {path} is missing at this site ({target})")
        values = {"sha256": pretrained.file_sha256(target), "error": ""}
    except (OSError, ValueError) as err:
        values = {"sha256": "", "error": str(err)}
    return [Statistic("pretrained", values, n=None)]


def pretrained_weights(p: TrainParams, root: Path) -> dict[str, np.ndarray]:
    """The site's own copy of the pretrained file, as the network's state."""
    probe = build(p, torch.device("cpu"))
    pretrained.load_into(p.model, probe, pretrained.resolve(p.pretrained, root))
    return numpy_state(probe, list(probe.state_dict()))


def check_pretrained(mine: dict[str, np.ndarray], p: TrainParams,
                     received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Round 1 with pretrained weights: the global weights the site received must be its
    own file's (as the wire dtype carries them); returns the file's values of the keys
    that are not sent (FedBN's local layers)."""
    expected = fedavg.decode(fedavg.encode({k: mine[k] for k in received}, p.wire), p.wire,
                             like=mine)
    differ = [k for k in received if not np.array_equal(expected[k], received[k])]
    if differ:
        raise ValueError(f"the round-1 weights differ from this site's pretrained file "
                         f"{p.pretrained} (e.g. {differ[0]})")
    return {k: v for k, v in mine.items() if k not in received}


# --------------------------------------------------------------------------- scoring


def unit_probabilities(data: ModelData, p: TrainParams, query: Payload, state_dir: Path,
                       device: torch.device) -> tuple[np.ndarray, str, dict[str, nn.Module]]:
    """Out-of-fold probabilities at a training site, mean over units at an external one."""
    nets: dict[str, nn.Module] = {}
    per_unit = {}
    for unit in p.units:
        net = build(p, device)
        state = net.state_dict()  # once: state_dict() walks every module
        received = received_weights(query, unit, p, {k: state[k] for k in shared_keys(net, p)})
        local = load_local(state_dir, p, unit, p.round) if data.folds is not None else None
        load_weights(net, received, local)
        nets[unit] = net
        logits = predict(net, data.x, device, p).reshape(-1)
        per_unit[unit] = 1 / (1 + np.exp(-logits))
    if data.folds is not None:
        units = np.array([f"f{k}" for k in data.folds[data.owner]])
        sample_probs = np.array([per_unit[u][i] for i, u in enumerate(units)])
        kind = "out-of-fold"
    else:
        sample_probs = np.mean([per_unit[u] for u in p.units], axis=0)
        kind = "external"
    probs = np.zeros(len(data.patients))
    probs[data.owner] = sample_probs  # one sample per patient for the deep models
    return probs, kind, nets


def score_data(data: ModelData, p: TrainParams, query: Payload, state_dir: Path,
               min_cell: int) -> tuple[list[Statistic], np.ndarray, str, dict]:
    device = pick_device(p.device)
    set_determinism(p.deterministic, device)
    probs, kind, nets = unit_probabilities(data, p, query, state_dir, device)
    stats = [Statistic("val", {"loss_sum": _bce_sum(probs, data.y), "n": len(probs)},
                       n=len(probs)),
             *histograms(probs, data.y, min_cell),
             Statistic("scores", {"kind": kind}, n=None)]
    return stats, probs, kind, nets


def train_score(session: SiteSession, query: Payload) -> list[Statistic]:
    """Score every patient with the chosen fold models; probabilities stay at the site
    (`predictions/<name>-<run>.csv`), Grad-CAM maps of a few patients are written at the
    site (`gradcam/<name>-<run>/`). Crosses the wire: coarsened label-stratified
    histograms of the probabilities, the BCE sum, the number of maps written."""
    p = _params(query)
    data = site_data(session, p)
    name = _checked_name(str(query.get("name", p.model)))
    run_id = _run_label(query)
    stats, probs, kind, nets = score_data(data, p, query, _state_dir(session),
                                          session.site.config.privacy.min_cell_count)
    folder = session.site.root / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"patient_id": data.patients, "model": name, "score": probs,
                  "kind": kind}).to_csv(folder / f"{name}-{run_id}.csv", index=False)
    written = gradcam(data, p, nets, session.site.root / "gradcam" / f"{name}-{run_id}",
                      int(query.get("gradcam", 0)), pick_device(p.device))
    stats.append(Statistic("gradcam", {"written": written}, n=None))
    return stats


def _checked_name(name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"bad model name {name!r}")
    return name


def _run_label(query: Payload) -> str:
    run = re.sub(r"[^A-Za-z0-9_-]", "_", str(query.get("run_id", "") or "local"))
    return run[:64]


# --------------------------------------------------------------------------- Grad-CAM


def gradcam(data: ModelData, p: TrainParams, nets: dict[str, nn.Module], folder: Path,
            count: int, device: torch.device) -> int:
    """Grad-CAM (MONAI) of the positive logit for the first `count` patients (ids in order),
    each from the model that scored it; PNG overlays written at the site, never sent."""
    if count <= 0 or p.model == "dsfr" or not len(data.patients):
        return 0
    from monai.visualize import GradCAM
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in np.argsort(data.patients)[:count]:
        unit = (f"f{int(data.folds[index])}" if data.folds is not None else p.units[0])
        net = nets[unit]
        net.eval()
        sample = int(np.flatnonzero(data.owner == index)[0])
        x = torch.from_numpy(data.x[sample:sample + 1]).to(device)
        with torch.enable_grad():
            cam = GradCAM(nn_module=net, target_layers=networks.gradcam_layer(p.model))
            heat = cam(x=x, class_idx=0).detach().float().cpu().numpy()[0, 0]
        image = data.x[sample, 0]
        if image.ndim == 3:  # the axial slice with the most tumour
            z = int(np.argmax(data.mask[sample, 0].reshape(image.shape[0], -1).sum(axis=1)))
            image, heat = image[z], heat[z]
        Image.fromarray(_overlay(image, heat)).resize((256, 256)).save(
            folder / f"{data.patients[index]}.png")
        written += 1
    return written


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    lo, hi = np.percentile(image, [1, 99])
    gray = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    blend = 0.6 * np.repeat(gray[..., None], 3, axis=-1) + 0.4 * colour
    return (np.clip(blend, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- DSFR features


def dsfr_vectors(net: nn.Module, data: ModelData, layer: str, device: torch.device,
                 p: TrainParams, seed: int) -> np.ndarray:
    """(patients × channels): feature maps of `layer` per tumour slice, global-average-
    pooled; per patient K-means (k=2, seeded) over its slices, the larger cluster's mean
    (ties: the cluster holding more tumour pixels; under 3 slices: the mean of all)."""
    from sklearn.cluster import KMeans

    hook = networks.FeatureHook(net, layer)
    try:
        pooled = []
        net.eval()
        with torch.no_grad():
            for start in range(0, len(data.x), 32):
                net(torch.from_numpy(data.x[start:start + 32]).to(device))
                assert hook.output is not None
                pooled.append(hook.output.float().mean(dim=(-2, -1)).cpu().numpy())
    finally:
        hook.close()
    gap = np.concatenate(pooled) if pooled else np.zeros((0, networks.relu_channels(net, layer)))
    area = data.mask.reshape(len(data.mask), -1).sum(axis=1)
    out = np.zeros((len(data.patients), gap.shape[1]))
    for i in range(len(data.patients)):
        rows = np.flatnonzero(data.owner == i)
        vectors = gap[rows]
        if len(rows) < 3:
            out[i] = vectors.mean(axis=0)
            continue
        labels = KMeans(n_clusters=2, random_state=seed, n_init=10).fit_predict(vectors)
        sizes = np.bincount(labels, minlength=2)
        if sizes[0] == sizes[1]:
            keep = int(np.argmax([area[rows][labels == c].sum() for c in (0, 1)]))
        else:
            keep = int(np.argmax(sizes))
        out[i] = vectors[labels == keep].mean(axis=0)
    return out


def dsfr_features(session: SiteSession, query: Payload) -> list[Statistic]:
    """DSFR features of every patient with the chosen U-Net weights, kept at the site as
    the rows of the `dsfr` selection/LR head (client.radiomics state, source `dsfr`).

    Crosses the wire: the feature names (layer and channel, the same at every site), the
    roles and the number of patients (a count over ≥ min_patients)."""
    from client import radiomics

    p = _params(query)
    data = site_data(session, p)
    layer = str(query.get("layer", networks.DSFR_LAYER))
    source = _checked_name(str(query.get("source", "dsfr")))
    device = pick_device(p.device)
    set_determinism(p.deterministic, device)
    net = build(p, device)
    keys = shared_keys(net, p)
    received = received_weights(query, DSFR_UNIT, p, {k: net.state_dict()[k] for k in keys})
    is_train = "train" in session.site.config.roles
    load_weights(net, received, load_local(_state_dir(session), p, DSFR_UNIT, p.round)
                 if is_train else None)
    vectors = dsfr_vectors(net, data, layer, device, p, p.seed)
    names = [f"dsfr_{layer}_c{c:04d}" for c in range(vectors.shape[1])]
    folds = (stratified_folds(data.y, int(query["cv-folds"]), int(query["seed"]),
                              session.site_id) if is_train else None)
    state = radiomics.RadiomicsData(patients=pd.Index(data.patients), r1=vectors, r2=None,
                                    y=data.y, folds=folds)
    radiomics.save_state(session, str(query.get("run_id", "")), state, source=source)
    policy = session.site.config.privacy
    return [Statistic("features", {"names": names, "source": source,
                                   "roles": list(session.site.config.roles)},
                      n=len(data.patients)),
            Statistic("counts", {"n_extracted": np.array([suppress_small(len(data.patients),
                                                                         policy)]),
                                 "n_failed": np.array([suppress_small(len(data.failed),
                                                                      policy)]),
                                 "n_reader2": np.array([0])},
                      n=None, counts=("n_extracted", "n_failed", "n_reader2"))]
