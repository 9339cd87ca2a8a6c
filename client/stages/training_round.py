"""One round of a CNN stage at the site (`client.stages.training`'s `train.<model>` and
`evaluate.<model>`, and the pooled reference of simulation/pooled_site.py): the received
weights validated on the held-out rows of every unit, then each unit trained locally and its
update (local − received) made a statistic; with pretrained weights, round 1 checks that
the received weights are the site's own copy of the file.

A weight update is a statistic over the patients its local steps used (`n`; local steps ×
batch size may touch a few of the unit's patients): the site does not train a unit whose
batches are smaller than its `min_batch_size` or whose update would rest on fewer than its
`min_update_patients` (refused with the reason; the server averages the other sites), and
the guard refuses it over fewer than `min_patients`. The training loss leaves only inside
that statistic (an aggregate over ≥ min_patients). A batch of one with the head zeroed
would make the head's update one patient's embedding and the loss her label (issue 25).

State between messages lives on the site's disk (in the Simulation Engine consecutive
messages of one site may run in different processes): each patient's prepared inputs
(client/local/imaging.py's data path) in `cache/training/<model>/<key>.npz` (keyed by the
preparation settings and the patient's image files), FedBN's local normalization layers
per unit and round in `cache/training/<train-id>/`.
Every random draw (shuffling, augmentation, Mixup, dropout) comes from a generator seeded
by (seed, site, model, unit, round), so a round replayed after a crash gives the same
update. Optimizer state starts afresh each round (the server holds no client state).

One unit's network at the site (device and determinism, the round's seeds, weights in and
out, FedBN's local state, the losses, the local optimizer loop) is client/local/local_training.py;
the patients' data path client/local/training_data.py.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.egress.guard import Statistic
from client.local.dp import SiteDP
from client.local.local_training import (
    amp_dtype,
    build,
    flushing_denormals,
    focal_loss,
    load_local,
    load_weights,
    local_batches,
    numpy_state,
    pick_device,
    received_weights,
    round_seed,
    save_local,
    set_determinism,
    shared_keys,
    train_unit,
)
from client.local.training_data import ModelData, unit_rows
from client.site.config import SiteConfig, parse_config
from client.site.files import site_file
from neural import pretrained
from shared import disclosure, fedavg, roc
from shared.policy import PrivacyPolicy
from shared.schema import Payload
from shared.training_params import DSFR_UNIT, TrainParams

# --------------------------------------------------------------------------- prediction


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
                          n=len(dice), patients=patient_ids(data, val),
                          family=round_family(p, nets_digest(nets)))]
    probs = np.full(len(data.patients), np.nan)
    for unit in p.units:
        _, val = unit_rows(data, unit)
        samples = data.samples(val)
        if len(samples):
            logits = predict(nets[unit], data.x[samples], device, p).reshape(-1)
            probs[data.owner[samples]] = 1 / (1 + np.exp(-logits))
    seen = ~np.isnan(probs)
    family = round_family(p, nets_digest(nets))
    return ledgered([Statistic("val", {"loss_sum": bce_sum(probs[seen], data.y[seen]),
                                       "n": int(seen.sum())}, n=int(seen.sum())),
                     *histograms(probs[seen], data.y[seen], min_cell)],
                    data, seen, family)


def patient_ids(data: ModelData, rows: np.ndarray) -> list[str]:
    return [str(i) for i in np.asarray(data.patients)[rows]]


def round_family(p: TrainParams, weights: str, *parts: object) -> str:
    """The ledger family of a round's statistics: the model, the digest of the weights
    they are computed with (`weights_digest`, `nets_digest`) and `parts` — not the train id
    or round the server names, so a fresh train id or run is the same family."""
    return disclosure.family(f"train.{p.model}", weights, *parts)


def nets_digest(nets: dict[str, nn.Module]) -> str:
    """A digest of every unit's network state as loaded (received weights and FedBN's
    local layers): what a validation or score statistic is computed with."""
    return weights_digest({f"{unit}/{key}": value for unit in sorted(nets)
                           for key, value in numpy_state(nets[unit],
                                                         list(nets[unit].state_dict())).items()})


def ledgered(stats: list[Statistic], data: ModelData, rows: np.ndarray,
             family: str) -> list[Statistic]:
    """Statistics over the patients `rows`, for the ledger (a histogram: with its grid)."""
    patients, grid = patient_ids(data, rows), roc.grid(roc.DEFAULT_BINS)
    return [replace(s, patients=patients, family=f"{family}:hist", grid=grid)
            if s.name.startswith("hist") else replace(s, patients=patients,
                                                      family=f"{family}:{s.name}")
            for s in stats]


def bce_sum(probs: np.ndarray, y: np.ndarray) -> float:
    q = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.sum(y * np.log(q) + (1 - y) * np.log(1 - q)))


def histograms(scores: np.ndarray, y: np.ndarray, min_cell: int,
               bins: int = roc.DEFAULT_BINS) -> list[Statistic]:
    """Per label, the scores' histogram on the shared grid, coarsened to min_cell."""
    cells = roc.site_cells(scores, y, roc.grid(bins), len(y), min_cell)  # its resolution
    out = []
    for label in (0, 1):
        first, last, counts = cells[label]
        out.append(Statistic(f"hist{label}", {"first": first, "last": last, "count": counts},
                             n=int(np.sum(y == label)), counts=("count",)))
    return out


@flushing_denormals
def run_round(data: ModelData, p: TrainParams, query: Payload, state_dir: Path, site: str,
              *, train: bool, min_cell: int, site_root: Path | None = None,
              site_dp: SiteDP | None = None,
              policy: PrivacyPolicy | None = None) -> list[Statistic]:
    """Validate the received weights, then (train=True) train every unit and return its
    update. The core of `train.<model>` / `evaluate.<model>`, also run by the pooled
    reference on all sites' data at once (`policy` None: no site rules). `site_dp`
    (client/local/dp.py): the round's DP and the site's `require_dp` — the update is
    clipped/noised as asked or as the site requires, or refused. `policy`: a unit whose
    batches are smaller than min_batch_size or whose update would rest on fewer than
    min_update_patients patients is not trained, its update refused with the reason."""
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
            out.append(_train_one(unit, nets[unit], starts[unit], data, p, device, state_dir,
                                  site, site_dp, policy))
    out.append(Statistic("device", {"type": device.type, "amp": str(amp_dtype(device, p.amp)),
                                    "seconds": time.perf_counter() - started,
                                    "wire": p.wire}, n=None))
    return out


def _train_one(unit: str, net: nn.Module, start: dict[str, np.ndarray], data: ModelData,
               p: TrainParams, device: torch.device, state_dir: Path, site: str,
               site_dp: SiteDP | None, policy: PrivacyPolicy | None) -> Statistic:
    """One unit's local training and its update statistic over the patients it used."""
    rows, _ = unit_rows(data, unit)
    samples = data.samples(rows)
    gen = torch.Generator().manual_seed(round_seed(p.seed, site, p.model, unit, p.round))
    torch.manual_seed(round_seed(p.seed, site, p.model, unit, p.round))
    batches = local_batches(samples, p, gen)  # drawn first from `gen`, as train_unit would
    used = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    patients = np.zeros(len(data.patients), dtype=bool)
    patients[data.owner[used]] = True  # n: the patients the update rests on, not the rows
    family = round_family(p, weights_digest(start), "update")
    refused = update_refusal(p, int(patients.sum()), policy)
    if refused is not None:
        save_local(state_dir, p, unit, p.round, net)  # FedBN: the next round starts here
        return Statistic(unit, {}, n=int(patients.sum()), refused=refused,
                         patients=patient_ids(data, patients), family=family)
    anchor = {n: w.detach().clone() for n, w in net.named_parameters()
              if n in start} if p.strategy == "fedprox" else None
    loss, steps = train_unit(net, data, samples, p, device, gen, anchor, batches)
    save_local(state_dir, p, unit, p.round, net)
    after = numpy_state(net, list(start))
    update = {k: (after[k] - start[k] if np.issubdtype(after[k].dtype, np.floating)
                  else after[k]) for k in after}
    stat = _update(unit, update, site_dp, p.wire, n=int(patients.sum()),
                   samples=len(np.unique(used)), loss=loss, steps=steps,
                   min_patients=policy.min_patients if policy is not None else 1)
    return replace(stat, patients=patient_ids(data, patients), family=family)


def update_refusal(p: TrainParams, used: int, policy: PrivacyPolicy | None) -> str | None:
    """Why the site does not train a unit this round (None: it does): a batch size below
    its min_batch_size, or fewer patients behind the update than its min_update_patients
    (local steps × batch size can touch a few of the unit's patients). A batch of one
    patient with the head zeroed makes the head's update her embedding and the loss her
    label. (A pass's last batch holds what is left of the rows, possibly fewer: it is one
    step among the pass's, on an update that rests on ≥ min_update_patients patients.)"""
    if policy is None:
        return None
    if p.batch_size < policy.min_batch_size:
        return (f"batch size {p.batch_size} is below this site's min_batch_size "
                f"({policy.min_batch_size})")
    if used < policy.update_patients:
        return (f"the update would rest on {used} patients, fewer than this site's "
                f"min_update_patients ({policy.update_patients})")
    return None


def _update(unit: str, update: dict[str, np.ndarray], site_dp: SiteDP | None, wire: str,
            *, n: int, samples: int, loss: float, steps: int,
            min_patients: int) -> Statistic:
    """A unit's update statistic: `delta.<key>` in the wire dtype, n (the patients used),
    samples, loss, steps. The loss (a mean over the round's batches) leaves only as an
    aggregate over ≥ min_patients patients used; otherwise `loss_withheld` says why. Under
    DP (`site_dp`) the update is clipped/noised as the round asks or as the site's
    `require_dp` says (or refused), and the loss (not noised) stays at the site."""
    if site_dp is None:
        values: dict[str, Any] = {f"delta.{k}": v for k, v in fedavg.encode(update, wire).items()}
        values.update(n=n, samples=samples, steps=steps)
        if n >= min_patients:
            values["loss"] = loss
        else:
            values["loss_withheld"] = (f"over {n} patients, fewer than min_patients "
                                       f"({min_patients})")
        return Statistic(unit, values, n=n)
    values, refused = site_dp.release(unit, update, wire)
    values.update(n=n, samples=samples, steps=steps)
    return Statistic(unit, values, n=n, refused=refused)


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """A digest of the weights a unit started its round from: units (CV folds) that start
    from the same weights compute one statistic over different patients, so the ledger
    compares their updates."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(weights):
        h.update(key.encode())
        h.update(np.ascontiguousarray(weights[key]).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- pretrained weights


def pretrained_file(path: str, root: Path, config: SiteConfig | None = None) -> Path:
    """The weights file a query's `pretrained` names: inside the site folder or the site's
    own `pretrained_dir` (site.yaml), a weights suffix, a regular file; else ValueError."""
    if config is None:
        config, _ = parse_config(root)
    folders = [root] + ([config.pretrained_dir] if config and config.pretrained_dir else [])
    return site_file(path, folders, pretrained.SUFFIXES, "pretrained file")


def pretrained_weights(p: TrainParams, root: Path) -> dict[str, np.ndarray]:
    """The site's own copy of the pretrained file, as the network's state."""
    probe = build(p, torch.device("cpu"))
    pretrained.load_into(p.model, probe, pretrained_file(p.pretrained, root))
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
