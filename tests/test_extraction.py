"""Site-side pyradiomics extraction (client/local/extraction.py) on breast1 and synthetic sites."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from radiomics.featureextractor import RadiomicsFeatureExtractor

from client.local.extraction import CACHE_DIR, DEFAULT_PARAMS, cache_key, extract_features
from client.site.folder import Site, load_site
from simulation.cohort import simulate_cohort
from tests.sites import realistic

BREAST1 = realistic.breast1()[0].parent  # pyradiomics' test case (tests/sites/realistic.py)
PAPER_SETTINGS = {
    "normalize": True,
    "normalizeScale": 50,
    "binWidth": 25,
    "label": 1,
    "interpolator": "sitkBSpline",
    "resampledPixelSpacing": [0.8, 0.8, 0.8],
}
MRI_NEEDS = ("clinical", "mri")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic site of 20 patients (48^3-ish MRI, two reader masks), written once."""
    out = tmp_path_factory.mktemp("cohort")
    simulate_cohort(out, n_sites=1, n_patients=20, seed=11)
    return out / "site-1"


def small_site(cohort: Path, dest: Path, n: int) -> Path:
    """A copy of the cohort's first `n` patients (tests may break its files)."""
    dest.mkdir(parents=True)
    shutil.copy(cohort / "site.yaml", dest / "site.yaml")
    clinical = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False).head(n)
    clinical.to_csv(dest / "clinical.csv", index=False)
    for patient in clinical.patient_id:
        shutil.copytree(cohort / "images" / patient, dest / "images" / patient)
    return dest


def load(root: Path, needs: tuple[str, ...] = MRI_NEEDS) -> Site:
    return load_site(root, needs=needs)


class CountingExecute:
    """Counts calls of RadiomicsFeatureExtractor.execute (in-process runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> None:
        self.calls = 0
        original = RadiomicsFeatureExtractor.execute

        def execute(extractor: RadiomicsFeatureExtractor, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if fail:
                raise AssertionError("pyradiomics must not be called")
            return original(extractor, *args, **kwargs)

        monkeypatch.setattr(RadiomicsFeatureExtractor, "execute", execute)


def rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray],
            spacing: tuple[float, float, float] | None = None) -> None:
    """Rewrite an image file with changed voxels (and optionally spacing)."""
    image = sitk.ReadImage(str(path))
    changed = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
    changed.CopyInformation(image)
    if spacing is not None:
        changed.SetSpacing(spacing)
    sitk.WriteImage(changed, str(path), True)


# --------------------------------------------------------------------------- breast1


def breast1_site(root: Path) -> Site:
    folder = root / "images" / "breast1"
    folder.mkdir(parents=True)
    shutil.copy(BREAST1 / "breast1_image.nrrd", folder / "mri.nrrd")
    shutil.copy(BREAST1 / "breast1_label.nrrd", folder / "mri_mask.nrrd")
    config = {"site_id": "breast", "roles": ["train"], "time_unit": "days"}
    (root / "site.yaml").write_text(yaml.safe_dump(config))
    pd.DataFrame([{"patient_id": "breast1", "her2_ihc": "3", "her2_ish": ""}]).to_csv(
        root / "clinical.csv", index=False
    )
    return load(root)


def test_paper_params_file() -> None:
    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    assert params["setting"] == PAPER_SETTINGS
    assert params["imageType"] == {"Original": {}, "Wavelet": {}, "LoG": {"sigma": [1, 3, 5]}}
    classes = {"shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"}
    assert set(params["featureClass"]) == classes


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pykwalify, in pyradiomics
def test_breast1_gives_1130_features_equal_to_pyradiomics(tmp_path: Path) -> None:
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(BREAST1 / "breast1_label.nrrd")))
    assert set(np.unique(mask)) == {0, 1}  # the paper's label 1

    frame, failures = extract_features(breast1_site(tmp_path), workers=1)

    assert failures == {}
    assert list(frame.index) == ["breast1"]
    assert frame.shape == (1, 1130)
    direct = RadiomicsFeatureExtractor(str(DEFAULT_PARAMS)).execute(
        str(BREAST1 / "breast1_image.nrrd"), str(BREAST1 / "breast1_label.nrrd")
    )
    expected = {k: float(v) for k, v in direct.items() if not k.startswith("diagnostics_")}
    assert list(frame.columns) == list(expected)
    for name, value in expected.items():
        assert math.isclose(frame.at["breast1", name], value, rel_tol=1e-9, abs_tol=1e-12), name
    for name in ("original_glcm_Contrast", "wavelet-LLH_firstorder_Mean",
                 "log-sigma-1-0-mm-3D_firstorder_Mean", "original_shape_VoxelVolume"):
        assert name in frame.columns
    assert sum(c.startswith("original_shape_") for c in frame.columns) == 14
    assert frame.attrs["source"] == "pyradiomics"


# --------------------------------------------------------------------------- cache


def test_cache_hit_skips_pyradiomics_and_changes_re_extract(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = load(small_site(cohort, tmp_path / "site", 3))
    first, failures = extract_features(site, workers=1)
    assert failures == {} and first.attrs["n_extracted"] == 3
    assert len(list((site.root / CACHE_DIR).glob("*.json"))) == 3

    with monkeypatch.context() as patched:
        CountingExecute(patched, fail=True)
        again, failures = extract_features(site, workers=1)
    assert failures == {} and again.attrs["n_cached"] == 3
    pd.testing.assert_frame_equal(again, first, check_exact=True)

    changed = tmp_path / "params.yaml"
    changed.write_text(DEFAULT_PARAMS.read_text() + "# a comment changes the key\n")
    spy = CountingExecute(monkeypatch)
    redone, _ = extract_features(site, params=changed, workers=1)
    assert spy.calls == 3 and redone.attrs["n_extracted"] == 3
    pd.testing.assert_frame_equal(redone, first, check_exact=True)

    patient = site.clinical.index[1]
    rewrite(site.image_paths(patient)["mri_mask"], _eroded)
    spy.calls = 0
    after, _ = extract_features(site, workers=1)
    assert spy.calls == 1 and after.attrs["n_cached"] == 2
    assert not after.loc[patient].equals(first.loc[patient])


def test_cache_key_covers_dicom_folder_mask_and_params(tmp_path: Path) -> None:
    series = tmp_path / "mri"
    series.mkdir()
    for i in range(3):
        (series / f"slice{i}.dcm").write_bytes(bytes([i]) * 64)
    mask = tmp_path / "mri_mask.nii.gz"
    mask.write_bytes(b"mask")
    params = tmp_path / "params.yaml"
    params.write_bytes(DEFAULT_PARAMS.read_bytes())
    keys = [cache_key(series, mask, params)]
    assert cache_key(series, mask, params) == keys[0]
    (series / "slice1.dcm").write_bytes(b"\x09" * 64)
    keys.append(cache_key(series, mask, params))
    (series / "slice3.dcm").write_bytes(b"")
    keys.append(cache_key(series, mask, params))
    mask.write_bytes(b"mask2")
    keys.append(cache_key(series, mask, params))
    params.write_bytes(params.read_bytes() + b"\n")
    keys.append(cache_key(series, mask, params))
    assert len(set(keys)) == len(keys)


def _eroded(mask: np.ndarray) -> np.ndarray:
    image = sitk.BinaryErode(sitk.GetImageFromArray(mask.astype(np.uint8)), [1, 1, 0])
    return sitk.GetArrayFromImage(image).astype(mask.dtype)


# --------------------------------------------------------------------------- failures


def test_bad_patients_are_skipped_with_a_reason(cohort: Path, tmp_path: Path) -> None:
    site = load(small_site(cohort, tmp_path / "site", 5))
    ids = list(site.clinical.index)
    corrupt, single, tiny, white = ids[0], ids[1], ids[2], ids[3]
    site.image_paths(corrupt)["mri_mask"].write_bytes(b"not an image at all")
    rewrite(site.image_paths(single)["mri_mask"], _one_voxel)
    for kind in ("mri", "mri_mask"):  # 0.05 mm voxels: the mask vanishes at 0.8 mm
        rewrite(site.image_paths(tiny)[kind], lambda a: a, spacing=(0.05, 0.05, 0.05))
    rewrite(site.image_paths(tiny)["mri_mask"], _small_block)
    reference, _ = extract_features(site, workers=1, cache_dir=tmp_path / "c0")
    rewrite(site.image_paths(white)["mri_mask"], lambda a: a * 255)

    frame, failures = extract_features(site, workers=2, cache_dir=tmp_path / "c1")

    assert set(failures) == {corrupt, single, tiny}
    assert failures[corrupt].startswith(f"images/{corrupt}/mri_mask.nii.gz: cannot read image")
    assert str(tmp_path) not in failures[corrupt]  # paths relative to the site folder
    assert "1 segmented voxel" in failures[single]
    assert failures[tiny] == "mask is empty after resampling to the parameters' voxel spacing"
    assert list(frame.index) == [white, ids[4]]
    assert frame.attrs["n_failed"] == 3
    assert frame.attrs["failed_by_reason"] == {"image or mask unreadable": 1,
                                               "radiomics extraction failed": 1,
                                               "mask empty at the parameters' voxel spacing": 1}
    # a 0/255 mask is read as non-zero = tumour
    pd.testing.assert_frame_equal(frame.loc[[white]], reference.loc[[white]], check_exact=True)


def _one_voxel(mask: np.ndarray) -> np.ndarray:
    out = np.zeros_like(mask)
    out[tuple(int(i[0]) for i in np.nonzero(mask))] = 1
    return out


def _small_block(mask: np.ndarray) -> np.ndarray:
    out = np.zeros_like(mask)
    z, y, x = (s // 2 for s in mask.shape)
    out[z : z + 3, y : y + 3, x : x + 3] = 1
    return out


def test_invalid_params_or_workers_raise(cohort: Path, tmp_path: Path) -> None:
    site = load(small_site(cohort, tmp_path / "site", 1))
    bad = tmp_path / "bad.yaml"
    bad.write_text("setting:\n  binWidth: wide\n")
    with pytest.raises(ValueError, match="radiomics params"):
        extract_features(site, params=bad)
    with pytest.raises(ValueError, match="workers"):
        extract_features(site, workers=0)
    with pytest.raises(ValueError, match="reader"):
        extract_features(site, reader="r3")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parallel, r2


def test_parallel_equals_serial(cohort: Path, tmp_path: Path) -> None:
    site = load(small_site(cohort, tmp_path / "site", 6))
    serial, failures1 = extract_features(site, workers=1, cache_dir=tmp_path / "serial")
    parallel, failures2 = extract_features(site, workers=2, cache_dir=tmp_path / "parallel")
    assert failures1 == failures2 == {}
    assert serial.shape == (6, 1130)
    assert parallel.attrs["n_extracted"] == 6
    pd.testing.assert_frame_equal(parallel, serial, check_exact=True)


def test_reader2_masks_same_params(cohort: Path, tmp_path: Path) -> None:
    site_dir = small_site(cohort, tmp_path / "site", 3)
    ids = list(pd.read_csv(site_dir / "clinical.csv").patient_id)
    (site_dir / "images" / ids[2] / "mri_mask_r2.nii.gz").unlink()
    site = load(site_dir, ("clinical", "mri", "mri_r2"))

    r1, _ = extract_features(site, workers=1)
    r2, failures = extract_features(site, reader="r2", workers=1)

    assert failures == {}
    assert list(r2.index) == ids[:2] and r2.attrs["n_without_mask"] == 1
    assert list(r2.columns) == list(r1.columns)
    assert not r2.loc[ids[0]].equals(r1.loc[ids[0]])  # the readers' masks differ


# --------------------------------------------------------------------------- features.csv


def test_features_csv_is_used_instead_of_extracting(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_dir = small_site(cohort, tmp_path / "site", 3)
    ids = list(pd.read_csv(site_dir / "clinical.csv").patient_id)
    table = pd.DataFrame({"patient_id": ids[:2], "f_a": [1.5, 2.5], "f_b": [-1.0, 0.25]})
    table.to_csv(site_dir / "features.csv", index=False)
    CountingExecute(monkeypatch, fail=True)
    messages: list[str] = []

    frame, failures = extract_features(load(site_dir), workers=1, progress=messages.append)

    assert frame.attrs["source"] == "features.csv"
    assert any("features.csv" in m for m in messages)
    assert list(frame.index) == ids[:2] and list(frame.columns) == ["f_a", "f_b"]
    assert frame.loc[ids[1], "f_b"] == 0.25
    assert set(failures) == {ids[2]} and "features.csv" in failures[ids[2]]

    loaded = load(site_dir, ("clinical", "mri", "features"))  # patient 3 excluded at load
    frame, failures = extract_features(loaded, workers=1)
    assert list(frame.index) == ids[:2] and failures == {}
    empty, failures = extract_features(loaded, reader="r2", workers=1)
    assert empty.empty and empty.attrs["source"] == "features.csv" and failures == {}
