"""DICOM as hospitals write it (issue 26, points 2 and 3), built from pyradiomics' breast1 with
pydicom (tests/sites/realistic.py): stored integers with rescale slope/intercept and
reversed instance numbers (read right), a missing slice, `mri.nrrd` beside a DICOM folder
`mri/`, and one enhanced multi-frame file.

Before: ITK averaged the gaps of a series with a missing slice (2.1 mm became 2.21 mm, every
slice after the gap misplaced) and check-site, radiomics and the CNN stages all used it;
the NIfTI/NRRD file beside a DICOM folder won silently; an enhanced multi-frame file was
"image is 4D; expected 3D". Now the series is refused in every stage naming the gap, two
sources are an error naming both, and the multi-frame file is read as the 3D volume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from client.local import imaging
from client.local.extraction import extract_features
from client.local.training_data import prepare
from client.site import image_pair
from client.site.check import main
from client.site.folder import check_site, load_site
from shared.training_params import TrainParams
from tests.sites import realistic
from tests.test_site_geometry import PARAMS

QUIRKS = ("plain", "dicom", "missing-slice", "two-sources", "enhanced")
GAP = ("cannot use the DICOM series: non-uniform slice spacing: the gap between slices 10 "
       "and 11 (of 20, by position) is 4.2 mm, the others 2.1 mm (1 uneven gap; a missing "
       "slice?)")
TWO = ("two sources for one image: mri.nrrd and mri/; keep one (the other may be a stale "
       "copy)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = realistic.realistic_site(tmp_path_factory.mktemp("dicom") / "realistic", QUIRKS)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS), encoding="utf-8")
    return root


def volume(site: Path, patient: str) -> sitk.Image:
    return image_pair.read_image(site / "images" / patient / "mri")


def test_series_with_rescale_and_reversed_instance_numbers_is_the_volume(site: Path) -> None:
    image, _ = realistic.breast1_images()
    for patient in ("dicom", "enhanced"):  # one file per slice; one multi-frame file
        read = volume(site, patient)
        assert read.GetDimension() == 3 and read.GetSize() == image.GetSize()
        np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-5)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read),
                                      sitk.GetArrayFromImage(image).astype(float))


def test_check_site_names_the_missing_slice_and_the_two_sources(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [str(p) for p in check_site(site)]
    assert lines == [
        f"realistic: images/missing-slice/mri: patient missing-slice: {GAP}",
        f"realistic: images/two-sources: patient two-sources: {TWO}",
    ]
    assert main([str(site)]) == 1
    assert "2 problems in 2 patients; 2 patients excluded, 3 usable" in capsys.readouterr().out


def test_radiomics_refuses_them_and_extracts_the_others_alike(site: Path) -> None:
    frame, failures = extract_features(load_site(site), params=site / "params.yaml", workers=1)
    assert failures == {"missing-slice": f"images/missing-slice/mri: {GAP}",
                        "two-sources": f"images/two-sources: {TWO}"}
    assert frame.attrs["failed_by_reason"] == {image_pair.SLICE_SPACING: 1,
                                               image_pair.TWO_SOURCES: 1}
    for patient in ("dicom", "enhanced"):  # the rescaled integers are the same volume
        np.testing.assert_allclose(frame.loc[patient], frame.loc["plain"], rtol=1e-9)


def test_the_cnn_stages_refuse_them_too(site: Path) -> None:
    prep = imaging.Preparation(size=16)
    folder = site / "images"
    with pytest.raises(image_pair.ImageRefused, match="non-uniform slice spacing") as error:
        imaging.tumour_slices(folder / "missing-slice/mri", folder / "missing-slice/mri_mask.nrrd",
                              prep)
    assert error.value.category == image_pair.SLICE_SPACING
    with pytest.raises(image_pair.ImageRefused, match=r"mri\.nrrd and mri/"):
        imaging.mri_roi(folder / "two-sources/mri.nrrd", folder / "two-sources/mri_mask.nrrd",
                        prep)
    plain = imaging.mri_roi(folder / "plain/mri.nrrd", folder / "plain/mri_mask.nrrd", prep)
    dicom = imaging.mri_roi(folder / "dicom/mri", folder / "dicom/mri_mask.nrrd", prep)
    np.testing.assert_allclose(dicom.x, plain.x, atol=1e-5)
    loaded = load_site(site, needs=("clinical", "mri"))  # the stages' own loading
    assert set(loaded.excluded) == {"missing-slice", "two-sources"}


def test_a_missing_slice_is_refused_with_the_mask_on_itks_averaged_grid(tmp_path: Path) -> None:
    """The issue's case: the mask drawn on the grid ITK made of the series (2.21 mm slices
    instead of 2.1, 20 slices) matched it, and check-site passed."""
    root = realistic.realistic_site(tmp_path / "itk", ("missing-slice",))
    folder = root / "images" / "missing-slice"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder / "mri")))
    itk_grid = reader.Execute()
    assert itk_grid.GetSpacing()[2] == pytest.approx(2.2105, abs=1e-3)
    mask = sitk.Image(itk_grid.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(itk_grid)
    mask[20:25, 60:70, 9:11] = 1
    realistic.write(mask, folder / "mri_mask.nrrd")
    assert [str(p) for p in check_site(root)] == [
        f"realistic: images/missing-slice/mri: patient missing-slice: {GAP}"]


def test_pydicom_ultrasound_frame_is_read_by_check_site_and_the_deep_stage(
        tmp_path: Path) -> None:
    """pydicom's RGB ultrasound frame exported as us.png with a 0/255 mask (the realistic
    site's ultrasound): accepted, averaged to one channel, the lesion inside the ROI."""
    root = realistic.realistic_site(tmp_path / "us", ("ultrasound",))
    assert check_site(root) == []
    loaded = load_site(root, needs=("clinical", "mri", "us"))
    found = loaded.image_paths("ultrasound")
    prep = imaging.Preparation(size=32, spacing=0, reference="roi")
    roi = imaging.us_roi(found["us"], found["us_mask"], prep)
    assert roi.x.shape == (1, 1, 32, 32) and 0.3 < roi.mask.mean() < 0.7


def test_a_stale_copy_added_after_caching_is_refused_not_read_from_the_cache(
        tmp_path: Path) -> None:
    """The caches are keyed by the files' content, not by what lies beside them: a patient
    extracted and prepared once, then given a DICOM folder beside its NRRD (or one whose
    files equal another patient's), hit the cache and skipped the two-sources refusal."""
    root = realistic.realistic_site(tmp_path / "stale", ("plain",))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS), encoding="utf-8")
    frame, _ = extract_features(load_site(root), params=root / "params.yaml", workers=1)
    p = TrainParams(model="dsfr", size=16, spacing=1.0, margin_mm=3.0)
    loaded = load_site(root)
    assert prepare(root / "cache", ["plain"], loaded.image_paths, np.zeros(1, int),
                   p).failed == {}
    assert list(frame.index) == ["plain"]  # both caches now hold the patient
    image, _ = realistic.breast1_images()
    realistic.write_dicom_series(image, root / "images" / "plain" / "mri")
    again, failures = extract_features(load_site(root), params=root / "params.yaml", workers=1)
    assert list(again.index) == [] and failures == {"plain": f"images/plain: {TWO}"}
    assert again.attrs["failed_by_reason"] == {image_pair.TWO_SOURCES: 1}
    data = prepare(root / "cache", ["plain"], loaded.image_paths, np.zeros(1, int), p)
    assert list(data.patients) == [] and data.failed_by_reason == {image_pair.TWO_SOURCES: 1}
