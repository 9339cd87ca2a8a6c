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
  machinery (`client.stages.radiomics` with source `dsfr`), only its column names leave.

A weight update rests on the patients its local steps used, and a unit is not trained
below the site's `min_batch_size` or `min_update_patients` (client/stages/training_round.py says
why; issue 25). State between messages lives on the site's disk, and every random draw
comes from a generator seeded by (seed, site, model, unit, round) (client/stages/training_round.py).

This module holds the message handlers: each reads the query's parameters, the site's
prepared data and its state, and calls the work. A round (`run_round`: validation, then
local training of every unit; the pretrained-file checks) is client/stages/training_round.py;
scoring with the chosen weights and the DSFR feature vectors client/stages/training_scores.py; the
patients' data path (preparation, the per-patient cache, folds, a unit's rows)
client/local/training_data.py; one unit's network at the site (device and determinism, the
round's seeds, weights in and out, FedBN's local state, the losses, the local optimizer
loop) client/local/local_training.py; Grad-CAM client/local/gradcam.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from client.egress.guard import Statistic, suppress_small
from client.local.dp import SiteDP
from client.local.gradcam import gradcam
from client.local.local_training import (
    device_info,
    flushing_denormals,
    pick_device,
    set_determinism,
)
from client.local.training_data import CACHE, cnn_excluded, site_data
from client.site.session import SiteSession
from client.stages.training_round import pretrained_file, run_round
from client.stages.training_scores import chosen_net, dsfr_vectors, score_data
from neural import networks, pretrained
from shared.folds import site_folds
from shared.queries.params import QueryRejected
from shared.schema import Payload
from shared.training_params import DSFR_UNIT, NAME, TrainParams

# --------------------------------------------------------------------------- a round


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
    from client.site.session import AUDIT_DIR
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
    from client.stages.handshake import data_hash

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
    exists; client.site.files). Never the site's own paths, never any other file's hash."""
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


# --------------------------------------------------------------------------- scoring


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


@flushing_denormals
def dsfr_features(session: SiteSession, query: Payload) -> list[Statistic]:
    """DSFR features of every patient with the chosen U-Net weights, kept at the site as
    the rows of the `dsfr` selection/LR head (client.stages.radiomics state, source `dsfr`).

    Crosses the wire: the feature names (layer and channel, the same at every site), the
    roles and the number of patients (a count over ≥ min_patients)."""
    from client.stages import radiomics

    p = _params(query)
    data = site_data(session, p)
    layer = str(query.get("layer", networks.DSFR_LAYER))
    source = _checked_name(str(query.get("source", "dsfr")))
    device = pick_device(p.device)
    set_determinism(p.deterministic, device)
    is_train = "train" in session.site.config.roles
    net = chosen_net(query, DSFR_UNIT, p, device, _state_dir(session) if is_train else None)
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
