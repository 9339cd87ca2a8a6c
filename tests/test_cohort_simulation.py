"""The synthetic cohort generator: layout, determinism, geometry, HER2 mix, survival truth."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from lifelines import CoxPHFitter
from PIL import Image

from simulation.cohort import (
    CLINICAL_COLUMNS,
    COX_COEFFICIENTS,
    SITE_PRIVACY,
    cox_covariates,
    her2_labels,
    simulate_cohort,
)

IMAGE_FILES = ("mri.nii.gz", "mri_mask.nii.gz", "mri_mask_r2.nii.gz", "us.png", "us_mask.png")


def read_clinical(site_dir: Path) -> pd.DataFrame:
    return pd.read_csv(site_dir / "clinical.csv", dtype={"her2_ish": str}, keep_default_na=False)


def read_pooled(out: Path, truth: dict) -> pd.DataFrame:
    frames = [read_clinical(out / s).assign(site_id=s) for s in truth["sites"]]
    return pd.concat(frames, ignore_index=True)


def array(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        return np.asarray(Image.open(path))
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    """The default cohort (3 sites x ~40 patients, seed 0), generated once."""
    out = tmp_path_factory.mktemp("cohort") / "sites"
    messages: list[str] = []
    truth = simulate_cohort(out, progress=messages.append)
    return out, truth, messages


# --- layout ------------------------------------------------------------------------------
def test_layout_follows_design(cohort: tuple[Path, dict, list[str]]) -> None:
    out, truth, messages = cohort
    sites = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert sites == ["site-1", "site-2", "site-3"] == sorted(truth["sites"])
    assert (out / "truth.json").is_file()
    sizes = [truth["sites"][s]["n_patients"] for s in sites]
    assert len(set(sizes)) == 3 and min(sizes) >= 20 and sum(sizes) == 120
    all_ids: list[str] = []
    for site in sites:
        d = out / site
        cfg = yaml.safe_load((d / "site.yaml").read_text())
        assert cfg["site_id"] == site and re.fullmatch(r"[a-z0-9-]+", site)
        assert cfg["roles"] == ["train", "survival"]
        assert cfg["time_unit"] == "days"
        assert cfg["privacy"] == SITE_PRIVACY
        assert {"spacing_mm", "intensity_scale", "noise_sd"} <= set(cfg["scanner"])
        clinical = read_clinical(d)
        assert tuple(clinical.columns) == CLINICAL_COLUMNS
        assert len(clinical) == truth["sites"][site]["n_patients"]
        assert sorted(p.name for p in (d / "images").iterdir()) == sorted(clinical.patient_id)
        for pid in clinical.patient_id:
            assert re.fullmatch(r"s\d+-p\d{4}", pid)
            assert all((d / "images" / pid / f).is_file() for f in IMAGE_FILES)
        all_ids += clinical.patient_id.tolist()
    assert len(all_ids) == len(set(all_ids)) == len(truth["patients"])
    assert any("site-3" in m for m in messages)


def test_truth_json_matches_return_value(cohort: tuple[Path, dict, list[str]]) -> None:
    out, truth, _ = cohort
    on_disk = json.loads((out / "truth.json").read_text())
    assert on_disk == json.loads(json.dumps(truth))
    for key in ("seed", "effect_size", "survival", "image_model", "sites", "patients"):
        assert key in on_disk
    assert on_disk["survival"]["coefficients"] == COX_COEFFICIENTS
    assert set(on_disk["survival"]["covariate_coding"]) == set(COX_COEFFICIENTS)
    assert {"shape", "scale_days"} <= set(on_disk["survival"]["baseline"])
    site = on_disk["sites"]["site-1"]
    assert {"scanner", "prevalence", "n_patients", "roles"} <= set(site)


# --- clinical content ---------------------------------------------------------------------
def test_clinical_values_and_her2_categories(cohort: tuple[Path, dict, list[str]]) -> None:
    out, truth, _ = cohort
    pooled = read_pooled(out, truth)
    assert set(pooled.her2_ihc) == {0, 1, 2, 3}
    assert set(pooled.her2_ish) == {"positive", "negative", ""}
    assert (pooled.her2_ish[pooled.her2_ihc != 2] == "").all()  # ISH only for IHC2+
    missing = ((pooled.her2_ihc == 2) & (pooled.her2_ish == "")).sum()
    assert 1 <= missing <= 0.05 * len(pooled)
    for site in truth["sites"]:
        per_site = pooled[pooled.site_id == site]
        assert set(per_site.her2_ihc) == {0, 1, 2, 3}
        assert {"positive", "negative"} <= set(per_site.her2_ish)
    labels = her2_labels(pooled.replace({"her2_ish": {"": None}}))
    assert labels.isna().sum() == missing
    assert 0.2 <= (labels == "positive").mean() <= 0.5
    negatives = labels.isin(["low", "zero"])
    assert 0.4 <= (labels[negatives] == "low").mean() <= 0.8
    assert (pooled.dfs_time > 0).all() and pooled.dfs_time.dtype.kind == "i"
    assert set(pooled.dfs_event) == {0, 1}
    assert 0.2 <= pooled.dfs_event.mean() <= 0.6
    assert set(pooled.hr_status) == {"positive", "negative"}
    assert set(pooled.lesion_type) == {"mass", "non-mass"}
    assert pooled.ki67.between(0, 100).all() and pooled.age.between(18, 100).all()
    assert (pooled.tumour_size_mm > 0).all()
    # latent class in truth.json agrees with the observed labels wherever they exist
    latent = pooled.patient_id.map(lambda p: truth["patients"][p]["her2_class"])
    assert (latent[labels.notna()] == labels[labels.notna()]).all()


def test_covariates_correlate_with_her2(tmp_path: Path) -> None:
    truth = simulate_cohort(tmp_path / "big", 3, 400, seed=11, images=False)
    pooled = read_pooled(tmp_path / "big", truth)
    cls = pooled.patient_id.map(lambda p: truth["patients"][p]["her2_class"])
    pos, neg = pooled[cls == "positive"], pooled[cls != "positive"]
    assert (pos.hr_status == "negative").mean() > (neg.hr_status == "negative").mean() + 0.15
    assert pos.ki67.mean() > neg.ki67.mean() + 5
    assert (pos.lesion_type == "non-mass").mean() > (neg.lesion_type == "non-mass").mean()
    assert 0.2 <= (pooled.lesion_type == "non-mass").mean() <= 0.35
    assert 0.25 <= (cls == "positive").mean() <= 0.42


# --- determinism and overwrite rules ------------------------------------------------------
def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = simulate_cohort(tmp_path / "a", 2, 20, seed=5)
    b = simulate_cohort(tmp_path / "b", 2, 20, seed=5)
    c = simulate_cohort(tmp_path / "c", 2, 20, seed=6)
    assert a == b and a != c
    for site in a["sites"]:
        assert (tmp_path / "a" / site / "clinical.csv").read_bytes() == \
            (tmp_path / "b" / site / "clinical.csv").read_bytes()
        assert (tmp_path / "a" / site / "clinical.csv").read_bytes() != \
            (tmp_path / "c" / site / "clinical.csv").read_bytes()
        for pid in read_clinical(tmp_path / "a" / site).patient_id:
            for name in IMAGE_FILES:
                rel = Path(site) / "images" / pid / name
                assert np.array_equal(array(tmp_path / "a" / rel), array(tmp_path / "b" / rel))
    first = Path("site-1") / "images" / "s1-p0001"
    for name in ("mri.nii.gz", "us.png"):
        x, y = array(tmp_path / "a" / first / name), array(tmp_path / "c" / first / name)
        assert x.shape != y.shape or not np.array_equal(x, y)


def test_clinical_rows_do_not_depend_on_images(tmp_path: Path) -> None:
    simulate_cohort(tmp_path / "img", 2, 20, seed=9)
    simulate_cohort(tmp_path / "noimg", 2, 20, seed=9, images=False)
    for site in ("site-1", "site-2"):
        assert (tmp_path / "img" / site / "clinical.csv").read_bytes() == \
            (tmp_path / "noimg" / site / "clinical.csv").read_bytes()
        assert not (tmp_path / "noimg" / site / "images").exists()


def test_overwrite_only_previous_cohort_or_empty(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        simulate_cohort(foreign, 1, 20, images=False)
    assert (foreign / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    simulate_cohort(empty, 3, 20, images=False)
    assert (empty / "site-3" / "clinical.csv").is_file()
    simulate_cohort(empty, 2, 20, images=False)  # previous cohort: replaced, stale site gone
    assert sorted(p.name for p in empty.iterdir()) == ["site-1", "site-2", "truth.json"]


def test_external_sites_and_argument_checks(tmp_path: Path) -> None:
    simulate_cohort(tmp_path / "ext", 3, 20, external_sites=1, images=False)
    roles = [yaml.safe_load((tmp_path / "ext" / f"site-{i}" / "site.yaml").read_text())["roles"]
             for i in (1, 2, 3)]
    assert roles == [["train", "survival"], ["train", "survival"], ["external", "survival"]]
    with pytest.raises(ValueError, match="external_sites"):
        simulate_cohort(tmp_path / "bad", 2, 20, external_sites=2, images=False)
    with pytest.raises(ValueError, match="n_sites"):
        simulate_cohort(tmp_path / "bad", 0, 20)


# --- images -------------------------------------------------------------------------------
def test_images_and_masks_share_geometry(cohort: tuple[Path, dict, list[str]]) -> None:
    out, truth, _ = cohort
    for site in truth["sites"]:
        spacing = tuple(truth["sites"][site]["scanner"]["spacing_mm"])
        for pid in read_clinical(out / site).patient_id:
            folder = out / site / "images" / pid
            image = sitk.ReadImage(str(folder / "mri.nii.gz"))
            assert image.GetDimension() == 3
            assert image.GetPixelID() in (sitk.sitkInt16, sitk.sitkFloat32)
            assert np.allclose(image.GetSpacing(), spacing, atol=1e-6)
            for name in ("mri_mask.nii.gz", "mri_mask_r2.nii.gz"):
                mask = sitk.ReadImage(str(folder / name))
                assert mask.GetPixelID() == sitk.sitkUInt8
                assert geometry(mask) == geometry(image)
                values = sitk.GetArrayFromImage(mask)
                assert set(np.unique(values)) == {0, 1}
            us, us_mask = Image.open(folder / "us.png"), Image.open(folder / "us_mask.png")
            assert us.mode == "L" and us_mask.mode == "L" and us.size == us_mask.size
            assert set(np.unique(np.asarray(us_mask))) == {0, 255}


def test_reader2_differs_but_agrees(cohort: tuple[Path, dict, list[str]]) -> None:
    out, truth, _ = cohort
    dices = []
    for pid, info in truth["patients"].items():
        folder = out / info["site_id"] / "images" / pid
        m1 = array(folder / "mri_mask.nii.gz").astype(bool)
        m2 = array(folder / "mri_mask_r2.nii.gz").astype(bool)
        assert not np.array_equal(m1, m2), pid
        dices.append(2 * (m1 & m2).sum() / (m1.sum() + m2.sum()))
    assert min(dices) > 0.7
    assert 0.8 < float(np.mean(dices)) < 0.97


def test_sites_differ_in_spacing_and_intensity(cohort: tuple[Path, dict, list[str]]) -> None:
    out, truth, _ = cohort
    spacings, medians = {}, {}
    for site in truth["sites"]:
        pids = read_clinical(out / site).patient_id[:8]
        images = [sitk.ReadImage(str(out / site / "images" / p / "mri.nii.gz")) for p in pids]
        spacings[site] = images[0].GetSpacing()
        medians[site] = float(np.median([np.median(sitk.GetArrayFromImage(i)) for i in images]))
    sites = list(truth["sites"])
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            assert abs(spacings[a][0] - spacings[b][0]) > 0.05
            assert abs(spacings[a][2] - spacings[b][2]) > 0.2
            ratio = max(medians[a], medians[b]) / min(medians[a], medians[b])
            assert ratio > 1.2, (a, b, medians)


def test_large_effect_shows_in_images(tmp_path: Path) -> None:
    out = tmp_path / "effect"
    truth = simulate_cohort(out, 1, 60, seed=2, effect_size=3.0)
    rows = []
    for pid, info in truth["patients"].items():
        folder = out / info["site_id"] / "images" / pid
        image = sitk.ReadImage(str(folder / "mri.nii.gz"))
        values = sitk.GetArrayFromImage(image).astype(float)
        mask = array(folder / "mri_mask.nii.gz").astype(bool)
        rows.append({
            "positive": info["her2_class"] == "positive",
            "contrast": values[mask].mean() / np.median(values[~mask]),
            "volume_mm3": mask.sum() * float(np.prod(image.GetSpacing())),
        })
    frame = pd.DataFrame(rows)
    pos, neg = frame[frame.positive], frame[~frame.positive]
    assert len(pos) >= 5 and len(neg) >= 5
    assert pos.contrast.mean() > 1.15 * neg.contrast.mean()
    assert pos.volume_mm3.median() > neg.volume_mm3.median()


def test_effect_size_zero_removes_her2_dependence(tmp_path: Path) -> None:
    truth = simulate_cohort(tmp_path / "null", 3, 300, seed=4, effect_size=0.0, images=False)
    pheno = pd.DataFrame([{**p["phenotype"], "cls": p["her2_class"]}
                          for p in truth["patients"].values()])
    means = pheno.groupby("cls").mean()
    assert (means.abs() < 0.25).all().all()
    strong = simulate_cohort(tmp_path / "strong", 3, 300, seed=4, effect_size=1.0, images=False)
    pheno = pd.DataFrame([{**p["phenotype"], "cls": p["her2_class"]}
                          for p in strong["patients"].values()])
    gap = pheno.groupby("cls").mean().loc["positive"] - pheno.groupby("cls").mean().loc["zero"]
    assert (gap[["heterogeneity", "enhancement"]] > 0.7).all()


# --- survival truth -----------------------------------------------------------------------
def test_cox_fit_recovers_truth(tmp_path: Path) -> None:
    out = tmp_path / "survival"
    truth = simulate_cohort(out, 3, 150, seed=21, images=False)
    pooled = read_pooled(out, truth).replace({"her2_ish": {"": None}})
    design = cox_covariates(pooled)
    design["dfs_time"], design["dfs_event"] = pooled.dfs_time, pooled.dfs_event
    design = design.dropna().reset_index(drop=True)  # IHC2+ without ISH: excluded
    assert 0.3 <= design.dfs_event.mean() <= 0.5
    fit = CoxPHFitter().fit(design, "dfs_time", "dfs_event")
    summary = fit.summary
    beta = pd.Series(truth["survival"]["coefficients"])
    inside = (summary["coef lower 95%"] <= beta) & (beta <= summary["coef upper 95%"])
    z = (summary["coef"] - beta).abs() / summary["se(coef)"]
    assert inside.sum() >= len(beta) - 1, summary
    assert (z < 3).all(), z
