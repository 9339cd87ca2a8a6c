"""Site-side image preparation for the CNN stages (SimpleITK + MONAI), and the training-time
augmentations. Nothing here leaves the site.

The data path, per patient (paper 2: "ROI dilated by 50 pixels, intensity scaling, resize"),
is one MONAI `Compose` of small transforms on a dict {"image", "mask"}; the three model
inputs share steps 1–4 and differ only in their axes and the last step:

1. **Read** (`ReadPair`) the image and its mask as every stage does (`client.site.image_pair`:
   NIfTI, NRRD, PNG, a DICOM series folder; the mask put on the image's grid in physical
   space; non-zero or site.yaml's `mask_label` = tumour); a multi-component picture becomes
   its component mean.
2. **Resample to a common physical spacing** (`CommonSpacing`; `spacing` mm per voxel,
   isotropic; 0 keeps the native grid, e.g. for PNG ultrasound that carries no spacing), so
   a tumour has the same physical size in voxels at every site. The image is first cut to a
   box around the mask (`NativeWindow`: the ROI plus a few voxels), so a 512² × 120 breast
   volume is not resampled whole.
3. **ROI** (`CubicRoi`) = the mask's bounding box grown by the margin on every side
   (`margin_mm`; or the paper's `margin_px` pixels at the native in-plane spacing), made a
   cube (a square for 2D) around the box centre so resizing keeps the aspect, cut with
   MONAI's `SpatialCrop` (clipped to the image) and padded back to a cube where the image
   border cut it (`PadToCube`, MONAI's `SpatialPad`).
4. **Z-score** (`ZScore`: MONAI `NormalizeIntensity`; removes the site's scanner scale and
   offset) over the tissue around the tumour in the ROI (`reference = tissue`: the tumour's
   enhancement relative to its surroundings is what the network sees) or over the whole
   ROI (`roi`, ultrasound), then **resize** to `size`ⁿ (MONAI `Resized`; the mask
   interpolated and kept at ≥ 0.5 by `KeepMask`, so a tumour smaller than a voxel does not
   vanish).

DSFR (paper 1) takes the same in-plane ROI over every axial slice with tumour
(`TumourSlices`), z-scored over the patient's ROI slab, each slice resized to size², with
its mask slice as the segmentation target. Its volume is resampled in-plane only (slices
stay slices).

`augmenter` builds paper 2's augmentations as MONAI transforms (flips, RandAffine scaling
and panning, Gaussian noise, Gaussian blur, contrast and brightness) and `mix_batch`
MONAI's MixUp / CutMix; both are seeded by the caller, so a replayed round draws the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import (
    Compose,
    CutMix,
    MapTransform,
    MixUp,
    NormalizeIntensity,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandShiftIntensity,
    Resized,
    SpatialCrop,
    SpatialPad,
    Transform,
)

from client.site import image_pair

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


def _kept(cover: np.ndarray) -> np.ndarray:
    """A mask from interpolated 0/1 values: ≥ 0.5, or every voxel it overlaps when that
    leaves nothing (a tumour smaller than one voxel of the new grid)."""
    inside = cover >= 0.5
    return inside if inside.any() else cover > 0


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


# --------------------------------------------------------------------------- the steps
# Every step is a MONAI transform on one patient's dict: "image" and "mask" (SimpleITK images
# up to CommonSpacing, channel-first arrays from then on) and what a step measured for a
# later one ("margin_mm", "grid_mm": the grid's in-plane spacing, "cube", "side_mm").

KEYS = ("image", "mask")


class ReadPair(Transform):
    """File paths -> the image (float32, one component) and its 0/1 tumour mask on the
    image's grid, accepted as every stage accepts them (client.site.image_pair: a mask on another
    grid over the same region is resampled in physical space; one elsewhere, uneven DICOM
    slices or two sources refused with ImageRefused)."""

    def __init__(self, dims: int, mask_label: int | None) -> None:
        self.dims, self.mask_label = dims, mask_label

    def __call__(self, data: dict) -> dict:
        picture, labels = image_pair.accepted_pair(
            Path(data["image"]), Path(data["mask"]), label=self.mask_label, dims=(self.dims,),
            mask_name=Path(data["mask"]).name)
        return {**data, "image": _scalar(picture), "mask": labels}


class NativeWindow(Transform):
    """Both images cut, on their native grid, to a box around the mask wide enough for the
    cubic ROI on `axes` (ITK order), so a 512² × 120 volume is not resampled whole; the
    margin in mm (`margin`: the native in-plane spacing -> mm) goes on to the ROI."""

    def __init__(self, margin: Callable[[float], float], axes: tuple[int, ...]) -> None:
        self.margin, self.axes = margin, axes

    def __call__(self, data: dict) -> dict:
        margin_mm = self.margin(float(data["image"].GetSpacing()[0]))
        index, size = _native_window(data["mask"], margin_mm, self.axes)
        cut = {k: sitk.RegionOfInterest(data[k], size, index) for k in KEYS}
        return {**data, **cut, "margin_mm": margin_mm}


class CommonSpacing(Transform):
    """Both resampled (linear, `resample`) to `spacing` mm on `axes` (ITK order; 0 keeps the
    native grid), as channel-first arrays. The mask by linear interpolation of its 0/1
    values, kept where ≥ 0.5: a tumour smaller than a voxel of the new grid keeps every
    voxel it overlaps. (MONAI's Spacing would choose another output grid and interpolate with
    torch: other numbers; this keeps the box's centre and ITK's interpolation, as before.)"""

    def __init__(self, spacing: float, axes: tuple[int, ...]) -> None:
        self.spacing, self.axes = spacing, axes

    def __call__(self, data: dict) -> dict:
        picture = data["image"]
        spacing = tuple(self.spacing if a in self.axes and self.spacing > 0 else None
                        for a in range(picture.GetDimension()))
        picture = resample(picture, spacing)
        cover = resample(sitk.Cast(data["mask"], sitk.sitkFloat32), spacing)
        mask = _kept(sitk.GetArrayFromImage(cover))
        if not mask.any():
            raise ValueError(f"the tumour mask vanishes at {self.spacing} mm spacing")
        return {**data, "image": sitk.GetArrayFromImage(picture)[None],
                "mask": mask.astype(np.uint8)[None], "grid_mm": float(picture.GetSpacing()[0])}


class CubicRoi(MapTransform):
    """The ROI: the mask's bounding box grown by the margin on `axes` (numpy order of the
    spatial axes; the others keep the mask's extent), made a cube (a square) around the
    box's centre so resizing keeps the aspect, cut with MONAI's SpatialCrop (clipped to the
    image). `cube` is the shape PadToCube restores; `side_mm` the cube's physical side."""

    def __init__(self, axes: tuple[int, ...], keys: tuple[str, ...] = KEYS) -> None:
        super().__init__(keys)
        self.axes = axes

    def __call__(self, data: dict) -> dict:
        mask = data["mask"][0]
        lo, hi = bounding_box(mask)
        margin_vox = data["margin_mm"] / data["grid_mm"]
        side = int(np.ceil(max(hi[a] - lo[a] for a in self.axes) + 2 * margin_vox))
        start, stop = lo.copy(), hi.copy()
        for a in self.axes:
            start[a] = int(np.floor((lo[a] + hi[a] - side) / 2))
            stop[a] = start[a] + side
        crop = SpatialCrop(roi_start=np.maximum(start, 0), roi_end=np.minimum(stop, mask.shape))
        out = {**data, **{k: crop(torch.from_numpy(np.ascontiguousarray(data[k], np.float32)))
                          for k in self.key_iterator(data)}}
        cube = [side if a in self.axes else out["mask"].shape[1 + a] for a in range(mask.ndim)]
        return {**out, "cube": cube, "side_mm": side * data["grid_mm"]}


class ZScore(Transform):
    """The image z-scored with MONAI's NormalizeIntensity over `reference` (_reference: the
    tissue around the tumour, or the whole ROI)."""

    def __init__(self, reference: str) -> None:
        self.reference = reference

    def __call__(self, data: dict) -> dict:
        x = data["image"]
        return {**data, "image": NormalizeIntensity(**_reference(x, data["mask"],
                                                                 self.reference))(x)}


class PadToCube(MapTransform):
    """Padded back to the cube with MONAI's SpatialPad where the image border clipped it,
    with 0 (the z-scored reference's mean); plain float32 tensors from here on."""

    def __init__(self, keys: tuple[str, ...] = KEYS) -> None:
        super().__init__(keys)

    def __call__(self, data: dict) -> dict:
        pad = SpatialPad(spatial_size=data["cube"], mode="constant")
        return {**data, **{k: torch.from_numpy(np.asarray(pad(data[k]), np.float32))
                           for k in self.key_iterator(data)}}


class TumourSlices(MapTransform):
    """DSFR: one sample per axial slice with tumour, (1, z, y, x) -> [(1, y, x), ...]; the
    later steps of the Compose run on each slice on its own (MONAI's multi-sample list), so
    a slice's mask keeps its own sub-voxel tumour (KeepMask)."""

    def __init__(self, keys: tuple[str, ...] = KEYS) -> None:
        super().__init__(keys)

    def __call__(self, data: dict) -> list[dict]:
        keep = np.flatnonzero(np.asarray(data["mask"][0]).any(axis=(1, 2)))
        return [{**data, **{k: data[k][:, z] for k in self.key_iterator(data)}} for z in keep]


class KeepMask(Transform):
    """The resized mask's interpolated 0/1 values back to a 0/1 uint8 mask (_kept)."""

    def __call__(self, data: dict) -> dict:
        return {**data, "mask": _kept(np.asarray(data["mask"])).astype(np.uint8)}


# --------------------------------------------------------------------------- model inputs


def _roi_steps(prep: Preparation, dims: int, mask_label: int | None,
               grid_axes: tuple[int, ...], roi_axes: tuple[int, ...]) -> list[Transform]:
    """The steps every model shares: read, cut, resample to the common spacing on
    `grid_axes` (ITK order), the cubic ROI on `roi_axes` (numpy order), z-score, pad."""
    return [ReadPair(dims, mask_label), NativeWindow(prep.margin, grid_axes),
            CommonSpacing(prep.spacing, grid_axes), CubicRoi(roi_axes), ZScore(prep.reference),
            PadToCube()]


def _resized(size: int, dims: int) -> list[Transform]:
    """MONAI's Resize to size^dims: the image anti-aliased, the mask interpolated and kept
    at ≥ 0.5 (KeepMask), so a tumour smaller than a voxel does not vanish."""
    mode = "trilinear" if dims == 3 else "bilinear"
    return [Resized(KEYS, spatial_size=(size,) * dims, mode=mode, anti_aliasing=(True, False)),
            KeepMask()]


def _prepared(steps: list[Transform], image: Path, mask: Path, size: int) -> Prepared:
    """`steps` composed (MONAI's Compose) and run on one patient: one sample, or a list of
    them (DSFR's slices), stacked as the model's inputs."""
    try:
        out = Compose(steps)({"image": image, "mask": mask})
    except RuntimeError as err:
        raise _own_error(err) from None
    samples = out if isinstance(out, list) else [out]
    return Prepared(np.concatenate([np.asarray(d["image"], np.float32)[None] for d in samples]),
                    np.concatenate([d["mask"][None] for d in samples]),
                    samples[0]["side_mm"] / size)


def _own_error(err: BaseException) -> BaseException:
    """The step's own error inside MONAI's RuntimeError("applying transform ...") wrappers
    (one per level: a step after DSFR's per-slice split is wrapped twice); callers report
    it by type and message (ImageRefused, a vanishing mask)."""
    while (isinstance(err, RuntimeError) and err.__cause__ is not None
           and str(err).startswith("applying transform")):
        err = err.__cause__
    return err


def mri_roi(image: Path, mask: Path, prep: Preparation,
            mask_label: int | None = None) -> Prepared:
    """DL-MRI input: the ROI cube at the common spacing, z-scored, resized to size³."""
    steps = [*_roi_steps(prep, 3, mask_label, (0, 1, 2), (0, 1, 2)), *_resized(prep.size, 3)]
    return _prepared(steps, image, mask, prep.size)


def us_roi(image: Path, mask: Path, prep: Preparation,
           mask_label: int | None = None) -> Prepared:
    """DL-US input: the square ROI (common spacing, or native pixels), z-scored, size²."""
    steps = [*_roi_steps(prep, 2, mask_label, (0, 1), (0, 1)), *_resized(prep.size, 2)]
    return _prepared(steps, image, mask, prep.size)


def tumour_slices(image: Path, mask: Path, prep: Preparation,
                  mask_label: int | None = None) -> Prepared:
    """DSFR input: every axial slice with tumour of the in-plane ROI (common in-plane
    spacing), z-scored over the patient's ROI slab, resized to size²: (k, 1, size, size)."""
    steps = [*_roi_steps(prep, 3, mask_label, (0, 1), (1, 2)), TumourSlices(),
             *_resized(prep.size, 2)]
    return _prepared(steps, image, mask, prep.size)


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
