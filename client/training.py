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

A weight update is a statistic over the patients its local steps used (`n`; local steps ×
batch size may touch a few of the unit's patients): the site does not train a unit whose
batches are smaller than its `min_batch_size` or whose update would rest on fewer than its
`min_update_patients` (refused with the reason; the server averages the other sites), and
the guard refuses it over fewer than `min_patients`. The training loss leaves only inside
that statistic (an aggregate over ≥ min_patients). A batch of one with the head zeroed
would make the head's update one patient's embedding and the loss her label (issue 25).

State between messages lives on the site's disk (in the Simulation Engine consecutive
messages of one site may run in different processes): each patient's prepared inputs
(client/imaging.py's data path) in `cache/training/<model>/<key>.npz` (keyed by the
preparation settings and the patient's image files), FedBN's local normalization layers
per unit and round in `cache/training/<train-id>/`.
Every random draw (shuffling, augmentation, Mixup, dropout) comes from a generator seeded
by (seed, site, model, unit, round), so a round replayed after a crash gives the same
update. Optimizer state starts afresh each round (the server holds no client state).

This module holds the message handlers, a round (`run_round`: validation, then local
training of every unit), prediction, scoring and the DSFR features. The patients' data path
(preparation, the per-patient cache, folds, a unit's rows) is in client/training_data.py;
one unit's network at the site (device and determinism, the round's seeds, weights in and
out, FedBN's local state, the losses, the local optimizer loop) in
client/local_training.py; Grad-CAM in client/gradcam.py.
"""

from __future__ import annotations

import hashlib
import re
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from client.dp import SiteDP
from client.gradcam import gradcam
from client.guard import Statistic, suppress_small
from client.local_training import (
    amp_dtype,
    build,
    device_info,
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
from client.session import SiteSession
from client.site_config import SiteConfig, parse_config
from client.site_files import site_file
from client.training_data import CACHE, ModelData, cnn_excluded, site_data, unit_rows
from shared import disclosure, fedavg, networks, pretrained, roc
from shared.folds import site_folds
from shared.policy import PrivacyPolicy
from shared.queries.params import QueryRejected
from shared.schema import Payload
from shared.training_params import DSFR_UNIT, NAME, TrainParams

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
                          n=len(dice), patients=_ids(data, val),
                          family=_round_family(p, nets_digest(nets)))]
    probs = np.full(len(data.patients), np.nan)
    for unit in p.units:
        _, val = unit_rows(data, unit)
        samples = data.samples(val)
        if len(samples):
            logits = predict(nets[unit], data.x[samples], device, p).reshape(-1)
            probs[data.owner[samples]] = 1 / (1 + np.exp(-logits))
    seen = ~np.isnan(probs)
    family = _round_family(p, nets_digest(nets))
    return ledgered([Statistic("val", {"loss_sum": _bce_sum(probs[seen], data.y[seen]),
                                       "n": int(seen.sum())}, n=int(seen.sum())),
                     *histograms(probs[seen], data.y[seen], min_cell)],
                    data, seen, family)


def _ids(data: ModelData, rows: np.ndarray) -> list[str]:
    return [str(i) for i in np.asarray(data.patients)[rows]]


def _round_family(p: TrainParams, weights: str, *parts: object) -> str:
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
    patients, grid = _ids(data, rows), roc.grid(roc.DEFAULT_BINS)
    return [replace(s, patients=patients, family=f"{family}:hist", grid=grid)
            if s.name.startswith("hist") else replace(s, patients=patients,
                                                      family=f"{family}:{s.name}")
            for s in stats]


def _bce_sum(probs: np.ndarray, y: np.ndarray) -> float:
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
    (client/dp.py): the round's DP and the site's `require_dp` — the update is
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
    family = _round_family(p, weights_digest(start), "update")
    refused = update_refusal(p, int(patients.sum()), policy)
    if refused is not None:
        save_local(state_dir, p, unit, p.round, net)  # FedBN: the next round starts here
        return Statistic(unit, {}, n=int(patients.sum()), refused=refused,
                         patients=_ids(data, patients), family=family)
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
    return replace(stat, patients=_ids(data, patients), family=family)


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


def _params(query: Payload) -> TrainParams:
    """The round's parameters; a query outside TrainParams' ranges is refused whole."""
    try:
        return TrainParams.from_query(query)
    except ValueError as err:
        raise QueryRejected(str(err)) from None


def _round_params(query: Payload) -> TrainParams:
    """A round's parameters: its units are distinct units of the model (`all` for DSFR,
    `f<k>` for a CV fold k < folds; another name would train on every row or none)."""
    p = _params(query)
    allowed = ({DSFR_UNIT} if p.model == "dsfr"
               else {f"f{k}" for k in range(p.folds)})
    if not p.units or set(p.units) - allowed or len(set(p.units)) < len(p.units):
        raise QueryRejected(f"units {list(p.units)[:5]} are not distinct units of "
                            f"{p.model} with {p.folds} folds")
    return p


def _state_dir(session: SiteSession) -> Path:
    return session.site.root / CACHE


def train_round(session: SiteSession, query: Payload) -> list[Statistic]:
    """`train.<model>`: validate the received global weights, train, send the updates."""
    p = _round_params(query)
    policy = session.site.config.privacy
    site_dp = _site_dp(session, query, p)  # a malformed DP request: refused before any work
    data = site_data(session, p)
    return [*run_round(data, p, query, _state_dir(session), session.site_id, train=True,
                       min_cell=policy.min_cell_count, site_root=session.site.root,
                       site_dp=site_dp, policy=policy), *cnn_excluded(session, data)]


def _site_dp(session: SiteSession, query: Payload, p: TrainParams) -> SiteDP | None:
    """The round's DP request and the site's `require_dp` (None: neither, today's path)."""
    from client.session import AUDIT_DIR
    from shared.dp import Q_MODE

    requirement = session.site.config.privacy.require_dp
    if Q_MODE not in query and requirement is None:
        return None
    try:
        return SiteDP.for_round(query, list(p.units), p.train_id, p.model, p.round,
                                requirement, len(session.labels()),
                                session.site.root / AUDIT_DIR, _state_dir(session))
    except ValueError as err:  # a malformed DP request
        raise QueryRejected(str(err)) from None


def evaluate_round(session: SiteSession, query: Payload) -> list[Statistic]:
    """`evaluate.<model>`: validation of the received global weights only."""
    p = _round_params(query)
    data = site_data(session, p)
    return [*run_round(data, p, query, _state_dir(session), session.site_id, train=False,
                       min_cell=session.site.config.privacy.min_cell_count),
            *cnn_excluded(session, data)]


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
    """The sha256 of the site's copy of the pretrained file, or why there is none: missing,
    not a weights file, or outside the site's folders (one answer whether or not such a file
    exists; client.site_files). Never the site's own paths, never any other file's hash."""
    if not path:
        return []
    try:
        target = pretrained_file(path, session.site.root, session.site.config)
        values = {"sha256": pretrained.file_sha256(target), "error": ""}
    except OSError:
        values = {"sha256": "", "error": f"pretrained file {path!r}: unreadable at this site"}
    except ValueError as err:
        values = {"sha256": "", "error": str(err)}
    return [Statistic("pretrained", values, n=None)]


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


@flushing_denormals
def score_data(data: ModelData, p: TrainParams, query: Payload, state_dir: Path,
               min_cell: int) -> tuple[list[Statistic], np.ndarray, str, dict]:
    device = pick_device(p.device)
    set_determinism(p.deterministic, device)
    probs, kind, nets = unit_probabilities(data, p, query, state_dir, device)
    stats = [*ledgered([Statistic("val", {"loss_sum": _bce_sum(probs, data.y), "n": len(probs)},
                                  n=len(probs)),
                        *histograms(probs, data.y, min_cell)],
                       data, np.ones(len(probs), dtype=bool),
                       _round_family(p, nets_digest(nets), "score")),
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


@flushing_denormals
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
    folds = (site_folds(data.y, int(query["cv-folds"]), int(query["seed"]), session.site_id,
                        session.site.config.privacy.difference)[0] if is_train else None)
    state = radiomics.RadiomicsData(patients=pd.Index(data.patients), r1=vectors, r2=None,
                                    y=data.y, folds=folds)
    radiomics.save_state(session, str(query.get("run_id", "")), state, source=source)
    policy = session.site.config.privacy
    return [Statistic("features", {"names": names, "source": source,
                                   "roles": list(session.site.config.roles)},
                      n=len(data.patients), patients=[str(i) for i in data.patients],
                      family=f"dsfr.features:{source}"),
            Statistic("counts", {"n_extracted": np.array([suppress_small(len(data.patients),
                                                                         policy)]),
                                 "n_failed": np.array([suppress_small(len(data.failed),
                                                                      policy)]),
                                 "n_reader2": np.array([0])},
                      n=None, counts=("n_extracted", "n_failed", "n_reader2"))]
