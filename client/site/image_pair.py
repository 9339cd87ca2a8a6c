"""One acceptance path for a patient's image and mask, the same in `feddlr check-site`, in
radiomics extraction and in the CNN stages: read the image (a file or a DICOM folder, see
`client.site.dicom`), read the mask, put the mask on the image's grid in physical space, pick
the tumour voxels. A patient that fails is refused with an `ImageRefused` naming the file,
the problem and its `category` (the reason a stage's reply counts it under).

Geometry (physical space, LPS). A mask on the image's own grid is used as it is. A mask on
another grid — another orientation (prone, RAS), a sagittal grid, another spacing (a
tool's resampled export) — is accepted when its grid covers the same physical box as the
image's: each face of its box lies within `GRID_TOLERANCE_VOXELS` voxel (of the coarser
grid on that axis) of the image's. It is then resampled onto the image grid by nearest
neighbour (labels are never interpolated). The image's grid moved by at most half a voxel
(an origin written at a voxel's corner) keeps its voxels as they are. A mask whose grid is a
crop of the image's grid (same spacing and direction, origin on an image voxel, inside the
image) is placed back the same way. Any other mask is refused with the offset of its box
in mm: it lies elsewhere (misregistered, or a mask of another series).

Tumour voxels: every non-zero voxel, unless site.yaml's `mask_label` picks one value.

Imports only SimpleITK and numpy (no torch, no pandas): the extraction worker processes
use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.site.dicom import DicomGeometryError, DicomSeriesError, read_dicom_series
from client.site.messages import sitk_message
from client.site.nifti import TruncatedImage, check_nifti_complete

# Candidate file names per image kind in a patient's folder. "mri" as a folder is a DICOM
# series. Two of them present for one kind is refused (the stale one would win silently).
IMAGE_NAMES: dict[str, tuple[str, ...]] = {
    "mri": ("mri.nii.gz", "mri.nii", "mri.nrrd", "mri"),
    "mri_mask": ("mri_mask.nii.gz", "mri_mask.nii", "mri_mask.nrrd"),
    "mri_mask_r2": ("mri_mask_r2.nii.gz", "mri_mask_r2.nii", "mri_mask_r2.nrrd"),
    "us": ("us.png", "us.nii.gz", "us.nii", "us.nrrd"),
    "us_mask": ("us_mask.png", "us_mask.nii.gz", "us_mask.nii", "us_mask.nrrd"),
}

# How far the faces of a mask's grid box may lie from the image's, in voxels of the
# coarser of the two grids on that axis: the rounding of a resampled export's size (< 1
# voxel) passes; a mask 20 mm off does not.
GRID_TOLERANCE_VOXELS = 1.0
SAME_GRID_TOLERANCE = 1e-4  # relative (absolute near zero): the same grid, used as it is

# Why a patient's images were refused: the categories a stage's reply counts patients by
# (no patient detail in them; the full message is in the site's own log).
MISSING = "image or mask missing"
UNREADABLE = "image or mask unreadable"
TWO_SOURCES = "two image sources for one modality"
DIMENSION = "image of the wrong dimension"
SLICE_SPACING = "DICOM series with uneven slice spacing (missing slice)"
MISREGISTERED = "mask not on the image's region (misregistered)"
EMPTY = "mask empty"
NO_LABEL = "mask holds no voxel of mask_label"
PREPARATION = "image preparation failed"
CATEGORIES = (MISSING, UNREADABLE, TWO_SOURCES, DIMENSION, SLICE_SPACING, MISREGISTERED,
              EMPTY, NO_LABEL, PREPARATION)


# The category of a problem message of client.site.images (a patient `load_site` excluded
# for its images): the first phrase found.
_PHRASES = (("two sources for one image", TWO_SOURCES), ("slice spacing", SLICE_SPACING),
            ("same position", SLICE_SPACING), ("region:", MISREGISTERED),
            ("no voxel of mask_label", NO_LABEL), ("is empty", EMPTY),
            ("D; expected", DIMENSION), ("D but ", DIMENSION), ("cannot read", UNREADABLE),
            ("cannot use", UNREADABLE), ("no image folder", MISSING), ("missing ", MISSING))


def category_of(message: str) -> str | None:
    """The category of an image problem message (None: not an image problem)."""
    if not message.startswith("images/"):
        return None
    return next((category for phrase, category in _PHRASES if phrase in message), PREPARATION)


class ImageRefused(ValueError):
    """A patient's image or mask that no stage may use: `file` (the path), `category` (one
    of CATEGORIES) and the message saying what is wrong."""

    def __init__(self, category: str, message: str, file: Path | None = None) -> None:
        self.category = category
        self.file = file
        super().__init__(message)


@dataclass(frozen=True)
class Grid:
    """An image's grid: size, spacing, origin, direction (ITK order)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, source: sitk.Image | sitk.ImageFileReader) -> Grid:
        return cls(tuple(int(v) for v in source.GetSize()),
                   tuple(float(v) for v in source.GetSpacing()),
                   tuple(float(v) for v in source.GetOrigin()),
                   tuple(float(v) for v in source.GetDirection()))

    @property
    def dimension(self) -> int:
        return len(self.size)

    def flat(self) -> Grid:
        """A one-slice 3D grid as 2D (as `flat` makes its image)."""
        if self.dimension != 3 or self.size[2] != 1:
            return self
        direction = np.array(self.direction).reshape(3, 3)[:2, :2]
        return Grid(self.size[:2], self.spacing[:2], self.origin[:2],
                    tuple(float(v) for v in direction.ravel()))

    def matrix(self) -> np.ndarray:
        """Index (continuous) -> physical point: point = origin + D · diag(spacing) · index."""
        d = self.dimension
        return np.array(self.direction).reshape(d, d) @ np.diag(self.spacing)

    def same_as(self, other: Grid) -> bool:
        if self.size != other.size:
            return False
        return all(np.allclose(getattr(self, name), getattr(other, name),
                               rtol=SAME_GRID_TOLERANCE, atol=SAME_GRID_TOLERANCE)
                   for name in ("spacing", "origin", "direction"))

    def corners(self) -> np.ndarray:
        """The physical points of the corners of the grid's box (voxel edges), (2^d, d)."""
        d = self.dimension
        lows, highs = np.full(d, -0.5), np.array(self.size) - 0.5
        picks = np.array(np.meshgrid(*[[0, 1]] * d, indexing="ij")).reshape(d, -1).T
        index = np.where(picks == 1, highs, lows)
        return np.array(self.origin) + index @ self.matrix().T


# --------------------------------------------------------------------------- reading


def image_sources(folder: Path, kind: str) -> list[Path]:
    """Every candidate for `kind` present in a patient's folder (a folder = DICOM)."""
    found = []
    for name in IMAGE_NAMES[kind]:
        path = folder / name
        if path.is_dir() if name == "mri" else path.is_file():
            found.append(path)
    return found


def find_image(folder: Path, kind: str) -> Path | None:
    """The first candidate for `kind` in a patient's folder (`one_source` refuses two)."""
    found = image_sources(folder, kind)
    return found[0] if found else None


def one_source(path: Path) -> None:
    """ImageRefused when the folder of `path` holds another source for the same image
    (`mri.nii.gz` beside a DICOM folder `mri/`), naming both."""
    kinds = [k for k, names in IMAGE_NAMES.items() if path.name in names]
    for kind in kinds:
        found = image_sources(path.parent, kind)
        if len(found) > 1:
            shown = " and ".join(p.name + ("/" if p.is_dir() else "") for p in found)
            raise ImageRefused(TWO_SOURCES, f"two sources for one image: {shown}; keep one "
                               "(the other may be a stale copy)", path.parent)


def nifti_complete(path: Path, *, thorough: bool = False) -> None:
    """ImageRefused when a NIfTI file is truncated (SimpleITK reads it without error)."""
    if path.name.endswith((".nii", ".nii.gz")):
        try:
            check_nifti_complete(path, thorough=thorough)
        except TruncatedImage as error:
            raise ImageRefused(UNREADABLE, f"cannot read image: {error}", path) from None


def read_image(path: Path) -> sitk.Image:
    """An image file or a DICOM folder as a SimpleITK image; ImageRefused when it cannot be
    read (the true cause: no series, several series, uneven slices, SimpleITK's message)."""
    try:
        if path.is_dir():
            return read_dicom_series(path)
        return sitk.ReadImage(str(path))
    except DicomSeriesError as error:
        text = ("no DICOM series found in the folder" if not error.found else
                f"the folder holds {error.found} DICOM series; expected one")
        raise ImageRefused(UNREADABLE, f"cannot read image: {text}", path) from None
    except DicomGeometryError as error:
        uneven = any(word in str(error) for word in ("spacing", "same position"))
        category = SLICE_SPACING if uneven else UNREADABLE
        raise ImageRefused(category, f"cannot use the DICOM series: {error}", path) from None
    except RuntimeError as error:
        raise ImageRefused(UNREADABLE, f"cannot read image: {sitk_message(error)}",
                           path) from None


def read_grid(path: Path) -> tuple[Grid, int]:
    """The grid and number of components from the header only (a DICOM folder is read)."""
    if path.is_dir():
        image = read_image(path)
        return Grid.of(image), image.GetNumberOfComponentsPerPixel()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageRefused(UNREADABLE, f"cannot read image: {sitk_message(error)}",
                           path) from None
    return Grid.of(reader), reader.GetNumberOfComponents()


def flat(image: sitk.Image) -> sitk.Image:
    """A one-slice 3D picture as 2D (a PNG read as 3D, an exported single slice)."""
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        return image[:, :, 0]
    return image


# --------------------------------------------------------------------------- the mask


def tumour(mask: sitk.Image, label: int | None, path: Path, name: str) -> sitk.Image:
    """The tumour voxels of a mask (0/1, UInt8, on the mask's own grid): every non-zero
    voxel, or the voxels equal to `label`; ImageRefused when there are none."""
    values = sitk.GetArrayViewFromImage(mask)
    if mask.GetNumberOfComponentsPerPixel() > 1:  # a colour picture: any channel counts
        values = values.max(axis=-1)
    picked = values != 0 if label is None else values == label
    if not picked.any():
        if label is None or not np.any(values != 0):
            raise ImageRefused(EMPTY, f"{name} is empty (no non-zero voxel)", path)
        found = ", ".join(str(v) for v in np.unique(values[values != 0])[:8])
        raise ImageRefused(NO_LABEL, f"{name} holds no voxel of mask_label {label} "
                           f"(site.yaml); its values: {found}", path)
    binary = sitk.GetImageFromArray(picked.astype(np.uint8))
    binary.CopyInformation(mask)
    return binary


def on_image_grid(mask: sitk.Image, image: Grid, path: Path, name: str,
                  image_name: str) -> sitk.Image:
    """The 0/1 mask on the image's grid: as it is on the same grid, resampled by nearest
    neighbour from a grid over the same physical box (or a crop of the image's grid);
    ImageRefused with the offset in mm when it lies elsewhere."""
    grid = Grid.of(mask)
    how = placement(grid, image, path, name, image_name)
    if how is None or how.startswith(SHIFTED):
        placed = sitk.Image(mask)  # the same voxels (an exporter's corner/centre convention)
    else:
        placed = sitk.Resample(mask, list(image.size), sitk.Transform(),
                               sitk.sitkNearestNeighbor, image.origin, image.spacing,
                               image.direction, 0, sitk.sitkUInt8)
    # the exact grid of the image, so no reader downstream compares them again
    placed.SetOrigin(image.origin)
    placed.SetSpacing(image.spacing)
    placed.SetDirection(image.direction)
    if not sitk.GetArrayViewFromImage(placed).any():
        raise ImageRefused(EMPTY, f"{name} is empty on {image_name}'s grid (its tumour "
                           "voxels fall between the image's voxel centres)", path)
    return placed


SHIFTED = "has its origin at most half a voxel off"


def placement(grid: Grid, image: Grid, path: Path, name: str,
              image_name: str) -> str | None:
    """How a mask on `grid` is put on the image's grid: None (the same grid), or what is
    done, in words (check-site notes it); ImageRefused when it lies elsewhere."""
    if grid.dimension != image.dimension:
        raise ImageRefused(DIMENSION, f"{name} is {grid.dimension}D but {image_name} is "
                           f"{image.dimension}D", path)
    if grid.same_as(image):
        return None
    if _sub_voxel_shift(grid, image):
        return f"{SHIFTED} from {image_name}'s grid: used voxel for voxel"
    if _is_crop(grid, image):
        return f"is a crop of {image_name}'s grid: placed back on it"
    if _covers_same_box(grid, image):
        return (f"is on another grid over {image_name}'s region ({_grid_text(grid)}): resampled "
                "onto its grid by nearest neighbour")
    raise ImageRefused(MISREGISTERED, f"{name} is not on {image_name}'s region: "
                       f"{_offset_text(grid, image)}", path)


def _grid_text(grid: Grid) -> str:
    spacing = " x ".join(f"{v:.3g}" for v in grid.spacing)
    text = f"size {grid.size}, spacing {spacing} mm"
    if grid.dimension == 3:
        orient = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines
        text += f", orientation {orient(grid.direction)}"
    return text


def _box(grid: Grid, frame: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The grid's box in `frame`'s continuous index space: (low, high) per axis."""
    index = (grid.corners() - np.array(frame.origin)) @ np.linalg.inv(frame.matrix()).T
    return index.min(axis=0), index.max(axis=0)


def _tolerance(grid: Grid, image: Grid) -> np.ndarray:
    """Per image axis, in image voxels: GRID_TOLERANCE_VOXELS of the coarser grid."""
    d = image.dimension
    image_axes = np.array(image.direction).reshape(d, d)
    mask_step = np.abs(image_axes.T @ grid.matrix()).max(axis=1)  # mask voxel along axis
    return GRID_TOLERANCE_VOXELS * np.maximum(1.0, mask_step / np.array(image.spacing))


def _covers_same_box(grid: Grid, image: Grid) -> bool:
    low, high = _box(grid, image)
    tolerance = _tolerance(grid, image)
    return bool(np.all(np.abs(low + 0.5) <= tolerance)
                and np.all(np.abs(high - (np.array(image.size) - 0.5)) <= tolerance))


def _sub_voxel_shift(grid: Grid, image: Grid) -> bool:
    """The image's grid moved by at most half a voxel per axis: an origin written at a
    voxel's corner instead of its centre. Its voxels are the image's (nearest neighbour
    would round each tie to one side and move the whole mask by a voxel)."""
    if grid.size != image.size or not np.allclose(grid.spacing, image.spacing,
                                                  rtol=SAME_GRID_TOLERANCE):
        return False
    if not np.allclose(grid.direction, image.direction, atol=SAME_GRID_TOLERANCE):
        return False
    shift = np.linalg.solve(image.matrix(), np.array(grid.origin) - np.array(image.origin))
    return bool(np.all(np.abs(shift) <= 0.5 + 1e-6))


def _is_crop(grid: Grid, image: Grid) -> bool:
    """Same spacing and direction, origin on an image voxel centre, box inside the image."""
    if not (np.allclose(grid.spacing, image.spacing, rtol=SAME_GRID_TOLERANCE)
            and np.allclose(grid.direction, image.direction, atol=SAME_GRID_TOLERANCE)):
        return False
    start = np.linalg.solve(image.matrix(), np.array(grid.origin) - np.array(image.origin))
    aligned = np.allclose(start, np.round(start), atol=1e-3)
    return bool(aligned and np.all(np.round(start) >= 0)
                and np.all(np.round(start) + np.array(grid.size) <= np.array(image.size)))


def _offset_text(grid: Grid, image: Grid) -> str:
    """Where the mask's box lies against the image's, in mm (LPS)."""
    mine, theirs = grid.corners(), image.corners()
    shift = mine.mean(axis=0) - theirs.mean(axis=0)
    extent = np.ptp(mine, axis=0) - np.ptp(theirs, axis=0)
    text = (f"its grid's centre is offset by {_mm(shift)} mm (LPS; "
            f"{float(np.linalg.norm(shift)):.1f} mm)")
    if np.any(np.abs(extent) > 0.05):
        text += f" and its extent differs by {_mm(extent)} mm"
    return text + (f"; a mask on another grid must cover the image's box within "
                   f"{GRID_TOLERANCE_VOXELS:g} voxel per face")


def _mm(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:+.1f}" for v in values) + ")"


# --------------------------------------------------------------------------- the pair


def accepted_pair(image_path: Path, mask_path: Path, *, label: int | None = None,
                  dims: tuple[int, ...] = (3,), mask_name: str = "mask",
                  image_name: str | None = None) -> tuple[sitk.Image, sitk.Image]:
    """The image and its 0/1 tumour mask on the image's grid, as every stage uses them; or
    ImageRefused (category, file, message)."""
    one_source(image_path)
    nifti_complete(image_path)
    image = flat(read_image(image_path)) if 2 in dims else read_image(image_path)
    image_name = image_name or image_path.name
    if image.GetDimension() not in dims:
        expected = " or ".join(f"{d}D" for d in dims)
        raise ImageRefused(DIMENSION, f"image is {image.GetDimension()}D; expected {expected}",
                           image_path)
    return image, accepted_mask(mask_path, Grid.of(image), label=label, name=mask_name,
                                image_name=image_name)


def accepted_mask(mask_path: Path, image: Grid, *, label: int | None = None,
                  name: str = "mask", image_name: str = "the image") -> sitk.Image:
    """A mask file's 0/1 tumour voxels on the image's grid (the image's header suffices)."""
    one_source(mask_path)
    nifti_complete(mask_path)
    mask = read_image(mask_path)
    if image.dimension == 2:
        mask = flat(mask)
    return on_image_grid(tumour(mask, label, mask_path, name), image, mask_path, name,
                         image_name)
