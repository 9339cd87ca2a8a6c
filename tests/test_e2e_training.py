"""All three CNNs trained federated in Flower's Simulation Engine on CPU, at a tiny size:
the DSFR U-Net (then its features and LR head), DL-MRI (3D ResNet18) and DL-US (ConvNeXt
V2), with 2-fold CV, bfloat16 weights on the wire, `train.<model>` / `evaluate.<model>`
messages through the real ClientApp and egress guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from neural.networks import NetworkSpec
from shared.labels import task_label
from simulation.cohort import simulate_cohort
from simulation.launcher import run_simulation

pytestmark = pytest.mark.slow
SITES = ("site-1", "site-2")
TINY = {"stages": "dsfr,deep", "rounds": "2", "local-epochs": "dsfr=2,dl_mri=1,dl_us=1",
        "cnn-width": "0.0625", "mri-size": "16", "us-size": "32", "dsfr-size": "32",
        "deep-cv-folds": "2", "cv-folds": "3", "lr": "dl_us=1e-3", "wire-dtype": "bfloat16",
        "gradcam-patients": "1", "seed": "4"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("e2e-training")
    # seed 3: each site has >= min_patients (10) of each label (seed 8's site-1 had 9
    # positives, so its out-of-fold histograms were refused and the pooled AUC was one site's)
    simulate_cohort(root / "sites", n_sites=2, n_patients=30, seed=3, effect_size=2.0,
                    image_size=24)
    out = root / "out"
    rc = run_simulation(root / "sites", out, TINY, echo=False)
    results = json.loads((out / "results.json").read_text())
    return {"rc": rc, "results": results, "sites": root / "sites", "out": out}


def test_all_three_models_trained_federated(run: dict) -> None:
    assert run["rc"] == 0, (run["out"] / "run.log").read_text()[-3000:]
    stages = run["results"]["run"]["stages"]
    assert stages["dsfr"]["status"] == "ok" and stages["deep"]["status"] == "ok", stages
    models = {"dsfr": run["results"]["dsfr"]["training"],
              **run["results"]["deep"]["models"]}
    assert set(models) == {"dsfr", "dl_mri", "dl_us"}
    for name, model in models.items():
        assert model["mode"] == "federated" and model["sites"] == list(SITES)
        assert [r["round"] for r in model["rounds"]] == [1, 2]
        for entry in model["rounds"]:
            for site in SITES:
                info = entry["sites"][site]
                assert set(info["n"]) == set(model["units"]), (name, info)
                assert info["device"] == "cpu" and info["wire"]["up"] > 0
        # per-round federated validation keyed by site id, for w_0 … w_2
        assert list(model["validation"]) == ["0", "1", "2"]
        metric = "dice" if name == "dsfr" else "loss"
        for summary in model["validation"].values():
            assert summary["metric"] == metric
            assert summary["pooled"][metric] is not None
            assert set(summary["sites"]) == set(SITES)
        checkpoint = json.loads((Path(model["checkpoint"]) / "checkpoint.json").read_text())
        assert checkpoint["round"] == 2 and checkpoint["fingerprint"]
        assert (Path(model["checkpoint"]) / "final.npz").is_file()


def test_bfloat16_weights_on_the_wire(run: dict) -> None:
    model = run["results"]["deep"]["models"]["dl_us"]
    net = NetworkSpec("dl_us", width=0.0625).build(0)
    floats = sum(v.numel() for v in net.state_dict().values() if v.is_floating_point())
    units = len(model["units"])
    wire = model["wire"]
    assert wire["dtype"] == "bfloat16"
    for site in SITES:
        assert wire["per_round"][site]["down"] == [2 * floats * units] * 2
        assert wire["per_round"][site]["up"] == [2 * floats * units] * 2
    sent = [m for m in run["results"]["run"]["wire"]["site-1"]
            if m["message_type"] == "train.dl_us"]
    assert len(sent) == 2 and all(m["bytes"] > 2 * floats * units for m in sent)


def test_dsfr_features_and_head(run: dict) -> None:
    dsfr = run["results"]["dsfr"]
    # the scratch recipe's layer: the last encoder block, 512 channels at width 1 (/16)
    assert dsfr["features"]["n_extracted"] == 32
    assert dsfr["features"]["layer"] == "activation_7"
    assert dsfr["screen"]["method"] == "mi" and len(dsfr["folds"]) == 3
    assert dsfr["auc"]["train_oof"]["n"] is not None
    dice = dsfr["training"]["validation"]["2"]["sites"]
    released = [s for s in SITES if "dice" in dice[s]]
    assert released and all(0 <= dice[s]["dice"] <= 1 for s in released)
    for site in set(SITES) - set(released):  # a third of a small site: under min_patients
        assert "fewer than min_patients" in dice[site]["refused"]


def test_probabilities_and_gradcam_stay_at_the_sites(run: dict) -> None:
    run_id = run["results"]["run"]["run_id"]
    text = json.dumps(run["results"])
    for site in SITES:
        folder = run["sites"] / site
        for model in ("dl_mri", "dl_us", "dsfr"):
            frame = pd.read_csv(folder / "predictions" / f"{model}-{run_id}.csv")
            assert frame.score.between(0, 1).all() and len(frame) >= 20
            if model != "dsfr":
                assert set(frame.kind) == {"out-of-fold"}
                assert len(list((folder / "gradcam" / f"{model}-{run_id}").glob("*.png"))) == 1
        for patient in pd.read_csv(folder / "clinical.csv").patient_id:
            assert patient not in text
        audit = [json.loads(line) for line in (folder / "audit" / "egress.jsonl")
                 .read_text().splitlines()]
        types = {a["message_type"] for a in audit}
        assert {"train.dsfr", "train.dl_mri", "train.dl_us", "evaluate.dl_mri",
                "query.train_setup", "query.train_score", "query.dsfr_features"} <= types
        update = next(a for a in audit if a["message_type"] == "train.dl_mri")
        assert any(v["dtype"] == "uint16" for k, v in update["arrays"].items()
                   if ".delta." in k)  # bfloat16 bits


def own_oof_auc(run: dict, model: str, sites: tuple[str, ...] = SITES) -> float:
    """scikit-learn's AUC of the out-of-fold scores `sites` wrote for `model` (their own
    files, never sent), against the her2-positive labels of their clinical.csv."""
    run_id = run["results"]["run"]["run_id"]
    frames = []
    for site in sites:
        folder = run["sites"] / site
        scores = pd.read_csv(folder / "predictions" / f"{model}-{run_id}.csv")
        clinical = pd.read_csv(folder / "clinical.csv", dtype=str, keep_default_na=False)
        frames.append(scores.merge(clinical, on="patient_id", validate="one_to_one"))
    rows = pd.concat(frames, ignore_index=True)
    assert set(rows.kind) == {"out-of-fold"} and len(rows) >= 20 * len(sites)
    y = [task_label("her2-positive", ihc, ish or None)
         for ihc, ish in zip(rows.her2_ihc, rows.her2_ish, strict=True)]
    return float(roc_auc_score(y, rows.score))


def test_deep_auc_from_histograms(run: dict) -> None:
    """Both sites release their histograms (each has >= min_patients of each label), so the
    pooled out-of-fold AUC is there, over both, and its bound holds (or, proved exact, it
    equals) the AUC of the sites' own scores."""
    for model in ("dl_mri", "dl_us"):
        auc = run["results"]["deep"]["models"][model]["auc"]
        assert set(auc["sites"]) == set(SITES)
        oof = auc["train_oof"]
        blocks = {SITES: oof, **{(s,): auc["sites"][s] for s in SITES}}
        for sites, block in blocks.items():  # pooled, then each site's own
            assert block["auc"] is not None and block["auc_sites_missing"] == [], block
            low, high = block["auc_bound"]
            truth = own_oof_auc(run, model, sites)
            assert low - 1e-12 <= truth <= high + 1e-12, (sites, block, truth)
            assert low <= block["auc"] <= high, block
            if block["auc_exact"]:
                assert block["auc"] == pytest.approx(truth, abs=1e-9)
        assert np.isfinite(run["results"]["deep"]["models"][model]["seconds"])


def test_every_training_statistic_passes_the_ledger(run: dict) -> None:
    """The CNN rounds' updates, validation sums and histograms, scores and DSFR features
    all name their patients and families for the sites' ledgers (none is unchecked), and
    the project's own folds and rounds are not refused."""
    for site in SITES:
        lines = (run["sites"] / site / "audit" / "egress.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        training = [r for r in records if r["message_type"].startswith(("train.", "evaluate."))]
        assert training and all(r["ledger"]["checked"] > 0 for r in training)
        assert all(r["ledger"]["unchecked"] == 0 for r in records if "ledger" in r), site
    ledger = run["results"]["run"]["ledger"]
    assert ledger["refused"] == 0, ledger["sites"]
