"""The radiomics and validation stages end to end in the Flower Simulation Engine: two
synthetic hospitals extract pyradiomics features from their MRI (both readers), a third
holds only features.csv; validation runs leave-one-site-out. Checked against pooled
computations on the same features and the sites' own predictions; the report is opened in
headless Chromium."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from client.local.extraction import extract_features
from client.site.folder import load_site
from simulation.cohort import simulate_cohort
from simulation.launcher import run_simulation

pytestmark = pytest.mark.slow
FOLDS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("e2e-radiomics")
    sites_dir = root / "sites"
    simulate_cohort(sites_dir, n_sites=3, n_patients=30, seed=21, effect_size=2.0)
    features = {}
    for site in ("site-1", "site-2", "site-3"):
        loaded = load_site(sites_dir / site, task="her2-positive")
        r1, _ = extract_features(loaded, workers=2)
        r2, _ = extract_features(loaded, reader="r2", workers=2)
        features[site] = (r1, r2)
    # site-3 keeps only its features table
    r1 = features["site-3"][0]
    r1.rename_axis("patient_id").reset_index().to_csv(sites_dir / "site-3" / "features.csv",
                                                      index=False)
    shutil.rmtree(sites_dir / "site-3" / "images")
    shutil.rmtree(sites_dir / "site-3" / "cache", ignore_errors=True)
    out = root / "out"
    rc = run_simulation(sites_dir, out, {"stages": "radiomics,validation",
                                         "cv-folds": str(FOLDS), "validation": "loso",
                                         "radiomics-workers": "1", "seed": "5"}, echo=False)
    results = json.loads((out / "results.json").read_text())
    return {"rc": rc, "results": results, "sites_dir": sites_dir, "features": features,
            "out": out}


def test_stage_runs_on_image_and_feature_only_sites(run: dict) -> None:
    assert run["rc"] == 0
    assert run["results"]["run"]["stages"]["radiomics"]["status"] == "ok"
    radiomics = run["results"]["radiomics"]
    assert {s["site_id"]: s["status"] for s in run["results"]["run"]["sites"]} == {
        "site-1": "ok", "site-2": "ok", "site-3": "ok"}
    assert len(radiomics["folds"]) == FOLDS
    assert radiomics["features"]["n_extracted"] == 1130
    assert radiomics["lasso"]["selected"], "the LASSO selected no feature"
    assert len(radiomics["icc"]) == 1130 and 0 < radiomics["icc_filter"]["kept"] < 1130
    assert radiomics["icc_filter"]["sites"] == ["site-1", "site-2"]  # site-3: no reader 2


def test_icc_matches_the_anova_formula_on_pooled_readers(run: dict) -> None:
    icc = run["results"]["radiomics"]["icc"]
    r1 = pd.concat([run["features"][s][0] for s in ("site-1", "site-2")])
    r2 = pd.concat([run["features"][s][1] for s in ("site-1", "site-2")]).loc[r1.index]
    for name in ("original_firstorder_Mean", "original_glcm_Contrast", "original_shape_Sphericity",
                 "wavelet-LLH_firstorder_Energy"):
        table = np.column_stack([r1[name], r2[name]])
        assert icc[name] == pytest.approx(anova_icc(table), rel=1e-9, abs=1e-12)


def anova_icc(table: np.ndarray) -> float:
    """ICC(2,1) of an (n × k) table from the two-way ANOVA mean squares, textbook style."""
    n, k = table.shape
    grand = table.mean()
    ssr = k * np.sum((table.mean(axis=1) - grand) ** 2)
    ssc = n * np.sum((table.mean(axis=0) - grand) ** 2)
    sse = np.sum((table - grand) ** 2) - ssr - ssc
    msr, msc, mse = ssr / (n - 1), ssc / (k - 1), sse / ((n - 1) * (k - 1))
    return (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)


def test_standardization_equals_pooled_numpy(run: dict) -> None:
    std = run["results"]["radiomics"]["standardization"]
    labelled = {s: load_site(run["sites_dir"] / s, task="her2-positive").clinical.index
                for s in ("site-1", "site-2", "site-3")}
    pooled = pd.concat([run["features"][s][0].loc[labelled[s].intersection(
        run["features"][s][0].index)] for s in labelled])
    for name in list(std["mean"])[:50]:
        assert std["mean"][name] == pytest.approx(pooled[name].mean(), rel=1e-9, abs=1e-9)
        assert std["std"][name] == pytest.approx(pooled[name].std(ddof=0), rel=1e-9)


def test_pooled_oof_auc_bound_holds_the_sites_own_predictions(run: dict) -> None:
    auc = run["results"]["radiomics"]["auc"]["train_oof"]
    run_id = run["results"]["run"]["run_id"]
    scores, labels = [], []
    for site in ("site-1", "site-2", "site-3"):
        if site in auc["sites_missing"]:
            continue
        kept = pd.read_csv(run["sites_dir"] / site / "predictions" / f"radiomics-{run_id}.csv")
        clinical = load_site(run["sites_dir"] / site, task="her2-positive").clinical
        scores.append(kept.score.to_numpy())
        labels.append(clinical.loc[kept.patient_id, "target"].to_numpy())
    truth = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    assert auc["bound"][0] <= truth <= auc["bound"][1]
    assert auc["auc"] > 0.6  # effect size 2: the phantoms' texture carries HER2 status


def _labelled(run: dict, site: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    kept = pd.read_csv(run["sites_dir"] / site / "predictions" / name)
    clinical = load_site(run["sites_dir"] / site, task="her2-positive").clinical
    return kept.score.to_numpy(), clinical.loc[kept.patient_id, "target"].to_numpy()


def test_validation_bounds_hold_the_sites_own_predictions(run: dict) -> None:
    assert run["results"]["run"]["stages"]["validation"]["status"] == "ok"
    v = run["results"]["validation"]["radiomics"]
    run_id = run["results"]["run"]["run_id"]
    parts = {s: _labelled(run, s, f"radiomics-{run_id}.csv") for s in v["sites"]}
    for site, (score, y) in parts.items():
        block = v["sites"][site]
        assert block["auc_bound"][0] <= roc_auc_score(y, score) <= block["auc_bound"][1]
    used = [s for s in parts if s not in v["pooled"]["sites_missing"]]
    truth = roc_auc_score(np.concatenate([parts[s][1] for s in used]),
                          np.concatenate([parts[s][0] for s in used]))
    assert v["pooled"]["auc_bound"][0] <= truth <= v["pooled"]["auc_bound"][1]
    assert v["pooled"]["auc_ci"][0] < v["pooled"]["auc"] < v["pooled"]["auc_ci"][1]


def test_loso_fills_the_matrix_for_every_site(run: dict) -> None:
    loso = run["results"]["validation"]["loso"]
    run_id = run["results"]["run"]["run_id"]
    assert sorted(loso["sites"]) == ["site-1", "site-2", "site-3"]
    for site, row in loso["sites"].items():
        cell = row["radiomics"]
        score, y = _labelled(run, site, f"radiomics-{run_id}-loso-{site}.csv")
        assert cell["auc"] is not None, f"{site}: {cell.get('reason')}"
        assert cell["auc_bound"][0] <= roc_auc_score(y, score) <= cell["auc_bound"][1]
        assert cell["n"] == [int(np.sum(y == 0)), int(np.sum(y == 1))]


def test_report_opens_in_chromium_with_every_figure(run: dict, tmp_path) -> None:
    from tests.test_report_browser import _chromium, _run_chromium

    report = run["out"] / "report.html"
    images = re.findall(r"<img src='([^']+)'", report.read_text(encoding="utf-8"))
    assert len(images) >= 4  # LASSO path, ROC pooled and per model, calibration, LOSO
    dom = _run_chromium(_chromium(), tmp_path / "profile", "--dump-dom", report.as_uri())
    assert "<h2>Validation</h2>" in dom
    assert f'data-figures="{len(images)}/{len(images)}"' in dom


def test_no_feature_value_or_patient_left_the_sites(run: dict) -> None:
    text = json.dumps(run["results"])
    for site in ("site-1", "site-2", "site-3"):
        for patient in run["features"][site][0].index:
            assert patient not in text
        audit = (run["sites_dir"] / site / "audit" / "egress.jsonl").read_text()
        assert "radiomics_extract" in audit and "radiomics_score" in audit
