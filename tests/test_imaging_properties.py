"""Properties of the CNN data path (client/local/imaging.py's composed MONAI transforms) on random
scenes: a box tumour anywhere away from the border, random scanner spacing, common spacing,
margin, input size and intensity reference. For each of mri_roi, us_roi and tumour_slices:
the input has the stated shape and types, the cube's side is the tumour's largest extent
plus twice the margin, the tumour box plus the margin lies inside the input, the DSFR
slices are the slices with tumour, and the z-score removes the scanner's scale and offset.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from client.local import imaging

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True)


def scene(seed: int, dims: int, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth background with a brighter box tumour (≥ 4 mm a side in-plane) at least
    12 mm from the border in-plane; numpy order."""
    rng = np.random.default_rng(seed)
    shape = [int(rng.integers(60, 80)) for _ in range(2)]
    if dims == 3:
        shape = [int(rng.integers(10, 16)), *shape]
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing[::-1], strict=True)],
                        indexing="ij")
    image = 100 + 20 * np.sin(grids[-1] / 9) * np.cos(grids[-2] / 13)
    mask = np.zeros(shape, np.uint8)
    box = []
    for a, (n, s) in enumerate(zip(shape, spacing[::-1], strict=True)):
        in_plane = a >= dims - 2
        border = int(np.ceil(12 / s)) if in_plane else 2
        width = int(rng.integers(int(np.ceil(4 / s)), int(np.ceil(12 / s)) + 1)) if in_plane \
            else int(rng.integers(2, 5))
        lo = int(rng.integers(border, n - border - width + 1))
        box.append(slice(lo, lo + width))
    mask[tuple(box)] = 1
    image[mask > 0] += 60
    return image.astype(np.float32), mask


def write(array: np.ndarray, spacing: tuple[float, ...], path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def extent_mm(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """The tumour box's extent in mm per axis, numpy order."""
    lo, hi = imaging.bounding_box(mask)
    return (hi - lo) * np.array(spacing[::-1])


MODELS = {  # function, image dims, the cube's axes (numpy order, of the model's input)
    "mri_roi": (imaging.mri_roi, 3, (0, 1, 2)),
    "us_roi": (imaging.us_roi, 2, (0, 1)),
    "tumour_slices": (imaging.tumour_slices, 3, (0, 1)),
}


@PROPERTY
@given(model=st.sampled_from(sorted(MODELS)), seed=st.integers(0, 2**16),
       inplane=st.sampled_from([0.6, 0.8, 1.0]), thick=st.sampled_from([1.0, 2.0, 3.0]),
       common=st.sampled_from([0.0, 1.0, 1.5]), margin=st.sampled_from([0.0, 3.0, 7.5]),
       size=st.sampled_from([16, 24]), reference=st.sampled_from(["tissue", "roi"]))
def test_the_input_is_the_tumour_box_plus_the_margin_z_scored(
        model: str, seed: int, inplane: float, thick: float, common: float, margin: float,
        size: int, reference: str) -> None:
    make, dims, axes = MODELS[model]
    spacing = (inplane, inplane, thick)[:dims]
    image, mask = scene(seed, dims, spacing)
    prep = imaging.Preparation(size=size, spacing=common, margin_mm=margin, reference=reference)
    with tempfile.TemporaryDirectory() as folder:
        paths = write(mask, spacing, Path(folder) / "mask.nrrd")
        out = make(write(image, spacing, Path(folder) / "image.nrrd"), paths, prep)
        scaled = make(write(7.5 * image - 300, spacing, Path(folder) / "scaled.nrrd"), paths,
                      prep)

    slices = int(mask.any(axis=(1, 2)).sum()) if model == "tumour_slices" else 1
    assert out.x.shape == (slices, 1, *[size] * len(axes)) and out.mask.shape == out.x.shape
    assert out.x.dtype == np.float32 and out.mask.dtype == np.uint8
    assert set(np.unique(out.mask)) <= {0, 1} and all(m.any() for m in out.mask)
    # the z-score removes the scanner's scale and offset
    np.testing.assert_allclose(scaled.x, out.x, atol=2e-3)
    np.testing.assert_array_equal(scaled.mask, out.mask)
    assert out.mm_per_voxel == scaled.mm_per_voxel

    # the cube's side: the largest in-plane extent + 2 × margin, to the grid's voxel; the
    # native grid (common 0) of an anisotropic volume counts z in voxels, so mri_roi's
    # cube there is checked in-plane only
    grid = common if common > 0 else inplane
    inplane_mm = extent_mm(mask, spacing)[-2:]
    side_mm = out.mm_per_voxel * size
    if not (model == "mri_roi" and common == 0):
        largest = extent_mm(mask, spacing).max() if model == "mri_roi" else inplane_mm.max()
        assert largest + 2 * margin - 2 * grid <= side_mm <= largest + 2 * margin + 3 * grid
    assert side_mm >= inplane_mm.max() + 2 * margin - 2 * grid
    # the tumour box plus the margin inside the input, in-plane (one output voxel and one
    # grid voxel of interpolation either side)
    tumour = out.mask.any(axis=tuple(range(out.mask.ndim - 2)))  # (y, x) of every sample
    lo, hi = imaging.bounding_box(tumour)
    slack = 2 * grid + out.mm_per_voxel
    assert (lo * out.mm_per_voxel >= margin - slack).all()
    assert ((size - hi) * out.mm_per_voxel >= margin - slack).all()
    assert ((hi - lo) * out.mm_per_voxel >= inplane_mm - slack).all()


def test_a_step_s_own_error_reaches_the_caller(tmp_path: Path) -> None:
    """MONAI's Compose wraps a step's error in RuntimeError; the caller gets the step's own
    (here the unknown intensity reference, a ValueError the stages report by message)."""
    image, mask = scene(0, 2, (1.0, 1.0))
    paths = write(image, (1.0, 1.0), tmp_path / "i.nrrd"), write(mask, (1.0, 1.0),
                                                                 tmp_path / "m.nrrd")
    with pytest.raises(ValueError, match="unknown intensity reference 'nope'") as error:
        imaging.us_roi(*paths, imaging.Preparation(16, reference="nope"))
    assert type(error.value) is ValueError


def test_an_error_after_the_dsfr_slice_split_reaches_the_caller_too(tmp_path: Path) -> None:
    """After TumourSlices the steps run per slice, and MONAI wraps their errors twice."""

    class Refuse(imaging.Transform):
        def __call__(self, data: dict) -> dict:
            raise ValueError("refused on this slice")

    image, mask = scene(1, 3, (1.0, 1.0, 2.0))
    paths = [write(a, (1.0, 1.0, 2.0), tmp_path / f"{n}.nrrd")
             for a, n in ((image, "i"), (mask, "m"))]
    steps = [*imaging._roi_steps(imaging.Preparation(16), 3, None, (0, 1), (1, 2)),
             imaging.TumourSlices(), Refuse()]
    with pytest.raises(ValueError, match="refused on this slice") as error:
        imaging._prepared(steps, *paths, 16)
    assert type(error.value) is ValueError
