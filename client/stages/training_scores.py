"""What the chosen weights of a CNN stage compute at the site (`client.stages.training`'s
`query.train_score` and `query.dsfr_features`): each patient's probability — out-of-fold at
a training site (the model of the fold that held the patient out), the mean of the fold
models at an external one — with its coarsened statistics, and the DSFR feature vector of
each patient (the U-Net's feature maps on its tumour slices, pooled and clustered); a unit's
network with the chosen weights (`chosen_net`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.egress.guard import Statistic
from client.local.local_training import (
    build,
    flushing_denormals,
    load_local,
    load_weights,
    pick_device,
    received_weights,
    set_determinism,
    shared_keys,
)
from client.local.training_data import ModelData
from client.stages.training_round import (
    bce_sum,
    histograms,
    ledgered,
    nets_digest,
    predict,
    round_family,
)
from neural import networks
from shared.schema import Payload
from shared.training_params import TrainParams

# --------------------------------------------------------------------------- scoring


def chosen_net(query: Payload, unit: str, p: TrainParams, device: torch.device,
               state_dir: Path | None) -> nn.Module:
    """A unit's network with the chosen weights the query carries, and (`state_dir`: a
    training site) FedBN's local layers of the unit's last round."""
    net = build(p, device)
    state = net.state_dict()  # once: state_dict() walks every module
    received = received_weights(query, unit, p, {k: state[k] for k in shared_keys(net, p)})
    load_weights(net, received,
                 load_local(state_dir, p, unit, p.round) if state_dir is not None else None)
    return net


def unit_probabilities(data: ModelData, p: TrainParams, query: Payload, state_dir: Path,
                       device: torch.device) -> tuple[np.ndarray, str, dict[str, nn.Module]]:
    """Out-of-fold probabilities at a training site, mean over units at an external one."""
    nets: dict[str, nn.Module] = {}
    per_unit = {}
    for unit in p.units:
        net = chosen_net(query, unit, p, device, state_dir if data.folds is not None else None)
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
    stats = [*ledgered([Statistic("val", {"loss_sum": bce_sum(probs, data.y), "n": len(probs)},
                                  n=len(probs)),
                        *histograms(probs, data.y, min_cell)],
                       data, np.ones(len(probs), dtype=bool),
                       round_family(p, nets_digest(nets), "score")),
             Statistic("scores", {"kind": kind}, n=None)]
    return stats, probs, kind, nets


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
