"""`feddlr simulate --design paper1`: paper 1's three datasets as site folders (centre-1
training, centre-2 external validation, centre-3 a HER2-negative survival cohort on a
dedicated breast MRI system), the `sites` design unchanged, and a survival-only site in the
study workflow (asked by the cohort and survival stages only)."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from server import workflow
from server.workflow import run_study, sites_for_stage
from shared.config import STAGES, StudyConfig
from simulation.cli import main
from simulation.cohort import DEDICATED_SCANNER, her2_labels, simulate_cohort
from simulation.in_process import InProcessTransport

CENTRES = ("centre-1", "centre-2", "centre-3")
ROLES = {"centre-1": ["train", "survival"], "centre-2": ["external", "survival"],
         "centre-3": ["survival"]}
# The `sites` design's bytes for `n_sites=2, n_patients=20, seed=3, external_sites=1,
# image_size=16, images=False`, as the generator wrote them before `design` existed: an
# intended change of that design must update them (and GENERATOR_VERSION).
SITES_DESIGN_SHA256 = {
    "site-1/clinical.csv": "4976d3104c15c68b043da38cbdf4b65ab159221980138d1e75de103554e5c3b5",
    "site-1/site.yaml": "e9b40df6005f6f9dc49675ee6a1b1a00926f085f4968643f66e9a35e0b6321ae",
    "site-2/clinical.csv": "4833d30f20e84b0caf75342b9943442394094c6a1d3bc9ba3d6de016961e904d",
    "site-2/site.yaml": "fd5b848faa00ab49834db9c28dbf59cd50b516cd71e68bd3fb27d05dc93b4d5d",
    "truth.json": "22f9703bc1c6ee97295f0b99a8cbd35d127e6a0765e8426cfd1e6e1164227bcb",
}


def site_yaml(out: Path, site: str) -> dict:
    return yaml.safe_load((out / site / "site.yaml").read_text())


def clinical(out: Path, site: str) -> pd.DataFrame:
    return pd.read_csv(out / site / "clinical.csv", dtype={"her2_ish": str},
                       keep_default_na=False)


def hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def paper1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The paper1 design with images (20 patients per site requested, 16-voxel FOV)."""
    out = tmp_path_factory.mktemp("paper1") / "sites"
    truth = simulate_cohort(out, n_patients=20, seed=5, image_size=16, design="paper1")
    return out, truth


# --- layout ------------------------------------------------------------------------------
def test_three_centre_folders_with_paper1_roles(paper1: tuple[Path, dict]) -> None:
    out, truth = paper1
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(CENTRES)
    for site in CENTRES:
        assert site_yaml(out, site)["site_id"] == site
        assert site_yaml(out, site)["roles"] == ROLES[site] == truth["sites"][site]["roles"]
        assert truth["design"]["sites"][site]["roles"] == ROLES[site]
    assert truth["design"]["name"] == "paper1"
    assert "Dataset 3" in truth["design"]["sites"]["centre-3"]["plays"]
    sizes = [truth["sites"][s]["n_patients"] for s in CENTRES]
    assert sizes == [25, 20, 20]  # 1.25, 1 and 0.75 x 20, at least 20
    assert [len(clinical(out, s)) for s in CENTRES] == sizes
    assert list(truth)[list(truth).index("design") + 1] == "sites"


def test_centre3_is_her2_negative_with_known_status(paper1: tuple[Path, dict]) -> None:
    out, truth = paper1
    rows = clinical(out, "centre-3")
    classes = her2_labels(rows)
    assert "positive" not in set(classes) and classes.notna().all()
    assert {"zero", "low"} <= set(classes)
    assert set(rows.her2_ihc) == {0, 1, 2} and set(rows.her2_ish[rows.her2_ihc == 2]) == {
        "negative"}
    assert truth["sites"]["centre-3"]["observed"]["her2_class"]["positive"] == 0
    assert truth["sites"]["centre-3"]["observed"]["ish_missing"] == 0
    assert {p["her2_class"] for p in truth["patients"].values()
            if p["site_id"] == "centre-3"} == {"zero", "low"}
    for site in ("centre-1", "centre-2"):
        assert "positive" in set(her2_labels(clinical(out, site)))


def test_centre3_is_imaged_on_a_different_mri_system(paper1: tuple[Path, dict]) -> None:
    out, truth = paper1
    scanners = {s: site_yaml(out, s)["scanner"] for s in CENTRES}
    dedicated = scanners["centre-3"]
    for key in ("inplane_spacing_mm", "slice_thickness_mm", "intensity_scale"):
        lo, hi = DEDICATED_SCANNER[key]
        assert lo <= dedicated[key] <= hi
        assert all(not lo <= scanners[s][key] <= hi for s in ("centre-1", "centre-2"))
    assert dedicated["intensity_scale"] > 1.3 * max(scanners[s]["intensity_scale"]
                                                    for s in ("centre-1", "centre-2"))
    assert dedicated["inplane_spacing_mm"] > dedicated["slice_thickness_mm"]
    assert all(scanners[s]["inplane_spacing_mm"] < scanners[s]["slice_thickness_mm"]
               for s in ("centre-1", "centre-2"))
    assert truth["design"]["dedicated_scanner"]["sites"] == ["centre-3"]
    assert "outside the other sites' strata" in truth["design"]["dedicated_scanner"]["note"]
    assert truth["sites"]["centre-3"]["scanner"]["name"] == "synthetic-dedicated-breast-mri"
    spacings = {}
    for site in CENTRES:
        pid = clinical(out, site).patient_id.iloc[0]
        image = sitk.ReadImage(str(out / site / "images" / pid / "mri.nii.gz"))
        spacings[site] = image.GetSpacing()
        assert np.allclose(spacings[site], scanners[site]["spacing_mm"], atol=1e-3)
    assert spacings["centre-3"][0] > max(spacings[s][0] for s in ("centre-1", "centre-2"))
    assert spacings["centre-3"][2] < min(spacings[s][2] for s in ("centre-1", "centre-2"))


# --- determinism and the sites design ----------------------------------------------------
def test_same_seed_same_files_through_the_cli(paper1: tuple[Path, dict], tmp_path: Path
                                              ) -> None:
    out, _ = paper1
    rc = main(["simulate", "--design", "paper1", "--patients", "20", "--seed", "5",
               "--image-size", "16", "--out", str(tmp_path / "again")])
    assert rc == 0
    assert hashes(tmp_path / "again") == hashes(out)
    simulate_cohort(tmp_path / "other", n_patients=20, seed=6, images=False, design="paper1")
    assert not clinical(tmp_path / "other", "centre-3").equals(clinical(out, "centre-3"))


def test_sites_design_is_unchanged(tmp_path: Path) -> None:
    args = {"n_sites": 2, "n_patients": 20, "seed": 3, "external_sites": 1, "image_size": 16,
            "images": False}
    truth = simulate_cohort(tmp_path / "named", design="sites", **args)
    simulate_cohort(tmp_path / "default", **args)
    assert hashes(tmp_path / "named") == hashes(tmp_path / "default") == SITES_DESIGN_SHA256
    assert "design" not in truth
    assert [site_yaml(tmp_path / "named", s)["roles"] for s in ("site-1", "site-2")] == [
        ["train", "survival"], ["external", "survival"]]


def test_the_cli_defaults_to_the_sites_design(monkeypatch: pytest.MonkeyPatch) -> None:
    passed: dict = {}
    monkeypatch.setattr("simulation.cohort.simulate_cohort",
                        lambda out, **kwargs: passed.update(kwargs) or {})
    assert main(["simulate", "--out", "unused"]) == 0
    default = inspect.signature(simulate_cohort).parameters["design"].default
    assert passed["design"] == default == "sites"
    assert main(["simulate", "--design", "paper1", "--out", "unused"]) == 0
    assert passed["design"] == "paper1"


def test_paper1_refuses_the_sites_designs_arguments(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="design paper1 has its own three sites"):
        simulate_cohort(tmp_path / "a", n_sites=4, design="paper1", images=False)
    with pytest.raises(ValueError, match="design paper1 has its own three sites"):
        simulate_cohort(tmp_path / "b", external_sites=1, design="paper1", images=False)
    with pytest.raises(ValueError, match="design must be one of sites, paper1"):
        simulate_cohort(tmp_path / "c", design="paper2", images=False)
    assert main(["simulate", "--design", "paper1", "--sites", "2", "--out",
                 str(tmp_path / "d")]) == 2
    assert "design paper1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


# --- a survival-only site in the study workflow --------------------------------------------
def test_sites_for_stage_follows_the_roles() -> None:
    rows = [{"site_id": s, "roles": ROLES[s]} for s in CENTRES]
    for stage in ("radiomics", "dsfr", "deep", "fusion", "validation"):
        asked, left_out = sites_for_stage(stage, list(CENTRES), rows)
        assert asked == ["centre-1", "centre-2"]
        assert list(left_out) == ["centre-3"] and "roles [survival]" in left_out["centre-3"]
    assert sites_for_stage("cohort", list(CENTRES), rows) == (list(CENTRES), {})
    assert sites_for_stage("survival", list(CENTRES), rows) == (list(CENTRES), {})
    survival_only = [{"site_id": "centre-3", "roles": ["survival"]}]
    assert sites_for_stage("validation", ["centre-3"], survival_only)[0] == []


@pytest.fixture(scope="module")
def clinical_only(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """paper1 without images (60 per site requested: every site has 10 or more patients and
    3 or more events in each HER2-low group), each site holding an outside model's scores in
    predictions.csv (the HER2-low latent class plus noise)."""
    out = tmp_path_factory.mktemp("paper1-clinical") / "sites"
    truth = simulate_cohort(out, n_patients=60, seed=2, images=False, design="paper1")
    rng = np.random.default_rng(0)
    for site in CENTRES:
        ids = clinical(out, site).patient_id
        low = np.array([truth["patients"][p]["her2_class"] == "low" for p in ids])
        pd.DataFrame({"patient_id": ids, "model": "outside",
                      "score": np.clip(0.3 + 0.4 * low + rng.normal(0, 0.2, len(ids)), 0, 1)}
                     ).to_csv(out / site / "predictions.csv", index=False)
    return [out / s for s in CENTRES]


def test_each_stage_asks_the_sites_its_roles_allow(clinical_only: list[Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    asked: dict[str, list[str]] = {}

    def recorder(stage: str):
        def run(transport: object, config: object, sites: list[str], *rest: object) -> dict:
            asked[stage] = list(sites)
            return {"sites": {s: {"status": "ok"} for s in sites}}
        return run

    for stage in STAGES:
        monkeypatch.setitem(workflow.STAGE_RUNNERS, stage, recorder(stage))
    results = run_study(InProcessTransport(clinical_only), StudyConfig(
        out_dir=str(tmp_path / "out"), task="her2-low"))
    model_sites = ["centre-1", "centre-2"]
    assert asked == {"cohort": list(CENTRES), "radiomics": model_sites, "dsfr": model_sites,
                     "deep": model_sites, "fusion": model_sites, "validation": model_sites,
                     "survival": list(CENTRES)}
    stages = results["run"]["stages"]
    assert all(stages[s]["status"] == "ok" for s in STAGES), stages
    assert "centre-3" in stages["validation"]["sites_left_out"]
    assert "sites_left_out" not in stages["survival"]
    assert [r["status"] for r in results["run"]["sites"]] == ["ok"] * 3


def test_a_survival_only_site_serves_the_survival_stage_alone(clinical_only: list[Path],
                                                              tmp_path: Path) -> None:
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="her2-low",
                         stages=("cohort", "radiomics", "validation", "survival"),
                         survival_group="label,predicted:outside",
                         survival_covariates=("her2_class", "tumour_size_mm"),
                         stepwise="none")
    results = run_study(InProcessTransport(clinical_only), config)
    stages = results["run"]["stages"]
    assert stages["radiomics"]["status"] == "skipped"  # no images at centre-1 or centre-2
    assert "centre-3" in stages["radiomics"]["sites_left_out"]
    assert stages["validation"]["status"] == stages["survival"]["status"] == "ok"
    assert [r["status"] for r in results["run"]["sites"]] == ["ok"] * 3
    assert set(results["cohort"]["n"]["sites"]) == set(CENTRES)
    validation = results["validation"]
    assert set(validation["sites"]) == {"centre-1", "centre-2"}
    assert validation["sets"]["outside"] == {"pooled": ["centre-1", "centre-2"],
                                            "training": ["centre-1"], "external": ["centre-2"]}
    assert validation["outside"]["external"]["auc"] > 0.7
    survival = results["survival"]
    assert set(survival["sites"]) == set(CENTRES)
    assert {"label=0", "label=1", "predicted:outside=0", "predicted:outside=1"} <= set(
        survival["km"])
    for group in ("label", "predicted:outside"):
        assert "centre-3" in survival["logrank_by"][group]["sites_used"], survival["logrank_by"]
    # task her2-low: the survival cohort is every site's HER2-negative patients
    negatives = [her2_labels(clinical(f.parent, f.name)).isin(["zero", "low"]).sum()
                 for f in clinical_only]
    assert survival["km"]["all"]["n"] == sum(negatives)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["run"]["stages"]["validation"]["sites_left_out"].keys() == {"centre-3"}


# --- end to end: `feddlr run` on the paper1 design ------------------------------------------
TINY = {"task": "her2-low", "survival-group": "label,predicted:dlr", "rounds": "2",
        "local-epochs": "dsfr=2,dl_mri=1,dl_us=1", "cnn-width": "0.0625", "mri-size": "16",
        "us-size": "32", "dsfr-size": "32", "deep-cv-folds": "2", "cv-folds": "3",
        "gradcam-patients": "1", "seed": "4"}


@pytest.mark.slow
def test_every_stage_runs_on_the_paper1_design(tmp_path: Path) -> None:
    from simulation.launcher import run_simulation

    simulate_cohort(tmp_path / "sites", n_patients=40, seed=5, effect_size=2.0, image_size=24,
                    design="paper1")
    rc = run_simulation(tmp_path / "sites", tmp_path / "out", TINY, echo=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    stages = results["run"]["stages"]
    assert rc == 0 and results["run"]["status"] == "ok", stages
    assert {r["site_id"]: r["status"] for r in results["run"]["sites"]} == dict.fromkeys(
        CENTRES, "ok")
    for stage in ("radiomics", "dsfr", "deep", "fusion", "validation"):
        assert list(stages[stage]["sites_left_out"]) == ["centre-3"]
        assert "centre-3" not in results[stage]["sites"]
    assert results["radiomics"]["sites"]["centre-2"]["role"] == "external"
    assert results["validation"]["sets"]["dlr"]["external"] == ["centre-2"]
    assert set(results["survival"]["sites"]) == set(CENTRES)
    assert {"label=0", "label=1", "predicted:dlr=0", "predicted:dlr=1"} <= set(
        results["survival"]["km"])
    assert "centre-3" in results["survival"]["km"]["all"]["sites_used"]
