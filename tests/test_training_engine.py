"""The CNN training engine against plain local training, and pretrained weights from a
local file. In-process (client.handlers.serve through InProcessTransport): these test the
engine's arithmetic and checks; Flower carries the same messages in tests/test_learning.py.

- One site under FedAvg with full participation is plain local training of the same
  network (1e-6): the messages, the guard, the wire encoding, the averaging and the server
  update add nothing. Under FedAvgM the server's momentum acts on that site's updates
  exactly as Hsu et al.'s rule says.
- `pretrained=<model>=PATH`: the file written by the test is every site's and the
  coordinator's, round-0 weights equal it, and a site with a different or missing file is
  left out with a reason naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.handlers import serve
from client.local import local_training as L
from client.local import training_data as D
from client.site.session import open_session
from client.stages import training as T
from neural.networks import network_of
from server.training.engine import Checkpoints, train_model
from server.training.plan import Plan
from server.training.setup import setup
from shared.config import StudyConfig, stage_settings
from simulation.cohort import simulate_cohort
from simulation.in_process import InProcessTransport
from tests.processes import processes

TINY = {"cnn-width": 0.0625, "mri-size": 16, "deep-cv-folds": 2, "rounds": 3,
        "local-steps": 3, "batch-size": 4, "gradcam-patients": 0, "seed": 5}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    simulate_cohort(root, n_sites=3, n_patients=40, seed=12, image_size=24)
    return root


def run(sites: Path, out: Path, names: list[str], *, base: dict | None = None,
        transport: InProcessTransport | None = None, **extra) -> tuple:
    """DL-MRI trained by the engine on `names` (settings `base`, default TINY, and
    `extra`), through `transport` (default: in process); (outcomes, setup, plan)."""
    config = StudyConfig(sites_dir=str(sites), out_dir=str(out), stages=("deep",),
                         settings=stage_settings({**(TINY if base is None else base), **extra}))
    plan = Plan.from_settings(config.settings, "dl_mri")
    transport = transport or InProcessTransport([sites / n for n in names])
    transport.handshake({"task": config.task, "run_id": "t", "needs": ["mri"]})
    st = setup(transport, config, "dl_mri", list(transport.roots), "deep", plan.pretrained)
    return train_model(transport, config, plan, st, "deep"), st, plan


def local_training(site: Path, plan: Plan, server_momentum: float | None,
                   pos_weight: float, seeded_as: str = "") -> dict:
    """The same network trained at the site alone, round by round as the site would
    (fresh optimizer each round, the round's seed — of `seeded_as` if given, else of the
    site), with the server rule applied by hand: FedAvg (w ← local) or FedAvgM
    (b ← βb + Δ, w ← w + b)."""
    resolved = plan.resolved(False)
    session = open_session(str(site), "her2-positive", ("clinical", "mri"))
    site_id = seeded_as or session.site_id
    out = {}
    for unit in resolved.units:
        net = network_of(resolved).build(resolved.seed)
        momentum = None
        for r in range(1, resolved.rounds + 1):
            p = T.TrainParams.from_query({**resolved.params(), "round": r,
                                          "units": resolved.units, "lr": resolved.lr_at(r),
                                          "pos_weight": pos_weight})
            data = D.site_data(session, p)
            rows, _ = D.unit_rows(data, unit)
            start = {k: v.detach().clone() for k, v in net.state_dict().items()}
            seed = L.round_seed(p.seed, site_id, p.model, unit, r)
            torch.manual_seed(seed)
            L.train_unit(net, data, data.samples(rows), p, torch.device("cpu"),
                         torch.Generator().manual_seed(seed), None)
            if server_momentum is not None:
                params = {n for n, _ in net.named_parameters()}
                state = net.state_dict()
                delta = {k: state[k] - start[k] for k in params}
                momentum = delta if momentum is None else {
                    k: server_momentum * momentum[k] + delta[k] for k in params}
                state.update({k: start[k] + momentum[k] for k in params})
                net.load_state_dict(state)
        out[unit] = {k: v.numpy() for k, v in net.state_dict().items()}
    return out


def test_the_pooled_reference_trains_the_pooled_rows_in_its_own_process(
        sites: Path, tmp_path: Path) -> None:
    """mode=pooled on one training site: the pooled process (simulation.pooled_site, reached
    through payload frames on a pipe) trains what that site would alone, seeded as the site
    `pooled`; with two sites it holds both sites' patients. No process is left behind."""
    extra = {"optimizer": "sgd", "lr": 0.005, "rounds": 2, "mri-size": 32, "batch-size": 8,
             "mode": "pooled"}
    (outcome,), _, plan = run(sites, tmp_path / "one", ["site-1"], **extra)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the pooled process on CPU (float sums depend on threads)
    try:
        expected = local_training(sites / "site-1", plan, None, outcome.result["pos_weight"],
                                  seeded_as="pooled")
    finally:
        torch.set_num_threads(threads)
    for unit, arrays in expected.items():
        for key, value in arrays.items():
            np.testing.assert_allclose(outcome.weights[unit][key], value, atol=1e-6, rtol=0,
                                       err_msg=f"{unit} {key}")
    (both,), _, _ = run(sites, tmp_path / "two", ["site-1", "site-2"], **{**extra, "rounds": 1})
    sizes = [len(open_session(str(sites / s), "her2-positive", ("clinical", "mri"))
                 .site.clinical) for s in ("site-1", "site-2")]
    assert both.result["pooled_patients"] == sum(sizes) > sizes[0]
    assert both.result["devices"] == {"pooled": {"type": "cpu"}}
    assert not processes("simulation.pooled_site")



@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])
def test_one_site_federated_equals_local_training(sites: Path, tmp_path: Path,
                                                  strategy: str) -> None:
    # SGD: Adam's division by √v̂ would blow float32 rounding of the update (w + (w' − w)
    # is w' only to an ulp) up to its step size where gradients are ~0
    # (and BatchNorm over 4 samples at 16³ amplifies it chaotically): 32³, batches of 8
    extra = {"strategy": strategy, "server-momentum": 0.9, "server-lr": 1.0,
             "optimizer": "sgd", "lr": 0.005, "rounds": 2, "mri-size": 32, "batch-size": 8}
    (outcome,), _, plan = run(sites, tmp_path, ["site-1"], **extra)
    expected = local_training(sites / "site-1", plan, 0.9 if strategy == "fedavgm" else None,
                              outcome.result["pos_weight"])
    assert outcome.result["pos_weight"] != 1.0  # the class weight reaches the site
    assert set(outcome.weights) == set(expected) == {"f0", "f1"}
    moved = 0.0
    for unit, arrays in expected.items():
        for key, value in arrays.items():
            np.testing.assert_allclose(outcome.weights[unit][key], value, atol=1e-6, rtol=0,
                                       err_msg=f"{unit} {key}")
        init = Checkpoints.read_npz(Path(outcome.result["checkpoint"]) / "init.npz")[unit]
        moved = max(moved, max(float(np.abs(value - init[k]).max())
                               for k, value in arrays.items()
                               if np.issubdtype(value.dtype, np.floating)))
    assert moved > 1e-3  # the network did train
    for entry in outcome.result["rounds"]:  # no unit's update was refused by the guard
        assert all(unit["sites"] == 1 for unit in entry["units"].values()), entry


def write_weights(path: Path, seed: int) -> dict[str, np.ndarray]:
    net = network_of(Plan.from_settings(stage_settings(TINY), "dl_mri").resolved(False)).build(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return {k: v.numpy() for k, v in net.state_dict().items()}


def test_pretrained_file_is_round_0_at_every_site(sites: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the coordinator's copy, relative to its directory
    name = "weights/resnet18.pth"
    good = write_weights(tmp_path / name, seed=101)
    for site in ("site-1", "site-2"):
        write_weights(sites / site / name, seed=101)
    write_weights(sites / "site-3" / name, seed=202)  # another file under the same name
    outcomes, st, plan = run(sites, tmp_path / "out", ["site-1", "site-2", "site-3"],
                             pretrained=f"dl_mri={name}", rounds=1)
    assert st.train == ["site-1", "site-2"]
    assert name in st.excluded["site-3"] and "different file" in st.excluded["site-3"]
    result = outcomes[0].result
    assert result["pretrained"]["sha256"] == st.pretrained["sha256"]
    init = Checkpoints.read_npz(Path(result["checkpoint"]) / "init.npz")
    for unit in plan.units:
        for key, value in good.items():
            np.testing.assert_array_equal(init[unit][key], value, err_msg=key)
    assert all(info["n"] for info in result["rounds"][0]["sites"].values())

    (sites / "site-3" / name).unlink()
    _, st, _ = run(sites, tmp_path / "out2", ["site-1", "site-3"], pretrained=name, rounds=1)
    assert "missing" in st.excluded["site-3"] and name in st.excluded["site-3"]


def test_a_site_refuses_round_1_weights_that_are_not_its_file(sites: Path) -> None:
    name = "weights/other.pth"
    write_weights(sites / "site-1" / name, seed=303)
    plan = Plan.from_settings(stage_settings({**TINY, "pretrained": name}), "dl_mri")
    plan = plan.resolved(False)
    net = network_of(plan).build(plan.seed)  # the seeded init, not the file
    query = {"task": "her2-positive", "needs": "mri", **plan.params(), "round": 1,
             "units": plan.units, "train_id": "abc", "pos_weight": 1.0,
             "pretrained": name}
    for unit in plan.units:
        query.update({f"w.{unit}.{k}": v.numpy() for k, v in net.state_dict().items()})
    reply = serve(sites / "site-1", "train.dl_mri", query, "r")
    assert reply["status"] != "ok" and "pretrained file" in reply["reason"], reply
