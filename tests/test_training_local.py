"""Site-side training pieces (client/stages/training_round.py,
client/stages/training_scores.py) and the
engine's configuration (server/training/engine.py), in-process: losses, K-means feature reduction,
FedProx, seeding, the guard on weight updates, and the CUDA/AMP paths (skipped, with the
reason, without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.handlers import serve
from client.local import local_training as L
from client.local import training_data as D
from client.stages.training_scores import dsfr_vectors
from neural.networks import network_of
from server.training.plan import Plan
from shared import schema
from shared.config import ConfigError, stage_settings
from simulation.cohort import simulate_cohort

NO_GPU = "no CUDA GPU on this machine: the CUDA/AMP training paths are not exercised here"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("local-training")
    simulate_cohort(root, n_sites=1, n_patients=24, seed=5, effect_size=2.0, image_size=16)
    return root / "site-1"


def tiny(model: str, **kw) -> Plan:
    values = {"cnn-width": 0.0625, "mri-size": 16, "us-size": 32, "dsfr-size": 32,
              "deep-cv-folds": 2, "seed": 3, **kw}
    return plan_of(values, model).resolved(False)


def plan_of(values: dict, model: str) -> Plan:
    return Plan.from_settings(stage_settings(values), model)


def round_query(plan: Plan, round_no: int = 1, **extra) -> dict:
    net = network_of(plan).build(plan.seed)
    query = {"task": "her2-positive", "needs": "mri" if plan.model != "dl_us" else "us",
             **plan.params(), "round": round_no, "units": plan.units, "train_id": "abc123",
             "pos_weight": 1.5, **extra}
    for unit in plan.units:
        for key, value in net.state_dict().items():
            query[f"w.{unit}.{key}"] = value.numpy()
    return query


def test_focal_loss_is_lin_et_al() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.sigmoid(logits)
    p_t = torch.where(target == 1, p, 1 - p)
    alpha_t = torch.where(target == 1, 0.25, 0.75)
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    torch.testing.assert_close(L.focal_loss(logits, target, 0.25, 2.0), expected)


def test_dsfr_vectors_keep_the_larger_kmeans_cluster() -> None:
    """Each 'slice' is an input whose GAP feature is its constant value; a patient with 4
    slices near 1 and 2 near 10 gets the mean of the 4."""

    class Identity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.activations = torch.nn.ModuleDict({"activation_9": torch.nn.ReLU()})
            self.relu_width = {"activation_9": 1}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.activations["activation_9"](x)

    values = [1.0, 1.1, 0.9, 1.2, 10.0, 10.5, 3.0, 4.0]
    x = np.array(values, np.float32).reshape(-1, 1, 1, 1) * np.ones((1, 1, 4, 4), np.float32)
    data = D.ModelData(patients=np.array(["a", "b"]), y=np.array([0, 1]), x=x,
                       mask=np.ones_like(x, dtype=np.uint8),
                       owner=np.array([0, 0, 0, 0, 0, 0, 1, 1]))
    out = dsfr_vectors(Identity(), data, "activation_9", torch.device("cpu"),
                         tiny("dsfr"), seed=0)
    assert out[0, 0] == pytest.approx(np.mean([1.0, 1.1, 0.9, 1.2]))
    assert out[1, 0] == pytest.approx(3.5)  # under 3 slices: the mean of all


def test_per_model_values_and_paper_defaults() -> None:
    assert plan_of({"lr": "dl_mri=0.01,dl_us=2e-4"}, "dl_us").lr == 2e-4
    assert plan_of({"lr": "dl_mri=0.01"}, "dsfr").lr == 1e-3  # the recipe's
    assert plan_of({"lr": 0.5}, "dsfr").lr == 0.5
    assert plan_of({"lr": "default"}, "dsfr").lr == 1e-3
    with pytest.raises(ConfigError, match="rounds: expected model=value pairs"):
        plan_of({"rounds": "resnet=3"}, "dsfr")
    paper = {"recipe": "paper"}
    dsfr, mri, us = (plan_of(paper, m) for m in ("dsfr", "dl_mri", "dl_us"))
    assert (dsfr.optimizer, dsfr.lr, dsfr.batch_size) == ("adam", 1e-3, 6)
    assert (mri.margin, mri.spacing, mri.mri_size, us.us_size) == (50, 0.0, 96, 256)
    assert (mri.optimizer, mri.lr, mri.weight_decay, mri.batch_size) == ("sgd", 1e-3, 1e-2, 16)
    assert (us.optimizer, us.lr, us.weight_decay, us.smoothing, us.mix, us.schedule) == \
        ("adamw", 2e-5, 0.05, 0.2, True, "cosine")
    assert us.lr_at(1) == pytest.approx(2e-5) and us.lr_at(us.rounds) < 2e-5
    assert plan_of({"lr": "dl_mri=4e-6", "optimizer": "dl_mri=adamw"},
                           "dl_mri").optimizer == "adamw"
    scratch = plan_of({"mri-size": "default"}, "dl_mri")  # pyproject's value
    assert (scratch.recipe, scratch.optimizer, scratch.local_steps, scratch.margin) == \
        ("scratch", "adamw", 10, 0)
    assert scratch.resolved(gpu=True).mri_size == 96
    assert scratch.resolved(gpu=False).mri_size == 32
    assert plan_of({"mri-size": "auto", **paper}, "dl_mri").mri_size == 0
    for bad in ({"wire-dtype": "int8"}, {"strategy": "scaffold"}, {"mode": "central"},
                {"rounds": 0}, {"us-variant": "huge"}, {"cnn-width": "wide"},
                {"recipe": "fast"}, {"local-steps": -1}, {"spacing": -1},
                {"strategy": "fedadam", "server-lr": -0.1}):
        with pytest.raises(ConfigError):
            plan_of(bad, "dl_us")


def test_a_round_is_deterministic_and_fedprox_pulls_towards_the_global_model(site) -> None:
    plan = tiny("dl_mri", rounds=1)
    first = serve(site, "train.dl_mri", round_query(plan), "r1")
    again = serve(site, "train.dl_mri", round_query(plan), "r1")
    assert first["status"] == "ok", first
    deltas = {k: v for k, v in first.items() if ".delta." in k}
    assert deltas and all(np.array_equal(deltas[k], again[k]) for k in deltas)
    assert first["f0.n"] + first["f1.n"] == first["val.n"]  # each patient held out once
    steps = {"local-epochs": 2, "batch-size": 4}  # the proximal term acts from step 2 on
    plain = serve(site, "train.dl_mri", round_query(tiny("dl_mri", **steps)), "r1")
    prox = serve(site, "train.dl_mri", round_query(tiny("dl_mri", strategy="fedprox",
                                                        **{"proximal-mu": 1e3}, **steps)), "r1")
    norm = sum(float(np.sum(plain[k].astype(float) ** 2)) for k in deltas
               if k.startswith("f0.") and "num_batches" not in k and "running" not in k)
    prox_norm = sum(float(np.sum(prox[k].astype(float) ** 2)) for k in deltas
                    if k.startswith("f0.") and "num_batches" not in k and "running" not in k)
    assert prox_norm < 0.5 * norm


def test_the_guard_refuses_an_update_from_too_few_patients(site, tmp_path) -> None:
    """min_patients applies to weight updates (min_update_patients defaults to it): the
    patients the local steps used are `n`; the site does not even train."""
    import shutil

    import yaml

    strict = tmp_path / "strict"
    shutil.copytree(site, strict)
    config = yaml.safe_load((strict / "site.yaml").read_text())
    config["privacy"]["min_patients"] = 500
    (strict / "site.yaml").write_text(yaml.safe_dump(config))
    plan = tiny("dl_us")
    reply = serve(strict, "train.dl_us", round_query(plan), "r1")
    assert reply["status"] == "ok"
    assert not any(".delta." in k for k in reply)
    assert "fewer than this site's min_update_patients (500)" in reply["refused.f0"]
    audit = [json.loads(line) for line in (strict / "audit" / "egress.jsonl").read_text()
             .splitlines()]
    assert audit[-1]["message_type"] == "train.dl_us" and "f0" in audit[-1]["refused"]


def test_fedbn_keeps_normalization_layers_at_the_site(site) -> None:
    plan = tiny("dl_mri", fedbn=True)
    query = round_query(plan)
    reply = serve(site, "train.dl_mri", query, "r1")
    assert reply["status"] == "ok", reply
    assert not any(".bn" in k or "running_mean" in k for k in reply)
    kept = site / "cache" / "training" / "abc123" / "dl_mri-f0-r1.npz"
    assert kept.is_file()
    evaluate = serve(site, "evaluate.dl_mri", {**query, "round": 2}, "r1")
    assert evaluate["status"] == "ok" and "val.loss_sum" in evaluate
    assert not any(".delta." in k for k in evaluate)


def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        L.pick_device("cuda")
    assert L.pick_device("auto").type == "cpu"
    assert L.amp_dtype(torch.device("cpu"), "auto") is None


@needs_gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_cuda_round_with_amp(site, amp: str) -> None:
    plan = tiny("dl_us", device="cuda", amp=amp)
    reply = serve(site, "train.dl_us", round_query(plan), "gpu")
    assert reply["status"] == "ok", reply
    assert reply["device.type"] == "cuda"
    expected = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "off": "None"}[amp]
    assert reply["device.amp"] == expected
    assert all(np.isfinite(v.astype(np.float32)).all() for k, v in reply.items()
               if ".delta." in k)


@needs_gpu
def test_cuda_auto_device_and_amp() -> None:
    device = L.pick_device("auto")
    assert device.type == "cuda"
    assert L.amp_dtype(device, "auto") in (torch.bfloat16, torch.float16)
    assert tiny("dl_mri").resolved(gpu=True).width == 1.0


def test_unknown_train_actions_are_refused_not_raised(site) -> None:
    assert schema.message_type("train.dsfr") == "train.dsfr"
    assert schema.action_of("train.resnet") is None
    assert schema.action_of("query.train_setup") == schema.TRAIN_SETUP
    reply = serve(site, "train.dl_us", {"model": "vgg", "task": "her2-positive"}, "r1")
    assert reply["status"] == "refused" and "unknown model" in reply["reason"]


def test_the_server_leaves_out_malformed_updates() -> None:
    from server.training.engine import _bad_update

    weights = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    good = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    assert _bad_update(good, weights, ["w", "b"]) is None
    assert "keys differ" in _bad_update({"w": good["w"]}, weights, ["w", "b"])
    assert "shape" in _bad_update({**good, "b": np.ones(4, np.float32)}, weights, ["w", "b"])
    nan = {**good, "w": np.full((2, 3), np.nan, np.float32)}
    assert "not finite" in _bad_update(nan, weights, ["w", "b"])


def test_every_plan_key_is_declared_and_its_default_parses() -> None:
    # a Plan field names its key with shared.settings.setting(key), which fails at import
    # for an undeclared key; tests/test_settings.py ties the keys to the training section
    for model in ("dsfr", "dl_mri", "dl_us"):
        plan_of({}, model)


def test_subnormals_are_flushed_only_during_the_cnn_work() -> None:
    """The CNN handlers flush subnormal floats on the CPU while they run and switch it off
    after: the flag is process state, and it had leaked into everything the process did
    next (hypothesis refuses to draw floats under it; exact sums lose subnormals)."""
    import torch

    from client.local.local_training import flushing_denormals

    tiny = torch.tensor([1e-40], dtype=torch.float32)

    @flushing_denormals
    def inside() -> float:
        return float(tiny * 1.0)

    assert inside() == 0.0
    assert float(tiny * 1.0) != 0.0
    assert np.float32(1e-40) * np.float32(1.0) != 0.0
