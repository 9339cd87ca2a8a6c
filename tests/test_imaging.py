"""The CNN data path (client/local/imaging.py): the ROI really crops, its physical size is the
tumour's extent plus the margin whatever the site's spacing, the tumour fills a stated
share of the input, and the MONAI augmentations are seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from client.local import imaging
from tests.sites import realistic

BREAST1 = realistic.breast1()[0].parent  # pyradiomics' test case (tests/sites/realistic.py)
DEFAULT = imaging.Preparation(size=32, spacing=1.0, margin_mm=3.0)


def extent_mm(mask_path: Path) -> np.ndarray:
    """The tumour's bounding-box extent in mm per axis (x, y, z), from the raw mask."""
    image = sitk.ReadImage(str(mask_path))
    lo, hi = imaging.bounding_box(sitk.GetArrayFromImage(image))
    return (hi - lo)[::-1] * np.array(image.GetSpacing())


@pytest.fixture(scope="module")
def breast1() -> tuple[Path, Path]:
    image, mask = BREAST1 / "breast1_image.nrrd", BREAST1 / "breast1_label.nrrd"
    if not image.is_file():
        pytest.fail(f"the shared test image is missing: {image}")
    return image, mask


def test_breast1_roi_is_the_tumour_box_plus_the_margin(breast1) -> None:
    image, mask = breast1
    raw = sitk.ReadImage(str(image))
    fov_mm = np.array(raw.GetSize()) * np.array(raw.GetSpacing())
    out = imaging.mri_roi(image, mask, DEFAULT)
    assert out.x.shape == (1, 1, 32, 32, 32) and out.mask.shape == out.x.shape
    side_mm = out.mm_per_voxel * 32
    # the cube's side is the largest tumour extent + 2 × 3 mm (to one voxel of 1 mm) ...
    assert side_mm == pytest.approx(extent_mm(mask).max() + 6.0, abs=1.5)
    # ... much smaller than the field of view: the crop crops
    assert side_mm < 0.5 * fov_mm[:2].min()
    # the tumour fills at least 5 % of the input (a 3 mm margin around a ~8 mm tumour)
    share = imaging.tumour_share(out.mask)
    assert 0.05 <= share <= 0.6, share
    # z-scored over the tissue around the tumour, which the enhancing tumour outshines
    tissue, tumour = out.x[out.mask == 0], out.x[out.mask > 0]
    assert abs(float(tissue.mean())) < 0.2 and 0.5 < float(tissue.std()) < 1.5
    assert float(tumour.mean()) > 1.0
    # the paper's 50 px margin (at the native 0.66 mm) gives a far larger ROI
    paper = imaging.mri_roi(image, mask, imaging.Preparation(32, spacing=0.0, margin_px=50))
    assert imaging.tumour_share(paper.mask) < share / 10


def test_breast1_dsfr_slices_and_ultrasound_shape(breast1) -> None:
    image, mask = breast1
    out = imaging.tumour_slices(image, mask, imaging.Preparation(64, spacing=1.0))
    slices_with_tumour = int(sitk.GetArrayFromImage(sitk.ReadImage(str(mask))).any(
        axis=(1, 2)).sum())
    assert out.x.shape == (slices_with_tumour, 1, 64, 64)  # in-plane resampling keeps slices
    assert all(m.any() for m in out.mask)


def phantom(spacing: tuple[float, float, float], scale: float, folder: Path) -> tuple[Path,
                                                                                         Path]:
    """The same physical scene sampled on a site's grid: an 80 × 80 × 48 mm field of view,
    an ellipsoidal tumour (semi-axes 9, 6, 5 mm) off centre, twice as bright as a smooth
    background; the site's scanner multiplies intensities by `scale`."""
    size = [round(80 / spacing[0]), round(80 / spacing[1]), round(48 / spacing[2])]
    z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in
                            zip(size[::-1], spacing[::-1], strict=True)], indexing="ij")
    inside = ((x - 30) / 9) ** 2 + ((y - 45) / 6) ** 2 + ((z - 20) / 5) ** 2 <= 1
    background = 1 + 0.3 * np.sin(x / 7) * np.cos(y / 11)
    values = scale * np.where(inside, 2.0, background)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "mri.nii.gz", folder / "mri_mask.nii.gz"
    for array, path in ((values.astype(np.float32), paths[0]),
                        (inside.astype(np.uint8), paths[1])):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(path))
    return paths


def test_a_tumour_has_the_same_physical_scale_at_sites_with_different_spacing(
        tmp_path: Path) -> None:
    fine = imaging.mri_roi(*phantom((0.6, 0.6, 1.0), 300.0, tmp_path / "a"), DEFAULT)
    coarse = imaging.mri_roi(*phantom((1.0, 1.0, 3.0), 2500.0, tmp_path / "b"), DEFAULT)
    # 18 mm tumour + 2 × 3 mm margin, at both sites
    for out in (fine, coarse):
        assert out.mm_per_voxel * 32 == pytest.approx(24.0, abs=1.5)
    shares = [imaging.tumour_share(o.mask) for o in (fine, coarse)]
    assert shares[0] == pytest.approx(shares[1], rel=0.15), shares
    a, b = fine.mask[0, 0] > 0, coarse.mask[0, 0] > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.8  # the same tumour in the same place
    # the scanner's intensity scale is gone after the z-score
    corr = np.corrcoef(fine.x.ravel(), coarse.x.ravel())[0, 1]
    assert corr >= 0.9, corr


def test_native_grid_keeps_the_site_dependence(tmp_path: Path) -> None:
    """Without resampling (spacing 0) the same tumour spans other voxel counts through-plane:
    the reason the common spacing exists."""
    native = imaging.Preparation(size=32, spacing=0.0, margin_mm=3.0)
    fine = imaging.mri_roi(*phantom((0.6, 0.6, 1.0), 1.0, tmp_path / "a"), native)
    coarse = imaging.mri_roi(*phantom((1.0, 1.0, 3.0), 1.0, tmp_path / "b"), native)
    a, b = fine.mask[0, 0] > 0, coarse.mask[0, 0] > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) < 0.8


def test_ultrasound_roi_crops_a_png(tmp_path: Path) -> None:
    from PIL import Image

    yy, xx = np.mgrid[0:96, 0:96]
    lesion = ((xx - 30) / 10) ** 2 + ((yy - 60) / 7) ** 2 <= 1
    picture = np.where(lesion, 40, 160).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "us.png")
    Image.fromarray((lesion * 255).astype(np.uint8)).save(tmp_path / "us_mask.png")
    out = imaging.us_roi(tmp_path / "us.png", tmp_path / "us_mask.png",
                         imaging.Preparation(size=64, spacing=0.0, margin_mm=3.0))
    assert out.x.shape == (1, 1, 64, 64)
    assert out.mm_per_voxel * 64 == pytest.approx(21 + 6, abs=1.5)  # 21 px wide + 2 × 3
    # the ellipse's area (π · 10 · 7 px²) over the square's (27 px)²
    assert imaging.tumour_share(out.mask) == pytest.approx(np.pi * 70 / 27**2, rel=0.1)


@pytest.mark.parametrize("dims", [2, 3])
def test_augmentations_are_seeded_per_sample(dims: int) -> None:
    x = torch.randn(4, 1, *([16] * dims))
    transform = imaging.augmenter(dims, 16)
    a = imaging.augment(x, [1, 2, 3, 4], transform)
    b = imaging.augment(x, [1, 2, 3, 4], imaging.augmenter(dims, 16))
    c = imaging.augment(x, [5, 6, 7, 8], transform)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, x)


def test_mixup_cutmix_mix_images_and_labels_alike() -> None:
    x = torch.cat([torch.zeros(4, 1, 8, 8), torch.ones(4, 1, 8, 8)])
    y = torch.tensor([0.0] * 4 + [1.0] * 4)
    for seed in range(6):
        mixed, soft = imaging.mix_batch(x, y, seed)
        again = imaging.mix_batch(x, y, seed)
        assert torch.equal(mixed, again[0]) and torch.equal(soft, again[1])
        # image i is y-weighted: its mean intensity equals its soft label (x = y everywhere)
        torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), soft, atol=1e-5, rtol=0)
        assert ((soft >= 0) & (soft <= 1)).all()


def test_synthetic_sites_with_different_spacing_crop_to_the_tumour(tmp_path: Path) -> None:
    """Three simulated sites scan at different spacings (in-plane 0.6–1.0 mm, slices 1–3
    mm): every patient's ROI side is its tumour's largest extent + 2 × 3 mm in physical
    units; the tumour fills a median ≥ 5 % of the input at every site and ≥ 1 % for every
    patient (a spiculated tumour fills less of its bounding box)."""
    import yaml

    from simulation.cohort import simulate_cohort

    simulate_cohort(tmp_path, n_sites=3, n_patients=20, seed=4)
    spacings, shares = set(), {}
    for site in sorted(tmp_path.glob("site-*")):
        spacing = yaml.safe_load((site / "site.yaml").read_text())["scanner"]["spacing_mm"]
        spacings.add(tuple(spacing))
        for folder in sorted((site / "images").iterdir())[:8]:
            mask = folder / "mri_mask.nii.gz"
            out = imaging.mri_roi(folder / "mri.nii.gz", mask, DEFAULT)
            assert out.mm_per_voxel * 32 == pytest.approx(extent_mm(mask).max() + 6.0,
                                                          abs=1.0 + max(spacing)), folder
            shares.setdefault(site.name, []).append(imaging.tumour_share(out.mask))
    assert len(spacings) == 3
    assert all(np.median(v) >= 0.05 and min(v) >= 0.01 for v in shares.values()), shares
