"""Site-side image preparation for the CNN stages: tumour ROI crops as the papers make them.

Paper 2 extends the tumour mask by 50 pixels and crops the ROI around it, normalizes
(Z-score) and resizes (96³ MRI, 256² ultrasound). Here the ROI is the mask's bounding box
grown by `margin` pixels in-plane (and by the same physical distance through-plane for MRI),
made square in-plane so resizing keeps the aspect, and clipped to the image. Intensities are
z-scored over the crop (which also removes the sites' scanner scale and offset).

DSFR (paper 1) uses the same in-plane ROI per patient and keeps every axial slice that
contains tumour, resized to 64×64, with its mask slice as the segmentation target.
Nothing here leaves the site.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.nn import functional as F


def read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """(array in numpy order — (z, y, x) or (y, x) —, spacing in ITK order (x, y[, z])).
    A DICOM series is a folder; a multi-channel image becomes its channel mean."""
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if len(series) != 1:
            raise ValueError(f"{path.name}/ holds {len(series)} DICOM series; expected one")
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array.mean(axis=-1)
    return array, tuple(float(s) for s in image.GetSpacing())


def roi_box(mask: np.ndarray, margin: int, spacing: tuple[float, ...] = ()) -> tuple[slice, ...]:
    """Bounding box of the non-zero mask, grown by `margin` pixels in-plane (the last two
    axes) and, for a volume, by the same physical distance through-plane; square in-plane;
    clipped to the array."""
    nonzero = np.argwhere(mask != 0)
    if not len(nonzero):
        raise ValueError("empty mask")
    lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    grow = [margin] * mask.ndim
    if mask.ndim == 3:
        inplane, through = (spacing[0], spacing[2]) if len(spacing) == 3 else (1.0, 1.0)
        grow[0] = int(np.ceil(margin * inplane / max(through, 1e-6)))
    lo = lo - np.array(grow)
    hi = hi + np.array(grow)
    # square in-plane: widen the narrower side around its centre
    side = max(hi[-1] - lo[-1], hi[-2] - lo[-2])
    for axis in (-2, -1):
        extra = side - (hi[axis] - lo[axis])
        lo[axis] -= extra // 2
        hi[axis] += extra - extra // 2
    shape = np.array(mask.shape)
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def zscore(x: np.ndarray) -> np.ndarray:
    std = float(x.std())
    return ((x - float(x.mean())) / (std if std > 1e-8 else 1.0)).astype(np.float32)


def resize(x: np.ndarray, size: tuple[int, ...], *, nearest: bool = False) -> np.ndarray:
    """Resize a 2D or 3D array (linear, or nearest for masks)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    mode = "nearest" if nearest else ("trilinear" if x.ndim == 3 else "bilinear")
    kwargs = {} if nearest else {"align_corners": False}
    return F.interpolate(t, size=size, mode=mode, **kwargs)[0, 0].numpy()


def mri_roi(image: Path, mask: Path, size: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """DL-MRI input: the z-scored ROI volume and its mask, both (1, size, size, size)."""
    volume, spacing = read_array(image)
    labels, _ = read_array(mask)
    box = roi_box(labels, margin, spacing)
    crop = zscore(volume[box])
    return (resize(crop, (size,) * 3)[None],
            (resize((labels[box] != 0).astype(np.float32), (size,) * 3, nearest=True)[None]
             > 0.5).astype(np.uint8))


def us_roi(image: Path, mask: Path, size: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """DL-US input: the z-scored ROI image and its mask, both (1, size, size)."""
    picture, _ = read_array(image)
    labels, _ = read_array(mask)
    if picture.ndim == 3 and picture.shape[0] == 1:
        picture, labels = picture[0], labels.reshape(picture.shape[-2:])
    box = roi_box(labels, margin)
    crop = zscore(picture[box])
    return (resize(crop, (size, size))[None],
            (resize((labels[box] != 0).astype(np.float32), (size, size), nearest=True)[None]
             > 0.5).astype(np.uint8))


def tumour_slices(image: Path, mask: Path, size: int,
                  margin: int) -> tuple[np.ndarray, np.ndarray]:
    """DSFR input: every axial slice with tumour, in-plane ROI z-scored over the patient's
    ROI, resized to size×size: (k, 1, size, size) images and (k, 1, size, size) masks."""
    volume, spacing = read_array(image)
    labels, _ = read_array(mask)
    box = roi_box(labels, margin, spacing)
    inplane = (slice(None), box[1], box[2])
    crop = zscore(volume[inplane])
    target = (labels[inplane] != 0)
    keep = np.flatnonzero(target.any(axis=(1, 2)))
    images = np.stack([resize(crop[z], (size, size)) for z in keep])[:, None]
    masks = np.stack([resize(target[z].astype(np.float32), (size, size), nearest=True)
                      for z in keep])[:, None]
    return images.astype(np.float32), (masks > 0.5).astype(np.uint8)
