"""Site-side image preparation for the CNN stages (SimpleITK + MONAI), and the training-time
augmentations. Nothing here leaves the site.

The data path, per patient (paper 2: "ROI dilated by 50 pixels, intensity scaling, resize"):

1. **Read** the image and its mask as every stage does (`client.image_pair`: NIfTI, NRRD,
   PNG, a DICOM series folder; the mask put on the image's grid in physical space; non-zero
   or site.yaml's `mask_label` = tumour); a multi-component picture becomes its component
   mean.
2. **Resample to a common physical spacing** (`spacing` mm per voxel, isotropic; 0 keeps the
   native grid, e.g. for PNG ultrasound that carries no spacing), so a tumour has the same
   physical size in voxels at every site. The image is first cut to a box around the mask
   (the ROI plus a few voxels), so a 512² × 120 breast volume is not resampled whole.
3. **ROI** = the mask's bounding box grown by the margin on every side (`margin_mm`; or
   the paper's `margin_px` pixels at the native in-plane spacing), made a cube (a square for
   2D) around the box centre so resizing keeps the aspect, cut with MONAI's `SpatialCrop`
   (clipped to the image) and padded back to a cube where the image border cut it.
4. **Z-score** (MONAI `NormalizeIntensity`; removes the site's scanner scale and offset)
   over the tissue around the tumour in the ROI (`reference = tissue`: the tumour's
   enhancement relative to its surroundings is what the network sees) or over the whole
   ROI (`roi`, ultrasound), then **resize** to `size`ⁿ (MONAI `Resize`; the mask interpolated and
   kept at ≥ 0.5, so a tumour smaller than a voxel does not vanish).

DSFR (paper 1) takes the same in-plane ROI over every axial slice with tumour, z-scored
over the patient's ROI slab, each slice resized to size², with its mask slice as the
segmentation target. Its volume is resampled in-plane only (slices stay slices).

`augmenter` builds paper 2's augmentations as MONAI transforms (flips, RandAffine scaling
and panning, Gaussian noise, Gaussian blur, contrast and brightness) and `mix_batch`
MONAI's MixUp / CutMix; both are seeded by the caller, so a replayed round draws the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import (
    Compose,
    CutMix,
    MixUp,
    NormalizeIntensity,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
    SpatialCrop,
    SpatialPad,
)

from client import image_pair

PAD_VOXELS = 2  # extra native voxels kept around the ROI before resampling


@dataclass(frozen=True)
class Preparation:
    """How one model's inputs are made (part of the per-patient cache key)."""

    size: int  # input side in voxels
    spacing: float = 1.0  # common spacing (mm, isotropic); 0 = the native grid
    margin_mm: float = 5.0  # ROI margin around the mask's bounding box
    margin_px: int = 0  # > 0: the paper's margin in pixels at the native in-plane spacing
    reference: str = "tissue"  # z-score over the tissue around the tumour | the whole ROI

    def margin(self, native_inplane: float) -> float:
        """The margin in mm for an image of this native in-plane spacing."""
        return self.margin_px * native_inplane if self.margin_px > 0 else self.margin_mm


@dataclass(frozen=True)
class Prepared:
    """One patient's model input(s) with the mask(s) in the same grid."""

    x: np.ndarray  # (k, 1, *size) float32; k = 1 except DSFR (one per tumour slice)
    mask: np.ndarray  # (k, 1, *size) uint8
    mm_per_voxel: float  # physical edge of one input voxel (in-plane)


# --------------------------------------------------------------------------- reading


def read_image(path: Path) -> sitk.Image:
    """A scalar float32 SimpleITK image; a DICOM series is a folder; a multi-component
    picture (RGB PNG) becomes its component mean; a 1-slice 3D picture becomes 2D."""
    return _scalar(image_pair.read_image(Path(path)))


def _scalar(image: sitk.Image) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() > 1:
        channels = [sitk.VectorIndexSelectionCast(image, c, sitk.sitkFloat32)
                    for c in range(image.GetNumberOfComponentsPerPixel())]
        image = sum(channels[1:], channels[0]) / float(len(channels))
    return image_pair.flat(sitk.Cast(image, sitk.sitkFloat32))


def _pair(image: Path, mask: Path, dims: int,
          mask_label: int | None = None) -> tuple[sitk.Image, sitk.Image]:
    """The image (float32) and its 0/1 tumour mask on the image's grid, accepted as every
    stage accepts them (client.image_pair: a mask on another grid over the same region is
    resampled in physical space; one elsewhere, uneven DICOM slices or two sources refused
    with ImageRefused)."""
    picture, labels = image_pair.accepted_pair(Path(image), Path(mask), label=mask_label,
                                               dims=(dims,), mask_name=Path(mask).name)
    return _scalar(picture), labels


# --------------------------------------------------------------------------- geometry


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, last + 1) index of the non-zero mask per axis (numpy order)."""
    nonzero = np.argwhere(mask != 0)
    if not len(nonzero):
        raise ValueError("empty mask")
    return nonzero.min(axis=0), nonzero.max(axis=0) + 1


def _native_window(labels: sitk.Image, margin_mm: float,
                   axes: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """ITK index and size of a box around the mask wide enough for the cubic ROI (largest
    physical extent + margin on each side, + PAD_VOXELS), on `axes` (ITK order); the other
    axes keep only the mask's extent."""
    lo, hi = bounding_box(sitk.GetArrayViewFromImage(labels))
    lo, hi = lo[::-1], hi[::-1]  # ITK order (x, y[, z])
    spacing = np.array(labels.GetSpacing())
    centre = (lo + hi) / 2
    extent_mm = (hi - lo) * spacing
    half_mm = max(float(extent_mm[list(axes)].max()) / 2 + margin_mm, 0.0)
    start, stop = lo.astype(float), hi.astype(float)
    for a in axes:
        half = half_mm / spacing[a] + PAD_VOXELS
        start[a], stop[a] = centre[a] - half, centre[a] + half
    size = np.array(labels.GetSize())
    start = np.clip(np.floor(start), 0, size - 1).astype(int)
    stop = np.clip(np.ceil(stop), start + 1, size).astype(int)
    return [int(v) for v in start], [int(v) for v in stop - start]


def resample(image: sitk.Image, spacing: tuple[float | None, ...]) -> sitk.Image:
    """`image` on a grid of `spacing` (ITK order; None keeps that axis) over the same
    physical extent, by linear interpolation."""
    old = np.array(image.GetSpacing())
    new = np.array([o if s is None or s <= 0 else s for o, s in zip(old, spacing, strict=True)])
    if np.allclose(old, new):
        return image
    size = [max(1, round(n * o / s)) for n, o, s in zip(image.GetSize(), old, new,
                                                          strict=True)]
    # keep the box's physical centre: origin moves by half the voxel-size change
    direction = np.array(image.GetDirection()).reshape(len(old), len(old))
    origin = (np.array(image.GetOrigin())
              + direction @ ((new - old) / 2 - (np.array(size) * new
                                                 - np.array(image.GetSize()) * old) / 2))
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, tuple(origin),
                         tuple(float(s) for s in new), image.GetDirection(), 0.0,
                         image.GetPixelID())


def _common_grid(picture: sitk.Image, labels: sitk.Image, prep: Preparation,
                 axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Image and mask arrays (numpy order) cut around the ROI and resampled to the common
    spacing on `axes`; with the margin in mm and the grid's in-plane spacing."""
    native = float(picture.GetSpacing()[0])
    margin_mm = prep.margin(native)
    index, size = _native_window(labels, margin_mm, axes)
    picture = sitk.RegionOfInterest(picture, size, index)
    labels = sitk.RegionOfInterest(labels, size, index)
    spacing = tuple(prep.spacing if a in axes and prep.spacing > 0 else None
                    for a in range(picture.GetDimension()))
    picture = resample(picture, spacing)
    # the mask by linear interpolation of its 0/1 values, kept where ≥ 0.5; a tumour smaller
    # than a voxel of the new grid keeps every voxel it overlaps
    cover = sitk.GetArrayFromImage(resample(sitk.Cast(labels, sitk.sitkFloat32), spacing))
    mask = _kept(cover)
    if not mask.any():
        raise ValueError(f"the tumour mask vanishes at {prep.spacing} mm spacing")
    return (sitk.GetArrayFromImage(picture), mask.astype(np.uint8), margin_mm,
            float(picture.GetSpacing()[0]))


def roi(image: np.ndarray, mask: np.ndarray, margin_vox: float, axes: tuple[int, ...],
        reference: str = "tissue") -> tuple[np.ndarray, np.ndarray]:
    """The cubic ROI (bounding box + margin, on `axes` in numpy order; other axes: the
    mask's extent) cut with MONAI's SpatialCrop, padded to a cube where clipped: the image
    z-scored (MONAI NormalizeIntensity) over the tissue around the tumour or the whole ROI
    (`reference`), padded with 0 (the reference's mean)."""
    lo, hi = bounding_box(mask)
    side = int(np.ceil(max(hi[a] - lo[a] for a in axes) + 2 * margin_vox))
    start, stop = lo.copy(), hi.copy()
    for a in axes:
        start[a] = int(np.floor((lo[a] + hi[a] - side) / 2))
        stop[a] = start[a] + side
    crop = SpatialCrop(roi_start=np.maximum(start, 0), roi_end=np.minimum(stop, mask.shape))
    x = crop(torch.from_numpy(np.ascontiguousarray(image, np.float32))[None])
    m = crop(torch.from_numpy(np.ascontiguousarray(mask, np.float32))[None])
    x = NormalizeIntensity(**_reference(x, m, reference))(x)
    target = [side if a in axes else m.shape[1 + a] for a in range(mask.ndim)]
    pad = SpatialPad(spatial_size=target, mode="constant")
    return np.asarray(pad(x), np.float32), np.asarray(pad(m), np.float32)


def _reference(x: torch.Tensor, m: torch.Tensor, reference: str) -> dict[str, float]:
    """Z-score reference: `tissue` = the tissue around the tumour inside the ROI (so the
    tumour's enhancement relative to it is what the network sees, as a radiologist reads
    DCE-MRI; the whole ROI when the margin holds fewer than 64 voxels), `roi` = the whole
    ROI (ultrasound: the posterior region below a lesion is itself a finding)."""
    if reference not in ("tissue", "roi"):
        raise ValueError(f"unknown intensity reference {reference!r}; known: tissue, roi")
    around = x[m == 0]
    values = around if reference == "tissue" and around.numel() >= 64 else x.flatten()
    std = float(values.std())
    return {"subtrahend": float(values.mean()), "divisor": std if std > 1e-8 else 1.0}


def _resize(x: np.ndarray, m: np.ndarray, size: tuple[int, ...]) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    mode = "trilinear" if len(size) == 3 else "bilinear"
    image = Resize(spatial_size=size, mode=mode, anti_aliasing=True)(torch.from_numpy(x))
    cover = np.asarray(Resize(spatial_size=size, mode=mode)(torch.from_numpy(m)))
    return (np.asarray(image, np.float32)[None],
            _kept(cover).astype(np.uint8)[None])


def _kept(cover: np.ndarray) -> np.ndarray:
    """A mask from interpolated 0/1 values: ≥ 0.5, or every voxel it overlaps when that
    leaves nothing (a tumour smaller than one voxel of the new grid)."""
    inside = cover >= 0.5
    return inside if inside.any() else cover > 0


# --------------------------------------------------------------------------- model inputs


def mri_roi(image: Path, mask: Path, prep: Preparation,
            mask_label: int | None = None) -> Prepared:
    """DL-MRI input: the ROI cube at the common spacing, z-scored, resized to size³."""
    picture, labels = _pair(image, mask, 3, mask_label)
    array, target, margin_mm, spacing = _common_grid(picture, labels, prep, (0, 1, 2))
    x, m = roi(array, target, margin_mm / spacing, (0, 1, 2), prep.reference)
    side_mm = x.shape[-1] * spacing
    x, m = _resize(x, m, (prep.size,) * 3)
    return Prepared(x, m, side_mm / prep.size)


def us_roi(image: Path, mask: Path, prep: Preparation,
           mask_label: int | None = None) -> Prepared:
    """DL-US input: the square ROI (common spacing, or native pixels), z-scored, size²."""
    picture, labels = _pair(image, mask, 2, mask_label)
    array, target, margin_mm, spacing = _common_grid(picture, labels, prep, (0, 1))
    x, m = roi(array, target, margin_mm / spacing, (0, 1), prep.reference)
    side_mm = x.shape[-1] * spacing
    x, m = _resize(x, m, (prep.size,) * 2)
    return Prepared(x, m, side_mm / prep.size)


def tumour_slices(image: Path, mask: Path, prep: Preparation,
                  mask_label: int | None = None) -> Prepared:
    """DSFR input: every axial slice with tumour of the in-plane ROI (common in-plane
    spacing), z-scored over the patient's ROI slab, resized to size²: (k, 1, size, size)."""
    picture, labels = _pair(image, mask, 3, mask_label)
    array, target, margin_mm, spacing = _common_grid(picture, labels, prep, (0, 1))
    x, m = roi(array, target, margin_mm / spacing, (1, 2), prep.reference)  # (z, y, x)
    side_mm = x.shape[-1] * spacing
    keep = np.flatnonzero(m[0].any(axis=(1, 2)))
    slices = [_resize(x[:, z], m[:, z], (prep.size,) * 2) for z in keep]
    return Prepared(np.concatenate([s[0] for s in slices]),
                    np.concatenate([s[1] for s in slices]), side_mm / prep.size)


def tumour_share(mask: np.ndarray) -> float:
    """Fraction of the input's voxels that are tumour."""
    return float(np.mean(mask != 0))


# --------------------------------------------------------------------------- augmentation


def augmenter(spatial_dims: int, size: int) -> Compose:
    """Paper 2's augmentations for one channel-first sample, as MONAI transforms: random
    flips in-plane (MRI: both in-plane axes; ultrasound: lateral only — depth has a
    direction), scaling 0.9–1.1 and panning ±10 % (RandAffine), Gaussian noise (σ 0.1,
    p 0.5), Gaussian blur (p 0.2), contrast ×(0.9–1.1) and brightness ±0.1. Seed it with
    `set_random_state` before each sample."""
    flip_axes = (1, 2) if spatial_dims == 3 else (1,)
    return Compose([
        *[RandFlip(prob=0.5, spatial_axis=a) for a in flip_axes],
        RandAffine(prob=1.0, scale_range=[0.1] * spatial_dims,
                   translate_range=[0.1 * size] * spatial_dims, padding_mode="border",
                   mode="bilinear"),
        RandGaussianNoise(prob=0.5, std=0.1),
        RandGaussianSmooth(prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                           sigma_z=(0.5, 1.0)),
        RandScaleIntensity(factors=0.1, prob=1.0),
        RandShiftIntensity(offsets=0.1, prob=1.0),
    ])


def augment(x: torch.Tensor, seeds: list[int], transform: Compose) -> torch.Tensor:
    """The batch `x` (N, 1, ...) augmented sample by sample, sample i seeded by seeds[i]."""
    out = []
    for sample, seed in zip(x, seeds, strict=True):
        transform.set_random_state(seed=seed)
        out.append(torch.as_tensor(transform(sample)).float())
    return torch.stack(out)


def mix_batch(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor,
                                                                    torch.Tensor]:
    """MONAI's MixUp (α 0.8) or CutMix (α 1.0), one of the two per batch (mmpretrain's
    ConvNeXt V2 recipe): images and soft labels mixed with a shuffled copy of the batch.

    The soft label is the share of each image that came from each label: the same mix
    applied to an image filled with the labels, averaged (for CutMix this counts the box
    as it was cut, clipped at the border, where MONAI's own label weight would not)."""
    n = x.shape[0]
    if n < 2:
        return x, y.float()
    rng = np.random.RandomState(seed % 2**32)
    mixer = MixUp(n, alpha=0.8) if rng.rand() < 0.5 else CutMix(n, alpha=1.0)
    mixer.set_random_state(seed=int(rng.randint(2**31)))
    mixed = torch.as_tensor(mixer(x)).float()
    labels = y.float().view(n, *([1] * (x.dim() - 1))).expand_as(x).contiguous()
    soft = torch.as_tensor(mixer.apply(labels)).float().flatten(1).mean(dim=1)
    return mixed, soft
