"""Masks in physical space (issue 26, points 1 and 2): one acceptance path for a patient's
image and mask in `feddlr check-site`, radiomics extraction and the CNN stages.

Built from pyradiomics' breast1 (tests/sites/realistic.py). Before: check-site refused
every mask on another grid ("geometry differs") while pyradiomics resampled any mask onto
the image — a mask misregistered by 20 mm was extracted (features of fat), and a mask
labelled {1, 2} gave the features of label 1 only. Now a mask over the same physical box is
put on the image grid by nearest neighbour in every stage, one elsewhere is refused in every
stage with its offset in mm, and every non-zero voxel is tumour unless site.yaml's
`mask_label` picks one.

Measured tolerance (breast1, 143 tumour voxels, paper settings without wavelet/LoG): masks
reoriented (RAS, sagittal PIR), exported on a grid that subdivides the image's, or with the
origin at a voxel corner give exactly the image-grid mask and so identical features. A
1 mm isotropic export is lossy in itself (2.1 mm slices): back on the image grid 39 of 143
voxels differ (124 tumour voxels, not 143); the median feature differs by 2.6 %, the
voxel volume by 18 % (largest: glcm Imc1, 26 %) — asserted
below as median < 5 %.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from client.local import imaging
from client.local.extraction import extract_features
from client.local.training_data import cnn_excluded, prepare
from client.site import image_pair
from client.site.check import main
from client.site.folder import check_site, inspect_site, load_site
from client.site.session import open_session
from client.stages.radiomics import radiomics_extract
from shared.training_params import TrainParams
from tests.sites import realistic

GEOMETRY = ("plain", "resampled", "subdivided", "prone", "sagittal", "half-voxel", "labels12",
            "misregistered")
SAME_VOXELS = ("subdivided", "prone", "sagittal", "half-voxel", "labels12")
PARAMS = {  # the paper's settings on the original image only: a quick extraction
    "imageType": {"Original": {}},
    "featureClass": {"shape": None, "firstorder": None, "glcm": None},
    "setting": {"normalize": True, "normalizeScale": 50, "binWidth": 25, "label": 1,
                "interpolator": "sitkBSpline", "resampledPixelSpacing": [0.8, 0.8, 0.8]},
}
OFFSET = ("mask is not on mri.nrrd's region: its grid's centre is offset by "
          "(+0.0, +0.0, +20.0) mm (LPS; 20.0 mm)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = realistic.realistic_site(tmp_path_factory.mktemp("geometry") / "realistic", GEOMETRY)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def features(site: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    return extract_features(load_site(site), params=site / "params.yaml", workers=1)


def paths(site: Path, patient: str) -> tuple[Path, Path]:
    folder = site / "images" / patient
    return folder / "mri.nrrd", folder / "mri_mask.nrrd"


def test_check_site_accepts_masks_over_the_same_region_and_refuses_the_misregistered_one(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [str(p) for p in check_site(site)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("realistic: images/misregistered/mri_mask.nrrd: patient "
                               f"misregistered: reader-1 {OFFSET}")
    assert main([str(site)]) == 1
    out = capsys.readouterr().out
    assert ("realistic: images/prone/mri_mask.nrrd: patient prone: note: reader-1 mask is on "
            "another grid over mri.nrrd's region (size (45, 120, 21), spacing 0.664 x 0.664 x "
            "2.1 mm, orientation RAS): resampled onto its grid by nearest neighbour") in out
    assert "patient sagittal: note: reader-1 mask is on another grid" in out
    assert "patient half-voxel: note: reader-1 mask has its origin at most half a voxel off" in out
    assert "note" not in [line for line in out.splitlines() if "patient plain" in line]
    assert out.splitlines()[-1] == ("realistic: 1 problem in 1 patient; 1 patient excluded, "
                                    "7 usable")


def test_masks_on_other_grids_are_the_same_voxels_on_the_image_grid(site: Path) -> None:
    _, plain = image_pair.accepted_pair(*paths(site, "plain"))
    reference = sitk.GetArrayFromImage(plain)
    assert reference.sum() == 143
    for patient in SAME_VOXELS:
        image, mask = image_pair.accepted_pair(*paths(site, patient))
        assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), reference, err_msg=patient)
    _, resampled = image_pair.accepted_pair(*paths(site, "resampled"))
    assert int(np.sum(sitk.GetArrayFromImage(resampled) != reference)) == 39  # a lossy export


def test_radiomics_never_extracts_the_misregistered_mask(
        features: tuple[pd.DataFrame, dict[str, str]]) -> None:
    frame, failures = features
    assert "misregistered" not in frame.index
    assert failures == {"misregistered": f"images/misregistered/mri_mask.nrrd: {OFFSET}; a "
                        "mask on another grid must cover the image's box within 1 voxel per "
                        "face"}
    assert frame.attrs["failed_by_reason"] == {image_pair.MISREGISTERED: 1}


def test_radiomics_features_of_masks_on_other_grids(
        features: tuple[pd.DataFrame, dict[str, str]]) -> None:
    frame, _ = features
    plain = frame.loc["plain"]
    for patient in SAME_VOXELS:  # labels {1, 2}: both are tumour (all 143 voxels)
        pd.testing.assert_series_equal(frame.loc[patient], plain, check_names=False,
                                       rtol=1e-12, atol=0)
    relative = ((frame.loc["resampled"] - plain).abs() / plain.abs().clip(lower=1e-12))
    assert relative.median() < 0.05
    assert relative["original_shape_VoxelVolume"] < 0.2  # 124 of 143 voxels: 18 %


def test_mask_label_picks_one_value(site: Path, tmp_path: Path) -> None:
    root = realistic.realistic_site(tmp_path / "labelled", ("labels12",))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS), encoding="utf-8")
    _, mask = paths(root, "labels12")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
    only2 = sitk.GetImageFromArray((array == 2).astype(np.uint8))
    only2.CopyInformation(sitk.ReadImage(str(mask)))
    reference_root = realistic.realistic_site(tmp_path / "reference", ("plain",))
    realistic.write(only2, reference_root / "images/plain/mri_mask.nrrd")
    (reference_root / "params.yaml").write_text(yaml.safe_dump(PARAMS), encoding="utf-8")
    config = yaml.safe_load((root / "site.yaml").read_text())
    (root / "site.yaml").write_text(yaml.safe_dump({**config, "mask_label": 2}))

    frame, failures = extract_features(load_site(root), params=root / "params.yaml", workers=1)
    reference, _ = extract_features(load_site(reference_root),
                                    params=reference_root / "params.yaml", workers=1)

    assert failures == {}
    pd.testing.assert_series_equal(frame.loc["labels12"], reference.loc["plain"],
                                   check_names=False, rtol=1e-12, atol=0)
    (root / "site.yaml").write_text(yaml.safe_dump({**config, "mask_label": 3}))
    assert [str(p) for p in check_site(root)] == [
        "realistic: images/labels12/mri_mask.nrrd: patient labels12: reader-1 mask holds no "
        "voxel of mask_label 3 (site.yaml); its values: 1, 2"]
    (root / "site.yaml").write_text(yaml.safe_dump({**config, "mask_label": "tumour"}))
    assert "mask_label must be a positive integer" in str(check_site(root)[0])


def test_the_cnn_stages_accept_and_refuse_the_same_masks(site: Path, tmp_path: Path) -> None:
    prep = imaging.Preparation(size=16, spacing=1.0, margin_mm=3.0)
    plain = imaging.tumour_slices(*paths(site, "plain"), prep)
    for patient in ("prone", "sagittal", "half-voxel"):
        np.testing.assert_array_equal(imaging.tumour_slices(*paths(site, patient), prep).x,
                                      plain.x, err_msg=patient)
    with pytest.raises(image_pair.ImageRefused, match=r"offset by \(\+0.0, \+0.0, \+20.0\)"):
        imaging.tumour_slices(*paths(site, "misregistered"), prep)
    loaded = load_site(site)
    p = TrainParams(model="dsfr", size=16, spacing=1.0, margin_mm=3.0)
    data = prepare(tmp_path / "cache", list(loaded.clinical.index), loaded.image_paths,
                   np.zeros(len(loaded.clinical), int), p)
    assert set(data.failed) == {"misregistered"}
    assert data.failed_by_reason == {image_pair.MISREGISTERED: 1}


def test_a_stage_reply_counts_the_patients_left_out_by_reason(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The radiomics reply's `excluded` statistic, and the extraction's progress: per
    patient in the site's log, per patient without its id on the console (before: nothing
    on the console for the whole extraction)."""
    shutil.rmtree(site / "cache", ignore_errors=True)  # extracted, not read from the cache
    session = open_session(str(site), "her2-positive", ("clinical", "label"))
    stats = {s.name: s for s in radiomics_extract(session, {"radiomics-params": "params.yaml",
                                                            "workers": 1})}
    assert stats["excluded"].values["reasons"] == [image_pair.MISREGISTERED]
    assert list(stats["excluded"].values["counts"]) == [1]  # min_cell_count 1 at this site
    log = (site / "audit" / "site.log").read_text(encoding="utf-8")
    assert "excluded patient misregistered: radiomics extraction: images/misregistered" in log
    assert "(misregistered) failed: images/misregistered/mri_mask.nrrd: mask is not on" in log
    console = [line for line in capsys.readouterr().out.splitlines() if "[radiomics]" in line]
    assert len([line for line in console if " r1 " in line and "/8 " in line]) == 8
    assert any(line.endswith("[radiomics] realistic: radiomics r1 1/8 extracted")
               or "from cache" in line for line in console), console
    assert not any(f"{patient}/" in line or f"({patient})" in line
               for line in console for patient in GEOMETRY), console
    failed = re.compile(r"realistic: radiomics r1 \d/8 failed: mri_mask\.nrrd: mask is not on "
                        r"mri\.nrrd's region: its grid's centre is offset by \(\+0\.0, \+0\.0, "
                        r"\+20\.0\) mm")
    assert sum(bool(failed.search(line)) for line in console) == 1, console
    # the CNN stages' replies: patients refused at loading (their site needs the MRI)
    loaded = open_session(str(site), "her2-positive", ("clinical", "label", "mri"))
    assert loaded.site.excluded.keys() == {"misregistered"}
    none = prepare(site / "cache", [], loaded.site.image_paths, np.zeros(0, int),
                   TrainParams(model="dsfr", size=16))
    (excluded,) = cnn_excluded(loaded, none)
    assert excluded.values["reasons"] == [image_pair.MISREGISTERED]
    assert list(excluded.values["counts"]) == [1]


def test_a_mask_cropped_to_the_tumour_is_placed_back(tmp_path: Path) -> None:
    """A mask saved as a crop of the image's grid (as segmentation tools save a segment's
    extent): the same voxels on the full grid; one moved off the image's voxels refused."""
    root = realistic.realistic_site(tmp_path / "crop", ("plain",))
    image, mask = paths(root, "plain")
    full = sitk.ReadImage(str(mask))
    cropped = sitk.RegionOfInterest(full, [20, 20, 6], [15, 58, 6])
    realistic.write(cropped, mask)
    _, placed = image_pair.accepted_pair(image, mask)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(placed), sitk.GetArrayFromImage(full))
    report = inspect_site(root)
    assert report.ok and [str(n) for n in report.notes] == [
        "realistic: images/plain/mri_mask.nrrd: patient plain: reader-1 mask is a crop of "
        "mri.nrrd's grid: placed back on it"]
    realistic.write(realistic.shifted(cropped, (0.3, 0.0, 0.0)), mask)
    with pytest.raises(image_pair.ImageRefused, match=r"is not on mri\.nrrd's region"):
        image_pair.accepted_pair(image, mask)
