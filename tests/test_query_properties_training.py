"""The CNN round queries (`train.dl_mri`, `evaluate.dl_mri`) over any round parameters a
hostile coordinator may send — batch size, local steps and epochs, learning rate and
momentum (including non-finite and out-of-range values), units (repeated, unknown, of
another model), DP requests (any mode, σ, clipping norms, missing norms) — against a
default-policy site (min_patients 10, min_batch_size 4, min_update_patients 10) and the
same site under `require_dp`: the site never crashes (every reply is `ok` or `refused`),
and what it releases is what its policy allows:
- an update (`<unit>.delta.*`) only from a round whose batch size is ≥ min_batch_size and
  over n ≥ min_update_patients patients, n no more than the local steps could touch;
- the training loss only inside such an update (n ≥ min_patients);
- under `require_dp` every released update is flagged as noised by the site itself and
  carries no loss;
- `evaluate` releases no update.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.handlers import serve
from client.site.session import clear_sessions
from neural.networks import network_of
from shared import dp, fedavg
from shared.training_params import TrainParams
from simulation.cohort import simulate_cohort

BASE = {"model": "dl_mri", "width": 0.0625, "size": 16, "folds": 2, "seed": 1,
        "optimizer": "sgd", "augment": False, "round": 1, "train_id": "abc2"}
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
MIN_PATIENTS = MIN_UPDATE = 10
MIN_BATCH = 4


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default-policy site and a copy of it under require_dp."""
    root = tmp_path_factory.mktemp("training-properties")
    simulate_cohort(root / "c", n_sites=1, n_patients=40, seed=4, image_size=16)
    out = {}
    for name, privacy in (("plain", {}), ("dp", {"require_dp": {"max_epsilon": 1e9}})):
        folder = root / name / "site-1"
        shutil.copytree(root / "c" / "site-1", folder)
        config = yaml.safe_load((folder / "site.yaml").read_text())
        config["privacy"] = privacy
        (folder / "site.yaml").write_text(yaml.safe_dump(config))
        out[name] = folder
    clear_sessions()
    return out


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    p = TrainParams.from_query(BASE)
    state = network_of(p).build(p.seed).state_dict()
    return fedavg.encode({k: v.numpy() for k, v in state.items()}, "float32")


HOSTILE_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                           st.sampled_from([11.0, -1.0, 1e308]))
# (legal values, hostile values) of each key; a round has at most one hostile key (so that
# most rounds get past the declaration and train)
KEYS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "batch_size": (st.sampled_from([1, 2, 3, 4, 5, 8, 10, 64]),
                   st.sampled_from([0, -3, 5000])),
    "local_steps": (st.sampled_from([0, 1, 2, 3, 5, 12]), st.sampled_from([-1, 10**6])),
    "epochs": (st.sampled_from([0, 1, 2]), st.sampled_from([-1, 10**5])),
    "lr": (st.sampled_from([1e-3, 1.0, 10.0, 0.0]), HOSTILE_FLOATS),
    "momentum": (st.sampled_from([0.0, 0.9]), st.sampled_from([1.5, -0.1, math.nan])),
    "units": (st.sampled_from([["f0"], ["f1"], ["f0", "f1"]]),
              st.lists(st.sampled_from(["f0", "f1", "f2", "all", "f9", "zz"]), max_size=3)),
    dp.Q_MODE: (st.sampled_from(dp.MODES), st.sampled_from(["none", "off", ""])),
    dp.Q_SIGMA: (st.sampled_from([0.0, 1.0, 50.0]), st.sampled_from([-1.0, math.inf])),
    f"{dp.Q_CLIP}.f0": (st.sampled_from([1e-3, 1.0, 1e9]), st.sampled_from([0.0, -1.0])),
}
DP_KEYS = (dp.Q_MODE, dp.Q_SIGMA, f"{dp.Q_CLIP}.f0")


@st.composite
def rounds(draw: st.DrawFn) -> dict[str, Any]:
    """A round's parameters and DP keys as a hostile coordinator may send them."""
    hostile = draw(st.sampled_from([None, None, None, *KEYS]))
    with_dp = draw(st.booleans()) or hostile in DP_KEYS
    query = {key: draw(strategies[key == hostile]) for key, strategies in KEYS.items()
             if with_dp or key not in DP_KEYS}
    if with_dp and draw(st.booleans()):  # every unit's clipping norm, or f0's only
        query[f"{dp.Q_CLIP}.f1"] = draw(KEYS[f"{dp.Q_CLIP}.f0"][0])
    return query


def ask(folder: Path, action: str, round_query: dict[str, Any],
        weights: dict[str, np.ndarray]) -> dict:
    units = [u for u in round_query["units"] if isinstance(u, str)] or ["f0"]
    query = {"task": "her2-positive", "needs": ["mri"], **BASE, **round_query,
             **{f"w.{u}.{k}": v for u in dict.fromkeys(units) for k, v in weights.items()}}
    return serve(folder, action, query, "r1")


def check_release(reply: dict, query: dict[str, Any], under_dp: bool) -> None:
    assert reply["status"] in ("ok", "refused"), reply.get("reason")
    if reply["status"] != "ok":
        return
    for unit in query["units"]:
        released = [k for k in reply if k.startswith(f"{unit}.delta.")]
        if f"{unit}.loss" in reply:
            assert released and reply[f"{unit}.n"] >= MIN_PATIENTS
        if not released:
            continue
        n = int(reply[f"{unit}.n"])
        assert query["batch_size"] >= MIN_BATCH and n >= max(MIN_UPDATE, MIN_PATIENTS)
        if query["local_steps"] > 0:
            assert n <= query["batch_size"] * query["local_steps"]
        if under_dp:
            assert reply[f"{unit}.{dp.SITE_NOISED}"] == 1 and f"{unit}.loss" not in reply
        assert all(np.all(np.isfinite(np.asarray(reply[k], np.float64))) for k in released
                   if np.asarray(reply[k]).dtype.kind == "f") or not math.isfinite(
            float(query["lr"]))


@SETTINGS
@given(query=rounds(), under_dp=st.booleans())
def test_a_round_never_crashes_nor_releases_what_the_policy_forbids(
        sites: dict[str, Path], weights: dict[str, np.ndarray], query: dict[str, Any],
        under_dp: bool) -> None:
    folder = sites["dp" if under_dp else "plain"]
    check_release(ask(folder, "train.dl_mri", query, weights), query, under_dp)


@SETTINGS
@given(query=rounds())
def test_an_evaluation_never_crashes_nor_releases_an_update(
        sites: dict[str, Path], weights: dict[str, np.ndarray], query: dict[str, Any]) -> None:
    reply = ask(sites["plain"], "evaluate.dl_mri", query, weights)
    assert reply["status"] in ("ok", "refused"), reply.get("reason")
    assert not any(".delta." in k or k.endswith(".loss") for k in reply)
