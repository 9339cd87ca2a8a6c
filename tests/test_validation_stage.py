"""The validation and fusion stages through the in-process transport, against scikit-learn
and a direct DeLong computation on the pooled scores.

Four sites of scikit-learn's Wisconsin breast-cancer set (non-IID split; site-4 has role
`external`) each hold `predictions.csv` with two outside models' scores — logistic models
on different feature subsets, snapped to the centres of the 200-bin grid so that the
histograms lose nothing — and a categorical `hr_status` column for subgroups. With
`min_cell_count: 1` the federated statistics must equal the pooled library ones; with the
default 3 the AUC must lie in the stated bound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve
from sklearn.preprocessing import StandardScaler

from client.handlers import serve
from server.workflow import run_study
from shared import roc
from shared import validation as val
from shared.config import StudyConfig, stage_settings
from simulation.in_process import InProcessTransport
from tests.splits import non_iid_split, wisconsin
from tests.test_validation_stats import direct_delong

EDGES = roc.grid(200)
MODELS = {"m_a": ["mean texture", "mean smoothness"],
          "m_b": ["mean symmetry", "texture error", "mean fractal dimension"]}
NOT_FEATURES = ("patient_id", "label", "hr_status", *MODELS)


def cohort() -> list[pd.DataFrame]:
    frame = wisconsin()
    frame.insert(0, "patient_id", [f"w{i:04d}" for i in range(len(frame))])
    for name, cols in MODELS.items():
        x = StandardScaler().fit_transform(frame[cols])
        raw = LogisticRegression().fit(x, frame.label).predict_proba(x)[:, 1]
        frame[name] = val.snap(raw, EDGES)
    symmetry = frame["mean symmetry"]
    frame["hr_status"] = np.where(symmetry > symmetry.median(), "positive", "negative")
    return non_iid_split(frame, by="mean texture", n_sites=4, seed=2)


def write_sites(root: Path, parts: list[pd.DataFrame], min_cell: int,
                features: bool = False) -> list[Path]:
    folders = []
    for i, part in enumerate(parts):
        folder = root / f"site-{i + 1}"
        folder.mkdir(parents=True)
        roles = ["external"] if i == len(parts) - 1 else ["train"]
        (folder / "site.yaml").write_text(yaml.safe_dump({
            "site_id": f"site-{i + 1}", "roles": roles, "time_unit": "days",
            "privacy": {"min_patients": 10, "min_cell_count": min_cell}}))
        part[["patient_id", "label", "hr_status"]].to_csv(folder / "clinical.csv", index=False)
        if features:
            part.drop(columns=[c for c in NOT_FEATURES if c != "patient_id"]).to_csv(
                folder / "features.csv", index=False)
        long = pd.concat([pd.DataFrame({"patient_id": part.patient_id, "model": m,
                                        "score": part[m]}) for m in MODELS])
        long.to_csv(folder / "predictions.csv", index=False)
        folders.append(folder)
    return folders


def run(folders: list[Path], out: Path, stages: tuple[str, ...], **extra) -> dict:
    """The study on the uniform 200-bin grid (the scores are snapped to its centres) unless
    `validation-grid` says otherwise."""
    config = StudyConfig(out_dir=str(out), task="label", stages=stages,
                         settings=stage_settings({"subgroups": "hr_status",
                                                  "validation-grid": "uniform", **extra}))
    return run_study(InProcessTransport(folders), config)


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("validation")
    parts = cohort()
    results = run(write_sites(root / "sites", parts, min_cell=1), root / "out", ("validation",))
    return {"results": results, "parts": parts}


def pooled(parts: list[pd.DataFrame], sites: list[int] | None = None) -> pd.DataFrame:
    return pd.concat([parts[i] for i in (sites or range(len(parts)))])


def test_stage_ran_on_every_site_with_its_roles(exact) -> None:
    v = exact["results"]["validation"]
    assert exact["results"]["run"]["stages"]["validation"]["status"] == "ok"
    assert v["models"] == ["m_a", "m_b"]
    assert v["sets"]["m_a"] == {"pooled": ["site-1", "site-2", "site-3", "site-4"],
                                "training": ["site-1", "site-2", "site-3"],
                                "external": ["site-4"]}
    assert v["m_a"]["kinds"]["site-1"] == "outside"


@pytest.mark.parametrize("model", list(MODELS))
def test_auc_and_delong_ci_equal_pooled_references(exact, model: str) -> None:
    parts, v = exact["parts"], exact["results"]["validation"][model]
    for name, sites in (("pooled", None), ("training", [0, 1, 2]), ("external", [3])):
        rows = pooled(parts, sites)
        aucs, cov = direct_delong([rows[model].to_numpy()], rows.label.to_numpy())
        block = v[name]
        assert block["exact"] is True
        assert block["auc"] == pytest.approx(roc_auc_score(rows.label, rows[model]), abs=1e-9)
        se = np.sqrt(cov[0, 0])
        assert block["auc_se"] == pytest.approx(se, abs=1e-9)
        z = stats.norm.ppf(0.975)
        assert block["auc_ci"] == pytest.approx([max(0, aucs[0] - z * se),
                                                 min(1, aucs[0] + z * se)], abs=1e-9)
        assert block["auc_bound"][0] <= block["auc"] <= block["auc_bound"][1]
    for i, part in enumerate(parts):
        assert v["sites"][f"site-{i + 1}"]["auc"] == pytest.approx(
            roc_auc_score(part.label, part[model]), abs=1e-9)


def test_paired_delong_equals_direct(exact) -> None:
    parts = exact["parts"]
    by_set = {c["set"]: c for c in exact["results"]["validation"]["comparisons"]}
    for name, sites in (("pooled", None), ("training", [0, 1, 2]), ("site:site-2", [1])):
        rows = pooled(parts, sites)
        aucs, cov = direct_delong([rows.m_a.to_numpy(), rows.m_b.to_numpy()],
                                  rows.label.to_numpy())
        z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
        c = by_set[name]
        assert c["models"] == ["m_a", "m_b"] and c["exact"] is True
        assert c["delta_auc"] == pytest.approx(aucs[0] - aucs[1], abs=1e-9)
        assert c["z"] == pytest.approx(z, abs=1e-9)
        assert c["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), abs=1e-9)


@pytest.mark.parametrize("model", list(MODELS))
def test_youden_of_training_sites_is_applied_unchanged(exact, model: str) -> None:
    parts, v = exact["parts"], exact["results"]["validation"][model]
    train = pooled(parts, [0, 1, 2])
    # the Youden cut by brute force over the scores (ties: the lowest threshold); the stage
    # reports a refined-grid edge that calls the same training patients positive
    ref = youden_by_scores(train[model].to_numpy(), train.label.to_numpy())
    threshold = v["threshold"]["value"]
    assert v["threshold"]["source"] == "training"
    np.testing.assert_array_equal(train[model] >= threshold, train[model] >= ref)
    for name, rows in (("external", parts[3]), ("pooled", pooled(parts)), ("training", train)):
        block = v[name]
        pred = (rows[model] >= threshold).astype(int)
        tn, fp, fn, tp = confusion_matrix(rows.label, pred).ravel()
        assert block["threshold"] == threshold
        assert block["confusion"] == [[tn, fp], [fn, tp]]
        assert block["sen"] == tp / (tp + fn) and block["spe"] == tn / (tn + fp)
        assert block["ppv"] == tp / (tp + fp) and block["npv"] == tn / (tn + fn)
        assert block["acc"] == (tp + tn) / len(rows)
        assert block["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-15)
        lo, hi = block["ci"]["sen"]
        assert lo < block["sen"] < hi
    # each set's own optimum is reported beside the applied cut
    ext = parts[3]
    own = [np.mean(ext[model][ext.label == 1] >= e) - np.mean(ext[model][ext.label == 0] >= e)
           for e in np.unique(ext[model])]
    cut = youden_by_scores(ext[model].to_numpy(), ext.label.to_numpy())
    np.testing.assert_array_equal(ext[model] >= v["external"]["own"]["threshold"],
                                  ext[model] >= cut)
    assert v["external"]["own"]["j"] == pytest.approx(max(own), abs=1e-12)


def youden_by_scores(score: np.ndarray, y: np.ndarray) -> float:
    """The lowest score value t maximising TPR − FPR of `score >= t` (scikit-learn's
    roc_curve thresholds, every distinct score a candidate)."""
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    j = tpr - fpr
    return float(np.min(thresholds[np.isclose(j, j.max(), rtol=0, atol=1e-12)]))


@pytest.mark.parametrize("model", list(MODELS))
def test_calibration_and_brier_equal_sklearn(exact, model: str) -> None:
    rows = pooled(exact["parts"])
    block = exact["results"]["validation"][model]["pooled"]
    true, pred = calibration_curve(rows.label, rows[model], n_bins=10, strategy="uniform")
    np.testing.assert_allclose(block["calibration"]["prob_true"], true, atol=1e-12)
    np.testing.assert_allclose(block["calibration"]["prob_pred"], pred, atol=1e-12)
    assert block["brier"] == pytest.approx(brier_score_loss(rows.label, rows[model]), abs=1e-12)
    logit = np.log(rows[model] / (1 - rows[model])).to_numpy()[:, None]
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(logit, rows.label)
    assert block["calibration_slope"] == pytest.approx(ref.coef_[0][0], abs=1e-5)
    assert block["calibration_intercept"] == pytest.approx(ref.intercept_[0], abs=1e-5)


def test_subgroups_equal_roc_auc_score_on_the_subgroup(exact) -> None:
    rows = pooled(exact["parts"])
    groups = exact["results"]["validation"]["m_a"]["subgroups"]
    assert sorted(groups) == ["hr_status=negative", "hr_status=positive"]
    for level in ("negative", "positive"):
        sub = rows[rows.hr_status == level]
        assert groups[f"hr_status={level}"]["auc"] == pytest.approx(
            roc_auc_score(sub.label, sub.m_a), abs=1e-9)


def test_coarsened_histograms_give_a_bound_that_holds(tmp_path: Path) -> None:
    parts = cohort()
    results = run(write_sites(tmp_path / "sites", parts, min_cell=5), tmp_path / "out",
                  ("validation",))
    v = results["validation"]
    for model in MODELS:
        for name, sites in (("pooled", None), ("external", [3])):
            rows = pooled(parts, sites)
            truth = roc_auc_score(rows.label, rows[model])
            block = v[model][name]
            assert block["exact"] is False
            assert block["auc_bound"][0] <= truth <= block["auc_bound"][1]
            # a site bins in at most n // 5 bins and tiles its cells (issue 25): the estimate
            # (each cell at its mean score) is within 0.02 here, the bound holds it
            assert abs(block["auc"] - truth) < 0.02
            assert block["brier"] == pytest.approx(brier_score_loss(rows.label, rows[model]),
                                                   abs=1e-12)  # sums: exact regardless
    # what a site sends: cells of >= 5 patients, nothing per patient
    reply = serve(tmp_path / "sites" / "site-2", "validation_scores",
                  {"task": "label", "needs": "predictions", "bins": 200,
                   "subgroups": ["hr_status"]}, "check")
    counts = [np.asarray(v) for k, v in reply.items() if k.rsplit(".", 1)[-1].startswith("count")]
    assert reply["status"] == "ok" and counts
    assert all(np.all(c >= 5) for c in counts)
    assert not any(isinstance(v, str) and v.startswith("w0") for v in reply.values())


def test_loso_fills_the_matrix_for_every_training_site(tmp_path: Path) -> None:
    parts = cohort()
    folders = write_sites(tmp_path / "sites", parts, min_cell=1, features=True)
    results = run(folders, tmp_path / "out", ("radiomics", "validation"), validation="loso",
                  **{"cv-folds": 3})
    loso = results["validation"]["loso"]
    assert loso["models"] == ["radiomics"]
    assert sorted(loso["sites"]) == ["site-1", "site-2", "site-3"]  # site-4 is external
    for i, site in enumerate(sorted(loso["sites"])):
        cell = loso["sites"][site]["radiomics"]
        held = pd.read_csv(folders[i] / "predictions" / f"radiomics-in-process-loso-{site}.csv")
        assert set(held.kind) == {"external"}  # scored by models that never saw it
        labels = parts[i].set_index("patient_id").loc[held.patient_id, "label"]
        # refined until exact: the AUC of the raw held-out scores, not of the binned ones
        assert cell["exact"] is True
        assert cell["auc"] == pytest.approx(roc_auc_score(labels, held.score), abs=1e-9)
        assert cell["auc_ci"][0] < cell["auc"] <= cell["auc_ci"][1]
    # the study's own radiomics fit (all training sites) is untouched by the LOSO fits
    main = pd.read_csv(folders[0] / "predictions" / "radiomics-in-process.csv")
    assert set(main.kind) == {"out-of-fold"}


def write_run_predictions(folders: list[Path], parts: list[pd.DataFrame]) -> None:
    """Probabilities of two 'CNN' models as the deep stage leaves them at the sites."""
    rng = np.random.default_rng(5)
    for folder, part in zip(folders, parts, strict=True):
        kind = "external" if folder.name == "site-4" else "out-of-fold"
        (folder / "predictions").mkdir(exist_ok=True)
        for model, cols, noise in (("dl_mri", ["mean radius"], 1.5),
                                   ("dl_us", ["mean concave points"], 2.0)):
            z = (part[cols[0]] - part[cols[0]].mean()) / part[cols[0]].std()
            score = 1 / (1 + np.exp(-(z + rng.normal(0, noise, len(z)))))
            pd.DataFrame({"patient_id": part.patient_id, "model": model, "score": score,
                          "kind": kind}).to_csv(
                folder / "predictions" / f"{model}-in-process.csv", index=False)


def test_late_fusion_equals_pooled_logistic_regression(tmp_path: Path) -> None:
    parts = cohort()
    folders = write_sites(tmp_path / "sites", parts, min_cell=1)
    write_run_predictions(folders, parts)
    results = run(folders, tmp_path / "out", ("fusion", "validation"), **{"fusion-C": 0.5})
    fusion = results["fusion"]["fusion"]
    frames = []
    for folder, part in zip(folders[:3], parts[:3], strict=True):  # training sites only
        wide = pd.concat([pd.read_csv(folder / "predictions" / f"{m}-in-process.csv")
                          .set_index("patient_id").score.rename(m) for m in ("dl_mri", "dl_us")],
                         axis=1)
        frames.append(wide.join(part.set_index("patient_id").label))
    train = pd.concat(frames)
    ref = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(
        train[["dl_mri", "dl_us"]], train.label)
    assert fusion["sites"] == ["site-1", "site-2", "site-3"]
    assert fusion["external"] == ["site-4"]
    assert [fusion["coef"]["dl_mri"], fusion["coef"]["dl_us"]] == pytest.approx(
        ref.coef_[0], abs=1e-6)
    assert fusion["intercept"] == pytest.approx(ref.intercept_[0], abs=1e-6)
    # the fused probabilities are validated like any model (external site: kind external)
    v = results["validation"]
    assert "fusion" in v["models"] and v["fusion"]["kinds"]["site-4"] == "external"
    ext = pd.read_csv(folders[3] / "predictions" / "fusion-in-process.csv")
    wide = pd.concat([pd.read_csv(folders[3] / "predictions" / f"{m}-in-process.csv")
                      .set_index("patient_id").score.rename(m) for m in ("dl_mri", "dl_us")],
                     axis=1).loc[ext.patient_id]
    np.testing.assert_allclose(ext.score, ref.predict_proba(wide)[:, 1], atol=1e-6)
    # no radiomics/DSFR probabilities here: DLR is skipped with its reason
    assert "skipped" in results["fusion"]["dlr"]


def test_a_site_with_a_bad_predictions_file_fails_alone(tmp_path: Path) -> None:
    parts = cohort()
    folders = write_sites(tmp_path / "sites", parts, min_cell=1)
    (folders[1] / "predictions.csv").write_text("patient_id,model\nw0001,m_a\n")
    results = run(folders, tmp_path / "out", ("validation",))
    v = results["validation"]
    assert v["sites"]["site-2"]["status"] == "failed"
    assert "predictions.csv" in v["sites"]["site-2"]["reason"]
    assert "site-2" not in v["sets"]["m_a"]["pooled"]
    rows = pooled(parts, [0, 2, 3])
    assert v["m_a"]["pooled"]["auc"] == pytest.approx(roc_auc_score(rows.label, rows.m_a),
                                                      abs=1e-9)


def test_adaptive_grid_resolves_scores_in_a_narrow_range(tmp_path: Path) -> None:
    """A model whose probabilities all lie near 0.35 (like a weak late fusion) has them in
    two or three bins of the uniform grid; the adaptive grid, placed from the pooled mean and
    SD of the logit scores, resolves them. Refinement then makes both exact on the raw
    scores."""
    parts = cohort()
    for part in parts:
        part["m_a"] = 0.35 + 0.01 * (part["m_a"] - 0.5)  # same ranking, range 0.345–0.355
    results = {grid: run(write_sites(tmp_path / grid, parts, min_cell=1), tmp_path / f"o{grid}",
                         ("validation",), **{"validation-grid": grid})
               for grid in ("uniform", "adaptive")}
    rows = pooled(parts)
    truth = roc_auc_score(rows.label, rows.m_a)
    coarse = results["uniform"]["validation"]["m_a"]["pooled"]
    fine = results["adaptive"]["validation"]["m_a"]["pooled"]
    for grid in results:
        assert results[grid]["validation"]["refinement"]["rounds"] <= 3
    for block in (coarse, fine):
        assert block["exact"] is True
        assert block["auc"] == pytest.approx(truth, abs=1e-9)
        assert block["auc_bound"] == pytest.approx([truth, truth], abs=1e-9)
    grid = results["adaptive"]["validation"]["grid"]
    edges = np.asarray(grid["edges"]["m_a"])
    assert grid["kind"] == "adaptive" and edges[0] == 0 and edges[-1] == 1
    assert np.all(np.isin(np.linspace(0, 1, 11), edges))  # calibration bins stay unions
    # calibration and Brier still equal sklearn's on the adaptive grid
    true, pred = calibration_curve(rows.label, rows.m_a, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(fine["calibration"]["prob_pred"], pred, atol=1e-12)
    np.testing.assert_allclose(fine["calibration"]["prob_true"], true, atol=1e-12)
    assert fine["brier"] == pytest.approx(brier_score_loss(rows.label, rows.m_a), abs=1e-12)
