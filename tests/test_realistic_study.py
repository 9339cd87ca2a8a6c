"""A study on the realistic site beside a simulated one (issue 26, "Done when"): cohort,
radiomics, validation and survival in the Flower Simulation Engine.

The realistic site (tests/sites/realistic.py) holds pyradiomics' breast1 written the ways
hospital systems write it — a DICOM series with rescale slope/intercept and reversed
instance numbers, an enhanced multi-frame file, masks exported on a 1 mm grid, on a
subdividing grid, prone (RAS), sagittal (PIR), half a voxel off, labelled {1, 2} — and
three patients no stage may use (a mask 20 mm off, a series with a missing slice, a NRRD
beside a DICOM folder); its clinical.csv is an Excel export (BOM, `;`, CRLF, decimal
commas, `#N/A`, `IHC 3+`, `Positive` beside `positive`) with the format declared.

Before (issue 26): radiomics extracted the misregistered mask and the gappy series, used
label 1 of {1, 2} only, and the stale NRRD won. Now the study must equal, to 1e-9, the same
study on a *plain* copy of the site: every accepted patient as breast1's NRRD with its mask
on the image grid (the 1 mm export put back by SimpleITK's nearest-neighbour resampling,
done here independently), the clinical table written plainly, the refused patients'
images absent. The refused three are counted by reason in the radiomics stage and named by
check-site.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from client.local.extraction import extract_features
from client.site import image_pair
from client.site.check import main as check_main
from client.site.folder import load_site
from server.core.results import plain
from server.workflow import run_study
from shared.config import StudyConfig
from simulation.cohort import simulate_cohort
from simulation.in_process import InProcessTransport
from simulation.launcher import run_simulation
from tests.sites import realistic

pytestmark = pytest.mark.slow

PREFIX = "RS-"
QUIRKS = [q for q in realistic.QUIRKS if q != "ultrasound"]  # the study reads MRI only
REFUSED = {f"{PREFIX}misregistered": image_pair.MISREGISTERED,
           f"{PREFIX}missing-slice": image_pair.SLICE_SPACING,
           f"{PREFIX}two-sources": image_pair.TWO_SOURCES}
OVERRIDES = {"stages": "cohort,radiomics,validation,survival", "cv-folds": "2",
             "task": "her2-low", "survival-group": "label,predicted:radiomics",
             "radiomics-workers": "1", "stepwise": "none", "seed": "3"}


def clinical(patients: list[str]) -> pd.DataFrame:
    """The realistic site's true clinical values: HER2-zero and HER2-low patients, times,
    events and the simulated sites' covariates (age and ki67 with a fraction: decimal
    commas in the export)."""
    rng = np.random.default_rng(26)
    n = len(patients)
    return pd.DataFrame({
        "patient_id": patients,
        "her2_ihc": ["0", "1", "2"] * (n // 3) + ["0"] * (n % 3),
        "her2_ish": ["negative" if i % 3 == 2 else "" for i in range(n)],
        "dfs_time": rng.integers(60, 2500, n), "dfs_event": rng.integers(0, 2, n),
        "age": rng.integers(30, 80, n) + 0.5,
        "tumour_size_mm": rng.integers(8, 50, n), "ki67": rng.integers(2, 70, n) + 0.5,
        "hr_status": rng.choice(["positive", "negative"], n),
        "lesion_type": rng.choice(["mass", "non-mass"], n)})


def plain_copy(site: Path, plain: Path, frame: pd.DataFrame) -> None:
    """The realistic site written plainly: breast1's NRRD and a mask on its grid for each
    accepted patient, no images for the refused, clinical.csv as pandas writes it."""
    image, mask = realistic.breast1_images()
    plain.mkdir(parents=True)
    config = yaml.safe_load((site / "site.yaml").read_text(encoding="utf-8"))
    config.pop("clinical_csv")
    (plain / "site.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    frame.to_csv(plain / "clinical.csv", index=False)
    for patient in frame["patient_id"]:
        if patient in REFUSED:
            continue
        on_image_grid = mask
        if patient == f"{PREFIX}resampled":  # the 1 mm export, back by nearest neighbour
            exported = realistic.on_grid(mask, (1.0, 1.0, 1.0))
            on_image_grid = sitk.Resample(exported, image, sitk.Transform(),
                                          sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        realistic.write(image, plain / "images" / patient / "mri.nrrd")
        realistic.write(on_image_grid, plain / "images" / patient / "mri_mask.nrrd")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("realistic-study")
    sites = root / "sites"
    simulate_cohort(sites, n_sites=1, n_patients=60, seed=7, effect_size=2.0)
    site = realistic.realistic_site(sites / "realistic", QUIRKS, prefix=PREFIX)
    frame = clinical([PREFIX + q for q in QUIRKS])
    realistic.excel_export(site, frame, capitalize=["hr_status", "lesion_type"])
    config = yaml.safe_load((site / "site.yaml").read_text(encoding="utf-8"))
    config.update(roles=["train", "survival"],
                  privacy={"min_patients": 3, "min_cell_count": 1})  # 9 patients, 2 folds
    (site / "site.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")

    plain = root / "plain"
    shutil.copytree(sites / "site-1", plain / "site-1")
    plain_copy(site, plain / "realistic", frame)

    rc = run_simulation(sites, root / "out", OVERRIDES, echo=False)
    results = json.loads((root / "out" / "results.json").read_text(encoding="utf-8"))
    reference = run_study(
        InProcessTransport([plain / "site-1", plain / "realistic"]),
        StudyConfig.from_run_config({**OVERRIDES, "out-dir": str(root / "ref")}))
    return {"rc": rc, "results": results, "reference": reference, "site": site,
            "plain": plain / "realistic", "out": root / "out"}


def test_check_site_names_the_three_refused_patients(study: dict,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert check_main([str(study["site"])]) == 1
    out = capsys.readouterr().out
    for patient in REFUSED:
        assert f"realistic: images/{patient}" in out and f"patient {patient}: " in out
    assert "offset by (+0.0, +0.0, +20.0) mm" in out
    assert "non-uniform slice spacing" in out and "mri.nrrd and mri/" in out
    assert "3 problems in 3 patients; 3 patients excluded, 9 usable" in out


def test_the_run_is_ok_and_counts_the_refused_by_reason(study: dict) -> None:
    run = study["results"]["run"]
    assert study["rc"] == 0 and run["status"] == "ok"
    assert {s["site_id"]: s["status"] for s in run["sites"]} == {"realistic": "ok",
                                                                 "site-1": "ok"}
    assert all(stage["status"] == "ok" for stage in run["stages"].values())
    excluded = run["stages"]["radiomics"]["excluded"]
    assert {reason: counts.get("realistic") for reason, counts in excluded.items()} == {
        reason: 1 for reason in REFUSED.values()}
    report = (study["out"] / "report.html").read_text(encoding="utf-8")
    for reason in REFUSED.values():
        assert reason.replace("'", "&#x27;") in report


def test_the_site_extracted_what_the_plain_copy_holds(study: dict) -> None:
    """The features the study used (the site's cache) are those of the plain copy: every
    grid, orientation, DICOM encoding and label set read as the same tumour."""
    used, failures = extract_features(load_site(study["site"]), workers=1)
    plain, _ = extract_features(load_site(study["plain"]), workers=1)
    assert set(failures) == set(REFUSED)
    assert sorted(used.index) == sorted(plain.index) == sorted(
        PREFIX + q for q in QUIRKS if PREFIX + q not in REFUSED)
    np.testing.assert_allclose(used.loc[plain.index], plain, rtol=1e-9, atol=1e-12)


def assert_same(got: object, expected: object, where: str = "") -> None:
    """Equal JSON values (as results.json writes them: `plain`), numbers to 1e-9."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(got, bool):
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12, nan_ok=True), where
    else:
        assert got == expected, where


@pytest.mark.parametrize("block", ["cohort", "radiomics", "validation", "survival"])
def test_the_study_equals_the_plain_copys(study: dict, block: str) -> None:
    got, expected = study["results"][block], study["reference"][block]
    assert_same(got, plain(expected), block)


def test_every_site_counts_in_every_stage(study: dict) -> None:
    results = study["results"]
    # all 12 (the cohort needs no image): 4 HER2-zero (IHC 0), 8 HER2-low (1+, 2+/ISH−)
    assert results["cohort"]["n"]["sites"]["realistic"] == [4, 8]
    assert results["cohort"]["left_out"] == {}
    assert {site: v["status"] for site, v in results["radiomics"]["sites"].items()} == {
        "realistic": "ok", "site-1": "ok"}
    # the 9 accepted patients' out-of-fold scores: 3 HER2-zero, 6 HER2-low
    assert results["validation"]["radiomics"]["sites"]["realistic"]["n"] == [3, 6]
    assert "realistic" in results["survival"]["cox"]["sites_used"]
