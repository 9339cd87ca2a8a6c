"""Issue 25, attack class 6 (CNN rounds): a hostile coordinator calls a default-policy
training site's handler (`client.handlers.serve`, `train.dl_mri`) directly and reads one
patient's embedding and label out of a weight update.

The attack: the DL-MRI network with its head (`fc`) zeroed, batch 1, one local step, SGD
at lr 1 without momentum. With the head at zero the backbone gets no gradient, and the head's
update is −lr·∂L/∂logit·(h, 1) for the one patient's embedding h: ΔW / Δb = h exactly, and
the released training loss is pos_weight·log 2 for a positive, log 2 for a negative (her
label; so is the sign of Δb). Under `require_dp` the coordinator announces `dp.mode:
server-fixed` with a large σ, which the site took as "the server adds the noise".

The site: 40 simulated patients, the default policy (min_patients 10, min_batch_size 4,
min_update_patients = min_patients). What the attacker learns is compared with the
embeddings the same network computes for every patient at the site and with their labels.

Before the fix (commit 862bbee) these tests recovered:
- one patient's 32-dim embedding, matched exactly (to 1e-4, relative; the 9th of the unit's
  19 training patients), her label (0) from the released loss log 2 (and from Δb's sign);
  the reply said n = 19 (the unit's training rows), while one patient was used;
- under `require_dp` with `server-fixed` and σ = 50 announced: the same, from the raw
  update (equal to the plain update to the bit): the same patient's embedding;
- (at e88627f, after the first part of the fix) updates from the same weights over the
  first 10 and the first 11 patients of one shuffle, asked under two train ids: both
  released (the train id made a new ledger family).

After the fix: a batch under min_batch_size or an update over fewer than
min_update_patients patients is refused (the unit's update withheld, with the reason); at
the smallest legal round (batch 4, 3 steps, 10+ patients) the head's ratio matches no
patient's embedding and the loss is an aggregate over ≥ min_patients patients; under
`require_dp` the update is clipped to the site's norm and carries the site's own noise; an
update's ledger family is the digest of the weights it starts from, whatever the train id.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from client.handlers import serve
from client.local.training_data import site_data, unit_rows
from client.site.session import clear_sessions, open_session
from neural.networks import network_of
from shared import dp, fedavg
from shared.schema import nest
from shared.training_params import TrainParams
from simulation.cohort import simulate_cohort

TASK = "her2-positive"
POS_WEIGHT = 2.0
ATTACK = {"model": "dl_mri", "width": 0.0625, "size": 64, "folds": 2, "seed": 0,
          "local_steps": 1, "batch_size": 1, "lr": 1.0, "optimizer": "sgd", "momentum": 0.0,
          "weight_decay": 0.0, "augment": False, "pos_weight": POS_WEIGHT, "round": 1,
          "units": ["f0"], "train_id": "abc1"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adv_training")
    simulate_cohort(root, n_sites=1, n_patients=40, seed=3, image_size=24)
    return root / "site-1"


def site(cohort: Path, tmp: Path, privacy: dict[str, Any] | None = None) -> Path:
    """A fresh copy of the site with the default policy (`privacy` added to it)."""
    folder = tmp / "site-1"
    shutil.copytree(cohort, folder)
    path = folder / "site.yaml"
    config = yaml.safe_load(path.read_text())
    config["privacy"] = dict(privacy or {})
    path.write_text(yaml.safe_dump(config))
    clear_sessions()
    return folder


def zeroed_head(params: dict[str, Any]) -> dict[str, np.ndarray]:
    """The network's seeded weights with the head (`fc`) zeroed, as the coordinator sends."""
    p = TrainParams.from_query(params)
    state = {k: v.numpy().copy() for k, v in network_of(p).build(p.seed).state_dict().items()}
    state["fc.weight"][:] = 0
    state["fc.bias"][:] = 0
    return state


def train(folder: Path, params: dict[str, Any], weights: dict[str, np.ndarray],
          **extra: Any) -> dict:
    encoded = fedavg.encode(weights, "float32")
    query = {"task": TASK, "needs": ["mri"], **params, **extra,
             **{f"w.{u}.{k}": v for u in params["units"] for k, v in encoded.items()}}
    return serve(folder, "train.dl_mri", query, "r1")


def embeddings(folder: Path, params: dict[str, Any],
               weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(every training patient's embedding — the head's input — as the network computes it
    in training mode on her sample alone, her label)."""
    p = TrainParams.from_query(params)
    net = network_of(p).build(p.seed)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    net.train()
    seen: list[torch.Tensor] = []
    hook = net.fc.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    data = site_data(open_session(str(folder), TASK, ("clinical", "mri")), p)
    rows, _ = unit_rows(data, "f0")
    samples = data.samples(rows)
    with torch.no_grad():
        for s in samples:
            net(torch.from_numpy(data.x[s:s + 1]))
    hook.remove()
    return torch.cat(seen).numpy().astype(np.float64), data.y[data.owner[samples]]


def recovered(reply: dict) -> tuple[np.ndarray | None, int | None]:
    """What the attacker reads: ΔW/Δb (an embedding) and the label the loss (or Δb) says."""
    delta = nest(reply, "f0.delta")
    if not delta:
        return None, None
    dw = np.asarray(delta["fc.weight"], np.float64).reshape(-1)
    db = float(np.asarray(delta["fc.bias"], np.float64).reshape(-1)[0])
    if db == 0:
        return None, None
    loss = reply.get("f0.loss")
    if loss is not None:
        label = int(abs(loss - POS_WEIGHT * math.log(2)) < 1e-4)
        if not label and abs(loss - math.log(2)) > 1e-4:
            label = None  # an aggregate: no one's label
    else:
        label = int(db > 0)  # y = 1: ∂L/∂logit < 0, Δb > 0
    return dw / db, label


def matches(embedding: np.ndarray | None, truth: np.ndarray) -> list[int]:
    """The patients whose embedding the attacker holds (to 1e-4, relative)."""
    if embedding is None:
        return []
    scale = np.linalg.norm(truth, axis=1)
    err = np.linalg.norm(truth - embedding, axis=1)
    return [int(i) for i in np.flatnonzero(err <= 1e-4 * np.maximum(scale, 1e-12))]


def test_batch_one_head_zeroed_update_gives_no_patients_embedding_or_label(
        cohort: Path, tmp_path: Path) -> None:
    folder = site(cohort, tmp_path)
    weights = zeroed_head(ATTACK)
    truth, labels = embeddings(folder, ATTACK, weights)
    learned = []
    for batch, steps in ((1, 1), (4, 1), (2, 5), (4, 3), (10, 1)):
        params = {**ATTACK, "batch_size": batch, "local_steps": steps}
        reply = train(folder, params, weights)
        assert reply["status"] == "ok", reply
        embedding, label = recovered(reply)
        hits = matches(embedding, truth)
        learned += [(batch, steps, i, label == labels[i]) for i in hits]
        if "f0.n" in reply:  # n: the patients the update (and its loss) rests on
            assert reply["f0.n"] >= 10 and reply["f0.n"] <= batch * steps
    assert learned == []  # 862bbee: [(1, 1, 9, True)]: patient 9's embedding, her label; n = 19


def test_require_dp_update_carries_the_sites_own_noise(cohort: Path, tmp_path: Path) -> None:
    """The coordinator announces server-fixed with σ = 50: the site still clips to its own
    norm and adds its own noise (the plain update of the same round, from a copy of the site
    without require_dp, is the reference)."""
    sigma, clip = 1.0, 0.05  # the site's own parameters
    folder = site(cohort, tmp_path / "dp", {"require_dp": {
        "max_epsilon": 1e6, "noise_multiplier": sigma, "clipping_norm": clip}})
    weights = zeroed_head(ATTACK)
    truth, _ = embeddings(folder, ATTACK, weights)
    announce = dp.RoundDP.query("server-fixed", 50.0, {"f0": 1e9})
    reply = train(folder, ATTACK, weights, **announce)
    assert matches(recovered(reply)[0], truth) == []  # 862bbee: one patient, exactly

    legal = {**ATTACK, "batch_size": 4, "local_steps": 3, "lr": 1e-2}
    plain_site = site(cohort, tmp_path / "plain")
    plain = fedavg.decode(nest(train(plain_site, legal, weights), "f0.delta"), "float32")
    clear_sessions()
    noised = fedavg.decode(nest(train(folder, legal, weights, **announce), "f0.delta"),
                           "float32")
    assert set(noised) == set(plain)
    clipped, _ = dp.clip(plain, clip)
    noise = np.concatenate([(noised[k].astype(np.float64) - clipped[k]).reshape(-1)
                            for k in plain if np.issubdtype(plain[k].dtype, np.floating)])
    # 862bbee: noise == 0 (the raw update); now N(0, (σC)²) per weight
    assert np.std(noise) == pytest.approx(sigma * clip, rel=0.05)
    assert matches(recovered({f"f0.delta.{k}": v for k, v in noised.items()})[0], truth) == []


def test_updates_differing_by_one_patient_are_one_family_whatever_the_train_id(
        cohort: Path, tmp_path: Path) -> None:
    """Batches 10 and 11 of one step draw the first 10 and 11 patients of the same shuffle,
    from the same weights: two updates over patient sets that differ by one patient (their
    difference is her contribution, up to the batch statistics of BatchNorm). Asked under
    two train ids, which made two ledger families (the shuffle is seeded by the round, not
    the train id)."""
    folder = site(cohort, tmp_path)
    weights = zeroed_head(ATTACK)
    released = []
    for batch, train_id in ((10, "abc1"), (11, "abc2")):
        reply = train(folder, {**ATTACK, "batch_size": batch, "train_id": train_id}, weights)
        assert reply["status"] == "ok", reply
        if nest(reply, "f0.delta"):
            released.append(int(reply["f0.n"]))
    # e88627f (the train id in the family): both, n = 10 and 11, sets differing by one
    assert len(released) < 2
