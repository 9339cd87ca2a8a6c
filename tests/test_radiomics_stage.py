"""The radiomics stage on sites that hold only features.csv (scikit-learn's Wisconsin
breast-cancer features, image-derived), through the in-process transport, against
scikit-learn on the pooled rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from server.workflow import run_study
from shared.config import StudyConfig, stage_settings
from shared.folds import stratified_folds
from simulation.in_process import InProcessTransport
from tests.splits import non_iid_split, wisconsin

FOLDS, SEED, LASSO_C, LR_C = 5, 3, 0.05, 0.5
BASE = {"cv-folds": FOLDS, "seed": SEED, "lasso-C": LASSO_C, "lr-C": LR_C}


def write_feature_site(root: Path, site_id: str, rows: pd.DataFrame, **privacy) -> Path:
    folder = root / site_id
    folder.mkdir(parents=True)
    policy = {"min_patients": 10, "min_cell_count": 3, **privacy}
    (folder / "site.yaml").write_text(yaml.safe_dump(
        {"site_id": site_id, "roles": ["train"], "time_unit": "days", "privacy": policy}))
    rows[["patient_id", "label"]].to_csv(folder / "clinical.csv", index=False)
    rows.drop(columns=["label"]).to_csv(folder / "features.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("radiomics")
    frame = wisconsin()
    frame.insert(0, "patient_id", [f"w{i:04d}" for i in range(len(frame))])
    parts = non_iid_split(frame, by="mean area", n_sites=3, seed=2)
    results = run_radiomics_study(root, parts, selection="paper", screen="chi2",
                                  **{"screen-percentile": 50.0})
    return {"results": results, "parts": parts, "frame": frame}


def run_radiomics_study(root: Path, parts: list[pd.DataFrame], **extra) -> dict:
    """The radiomics stage on feature-only sites made from `parts`; its results block."""
    folders = [write_feature_site(root / "sites", f"site-{i + 1}", p)
               for i, p in enumerate(parts)]
    config = StudyConfig(out_dir=str(root / "out"), task="label", stages=("radiomics",),
                         settings=stage_settings({**BASE, **extra}))
    return run_study(InProcessTransport(folders), config)["radiomics"]


def features(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in ("patient_id", "label")]


def test_pooled_standardization_matches_standard_scaler(study: dict) -> None:
    names = features(study["frame"])
    scaler = StandardScaler().fit(pd.concat(study["parts"])[names])
    std = study["results"]["standardization"]
    np.testing.assert_allclose([std["mean"][n] for n in names], scaler.mean_, rtol=1e-9)
    np.testing.assert_allclose([std["std"][n] for n in names], scaler.scale_, rtol=1e-9)


def test_lasso_matches_pooled_l1_logistic(study: dict) -> None:
    names = features(study["frame"])
    pooled = pd.concat(study["parts"])
    z = StandardScaler().fit_transform(pooled[names])
    ref = LogisticRegression(l1_ratio=1.0, penalty="l1", C=LASSO_C, solver="saga",
                             tol=1e-12, max_iter=200_000).fit(z, pooled.label)
    lasso = study["results"]["lasso"]
    np.testing.assert_allclose([lasso["coef"][n] for n in names], ref.coef_[0], atol=2e-6)
    assert lasso["selected"] == [n for n, w in zip(names, ref.coef_[0], strict=True) if w != 0]


def test_fold_models_match_pooled_lbfgs_on_the_same_folds(study: dict) -> None:
    results, parts = study["results"], study["parts"]
    chosen = results["selected"]
    folds = [stratified_folds(p.label.to_numpy(), FOLDS, SEED, f"site-{i + 1}")
             for i, p in enumerate(parts)]
    oof_scores, oof_labels = [], []
    for k in range(FOLDS):
        train = pd.concat([p[f != k] for p, f in zip(parts, folds, strict=True)])
        test = pd.concat([p[f == k] for p, f in zip(parts, folds, strict=True)])
        scaler = StandardScaler().fit(train[chosen])
        ref = LogisticRegression(C=LR_C, tol=1e-12, max_iter=10_000).fit(
            scaler.transform(train[chosen]), train.label)
        fold = results["folds"][k]
        assert fold["features"] == chosen
        np.testing.assert_allclose([fold["coef"][n] for n in chosen], ref.coef_[0], atol=1e-6)
        assert fold["intercept"] == pytest.approx(ref.intercept_[0], abs=1e-6)
        oof_scores.append(ref.predict_proba(scaler.transform(test[chosen]))[:, 1])
        oof_labels.append(test.label.to_numpy())
    auc = results["auc"]["train_oof"]
    # a site with fewer than min_patients (10) patients of a label refuses its histogram
    small = [f"site-{i + 1}" for i, p in enumerate(parts) if p.label.value_counts().min() < 10]
    assert auc["sites_missing"] == small
    released = [i for i, p in enumerate(parts) if f"site-{i + 1}" not in small]
    labels = np.concatenate(oof_labels)
    scores = np.concatenate(oof_scores)
    site_of = np.concatenate([np.concatenate([np.full(int(np.sum(f == k)), i)
                                              for i, f in enumerate(folds)])
                              for k in range(FOLDS)])
    keep = np.isin(site_of, released)
    truth = roc_auc_score(labels[keep], scores[keep])
    assert auc["bound"][0] <= truth <= auc["bound"][1]
    assert auc["n"] == [int(np.sum(labels[keep] == 0)), int(np.sum(labels[keep] == 1))]


def test_icc_is_skipped_without_reader_two(study: dict) -> None:
    assert "reader-2" in study["results"]["icc"]["reason"]


def test_sites_refusing_pxp_matrices_reach_the_same_lasso(tmp_path: Path, study: dict) -> None:
    parts = study["parts"]
    folders = [write_feature_site(tmp_path / "sites", f"site-{i + 1}", p,
                                  max_feature_ratio=0.01 if i == 1 else 0.33)
               for i, p in enumerate(parts)]
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label", stages=("radiomics",),
                         settings=stage_settings({**BASE, "selection": "paper"}))
    results = run_study(InProcessTransport(folders), config)["radiomics"]
    assert results["lasso"]["mode"] == "gradient"
    assert study["results"]["lasso"]["mode"] == "newton"
    names = features(study["frame"])
    np.testing.assert_allclose([results["lasso"]["coef"][n] for n in names],
                               [study["results"]["lasso"]["coef"][n] for n in names], atol=1e-6)
    for ours, newton in zip(results["folds"], study["results"]["folds"], strict=True):
        np.testing.assert_allclose(list(ours["coef"].values()), list(newton["coef"].values()),
                                   atol=1e-6)
    audit = (folders[1] / "audit" / "egress.jsonl").read_text()
    assert "max_feature_ratio" in audit


def test_in_fold_selection_selects_inside_each_fold(tmp_path: Path, study: dict) -> None:
    parts = study["parts"]
    results = run_radiomics_study(tmp_path, parts, selection="in-fold", screen="mi",
                                  **{"screen-percentile": 60.0})
    names = features(study["frame"])
    folds = [stratified_folds(p.label.to_numpy(), FOLDS, SEED, f"site-{i + 1}")
             for i, p in enumerate(parts)]
    for k in range(FOLDS):
        train = pd.concat([p[f != k] for p, f in zip(parts, folds, strict=True)])
        z = StandardScaler().fit_transform(train[names])
        ref = LogisticRegression(penalty="l1", C=LASSO_C, solver="saga", tol=1e-12,
                                 max_iter=200_000).fit(z, train.label)
        lasso_selected = [n for n, w in zip(names, ref.coef_[0], strict=True) if w != 0]
        fold = results["folds"][k]
        assert fold["lasso_selected"] == lasso_selected
        assert set(fold["features"]) <= set(lasso_selected)
        assert 0 < len(fold["features"]) <= len(lasso_selected)
    assert results["screen"]["method"] == "mi"


def test_external_site_is_never_fitted_on_and_scores_with_the_fold_mean(
        tmp_path: Path, study: dict) -> None:
    parts = study["parts"]
    folders = [write_feature_site(tmp_path / "sites", f"site-{i + 1}", p)
               for i, p in enumerate(parts)]
    external = folders[2]
    config_yaml = yaml.safe_load((external / "site.yaml").read_text())
    config_yaml["roles"] = ["external"]
    (external / "site.yaml").write_text(yaml.safe_dump(config_yaml))
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label", stages=("radiomics",),
                         settings=stage_settings({**BASE, "selection": "paper"}))
    results = run_study(InProcessTransport(folders), config)
    radiomics = results["radiomics"]
    names = features(study["frame"])
    train = pd.concat(parts[:2])
    scaler = StandardScaler().fit(train[names])
    np.testing.assert_allclose([radiomics["standardization"]["mean"][n] for n in names],
                               scaler.mean_, rtol=1e-9)  # fitted on the training sites only
    assert radiomics["sites"]["site-3"]["role"] == "external"
    (saved,) = (external / "predictions").glob("radiomics-*.csv")
    kept = pd.read_csv(saved)
    x = parts[2].set_index("patient_id").loc[kept.patient_id]
    expected = np.mean([1 / (1 + np.exp(-(f["intercept"] + sum(
        f["coef"][n] * (x[n] - f["center"][n]) / f["scale"][n] for n in f["features"]))))
        for f in radiomics["folds"]], axis=0)
    np.testing.assert_allclose(kept.score, expected, rtol=1e-9)
    assert set(kept.kind) == {"external"}
    assert radiomics["auc"]["external"]["n"] == [int((x.label == 0).sum()),
                                                 int((x.label == 1).sum())]


def test_squared_loss_lasso_matches_sklearn_lasso(tmp_path: Path, study: dict) -> None:
    from sklearn.linear_model import Lasso

    parts = study["parts"]
    folders = [write_feature_site(tmp_path / "sites", f"site-{i + 1}", p)
               for i, p in enumerate(parts)]
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label", stages=("radiomics",),
                         settings=stage_settings({"cv-folds": FOLDS, "seed": SEED,
                                                 "lasso-loss": "squared", "lasso-alpha": 0.01,
                                                 "selection": "paper",
                                                 "screen-order": "screen-first",
                                                 "screen-percentile": 40.0}))
    radiomics = run_study(InProcessTransport(folders), config)["radiomics"]
    names = features(study["frame"])
    pooled = pd.concat(parts)
    z = pd.DataFrame(StandardScaler().fit_transform(pooled[names]), columns=names)
    screened = radiomics["screen"]["selected"]
    assert len(screened) == int(len(names) * 0.4)
    ref = Lasso(alpha=0.01, tol=1e-12, max_iter=100_000).fit(z[screened], pooled.label)
    np.testing.assert_allclose([radiomics["lasso"]["coef"][n] for n in screened], ref.coef_,
                               atol=1e-6)
    assert radiomics["lasso"]["intercept"] == pytest.approx(ref.intercept_, abs=1e-6)


class DropsMidFit(InProcessTransport):
    """site-3 stops answering at its 5th solver round (as a SuperNode that went away)."""

    status, reason = "dropped", "node unavailable"

    def __init__(self, folders: list[Path]) -> None:
        super().__init__(folders)
        self.steps = 0

    def ask(self, action, query, sites):
        from server.core.transport import Reply

        sites = list(sites)
        if action == "radiomics_step" and "site-3" in sites:
            self.steps += 1
            if self.steps >= 5:
                replies = super().ask(action, query, [s for s in sites if s != "site-3"])
                replies["site-3"] = Reply("site-3", self.status, reason=self.reason)
                return replies
        return super().ask(action, query, sites)


def test_a_site_dropping_mid_fit_restarts_the_fit_on_the_survivors(tmp_path: Path,
                                                                   study: dict) -> None:
    parts = study["parts"]
    extra = {"cv-folds": FOLDS, "seed": SEED, "lasso-C": LASSO_C, "lr-C": LR_C,
             "selection": "paper"}
    folders = [write_feature_site(tmp_path / "a", f"site-{i + 1}", p) for i, p in enumerate(parts)]
    config = StudyConfig(out_dir=str(tmp_path / "out-a"), task="label", stages=("radiomics",),
                         settings=stage_settings(extra))
    dropped = run_study(DropsMidFit(folders), config)["radiomics"]
    assert [r["dropped"] for r in dropped["restarts"]] == [{"site-3": "node unavailable"}]
    assert dropped["sites"]["site-3"]["status"] == "dropped"
    survivors = [write_feature_site(tmp_path / "b", f"site-{i + 1}", p)
                 for i, p in enumerate(parts[:2])]
    config = StudyConfig(out_dir=str(tmp_path / "out-b"), task="label", stages=("radiomics",),
                         settings=stage_settings(extra))
    fresh = run_study(InProcessTransport(survivors), config)["radiomics"]
    assert dropped["lasso"]["coef"] == pytest.approx(fresh["lasso"]["coef"], abs=1e-12)
    assert dropped["standardization"]["mean"] == pytest.approx(
        fresh["standardization"]["mean"], rel=1e-12)


class FailsMidFit(DropsMidFit):
    """site-3 answers its 5th solver round with an error instead."""

    status, reason = "failed", "radiomics_step failed at site-3: MemoryError"


def test_a_site_failing_mid_fit_is_left_out_and_the_fit_restarts(tmp_path: Path,
                                                                 study: dict) -> None:
    parts = study["parts"]
    folders = [write_feature_site(tmp_path, f"site-{i + 1}", p) for i, p in enumerate(parts)]
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label", stages=("radiomics",),
                         settings=stage_settings({**BASE, "selection": "paper"}))
    results = run_study(FailsMidFit(folders), config)
    radiomics = results["radiomics"]
    assert results["run"]["stages"]["radiomics"]["status"] == "ok"
    assert [r["dropped"] for r in radiomics["restarts"]] == [
        {"site-3": "failed: radiomics_step failed at site-3: MemoryError"}]
    assert radiomics["auc"]["train_oof"]["n"][0] > 0
