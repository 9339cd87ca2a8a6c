"""The image checks of a site folder: finding each patient's images, reading them (headers
only, or in full; a DICOM series folder included), and the problems of an image and its masks
(missing, unreadable, wrong dimension, geometry differing from the image, empty mask, NIfTI
file truncated)."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from client.dicom import DicomSeriesError, read_dicom_series
from client.site_messages import one_line, shown_name, site_relative, sitk_message, tidy

IMAGES_DIR = "images"

# Candidate file names per image kind, in the order they are looked for. "mri" as a folder
# is a DICOM series.
IMAGE_NAMES: dict[str, tuple[str, ...]] = {
    "mri": ("mri.nii.gz", "mri.nii", "mri.nrrd", "mri"),
    "mri_mask": ("mri_mask.nii.gz", "mri_mask.nii", "mri_mask.nrrd"),
    "mri_mask_r2": ("mri_mask_r2.nii.gz", "mri_mask_r2.nii", "mri_mask_r2.nrrd"),
    "us": ("us.png", "us.nii.gz", "us.nii", "us.nrrd"),
    "us_mask": ("us_mask.png", "us_mask.nii.gz", "us_mask.nii", "us_mask.nrrd"),
}
GEOMETRY_TOLERANCE = 1e-4  # relative; also absolute for values near zero


class _ImageError(Exception):
    """An image that cannot be read; the message is the problem text."""


@dataclass(frozen=True)
class _Geometry:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def differences(self, other: _Geometry) -> list[str]:
        """What differs from `other`, e.g. "size (16, 16, 8) vs (16, 16, 10)"."""
        if self.size != other.size:
            return [f"size {self.size} vs {other.size}"]
        found = []
        for name in ("spacing", "origin", "direction"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if not all(_close(a, b) for a, b in zip(mine, theirs, strict=True)):
                found.append(f"{name} {_rounded(mine)} vs {_rounded(theirs)}")
        return found


@dataclass
class _Read:
    geometry: _Geometry
    components: int
    image: sitk.Image | None = None  # pixels, when read in full

    @property
    def dimension(self) -> int:
        return len(self.geometry.size)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=GEOMETRY_TOLERANCE, abs_tol=GEOMETRY_TOLERANCE)


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(v, 6) for v in values)


def find_image(folder: Path, kind: str) -> Path | None:
    """The first existing candidate for `kind` in a patient's folder (a folder = DICOM)."""
    for name in IMAGE_NAMES[kind]:
        path = folder / name
        found = path.is_dir() if name == "mri" else path.is_file()
        if found:
            return path
    return None


def patient_image_problems(
    root: Path, patient: str, needs: set[str], *, full_read: bool
) -> list[tuple[str, str]]:
    """(file, message) for every image problem of one patient under `needs`."""
    folder = root / IMAGES_DIR / patient
    where = f"{IMAGES_DIR}/{patient}/"
    if not folder.is_dir():
        return [(where, f"no image folder (needed for {', '.join(sorted(needs))})")]
    problems: list[tuple[str, str]] = []
    if needs & {"mri", "mri_r2"}:
        problems += _pair_problems(
            root, folder, "mri", "mri_mask", "MRI image", "reader-1 mask", full_read=full_read,
            dims=(3,), optional_mask="mri_mask_r2" if "mri_r2" in needs else None,
        )
    if "us" in needs:
        problems += _pair_problems(
            root, folder, "us", "us_mask", "ultrasound image", "ultrasound mask",
            full_read=full_read, dims=(2,),
        )
    return problems


def _pair_problems(
    root: Path,
    folder: Path,
    image_kind: str,
    mask_kind: str,
    image_name: str,
    mask_name: str,
    *,
    full_read: bool,
    dims: tuple[int, ...],
    optional_mask: str | None = None,
) -> list[tuple[str, str]]:
    """An image and its mask(s): present, readable, right dimension, same geometry, non-empty."""
    problems: list[tuple[str, str]] = []
    image_path = find_image(folder, image_kind)
    image = None
    if image_path is None:
        names = ", ".join(n + ("/ (DICOM)" if n == "mri" else "") for n in IMAGE_NAMES[image_kind])
        problems.append(
            (site_relative(root, folder) + "/", f"missing {image_name} (one of {names})")
        )
    else:
        image = _checked_read(root, image_path, full_read, dims, problems)
    masks = [(mask_kind, mask_name, True)]
    if optional_mask:
        masks.append((optional_mask, "reader-2 mask", False))
    for kind, name, required in masks:
        path = find_image(folder, kind)
        if path is None:
            if required:
                expected = IMAGE_NAMES[kind][0]
                problems.append((site_relative(root, folder / expected), f"missing {name}"))
            continue
        mask = _checked_read(root, path, True, dims, problems)
        if mask is None:
            continue
        if image is not None and image_path is not None:
            differences = mask.geometry.differences(image.geometry)
            if differences:
                problems.append((
                    site_relative(root, path),
                    f"{name} geometry differs from {shown_name(image_path)}: "
                    f"{'; '.join(differences)}",
                ))
        if not sitk.GetArrayViewFromImage(mask.image).any():
            problems.append((site_relative(root, path), f"{name} is empty (no non-zero voxel)"))
    return problems


def _checked_read(
    root: Path, path: Path, full: bool, dims: tuple[int, ...], problems: list[tuple[str, str]]
) -> _Read | None:
    """Read an image; on failure append the problem and return None."""
    try:
        read = _read_image(path, full=full)
    except _ImageError as error:
        problems.append((site_relative(root, path), f"cannot read image: {tidy(str(error), root)}"))
        return None
    dimension = read.dimension
    if dimension == 3 and 2 in dims and read.geometry.size[2] == 1:
        dimension = 2  # a single-slice volume is a 2D image
    if dimension not in dims:
        expected = " or ".join(f"{d}D" for d in dims)
        problems.append(
            (site_relative(root, path), f"image is {read.dimension}D; expected {expected}")
        )
        return None
    return read


def _read_image(path: Path, *, full: bool) -> _Read:
    """Geometry (and pixels when `full`) of an image file or DICOM series folder."""
    try:
        if path.is_dir():
            read = _read_dicom(path)
        elif full:
            image = sitk.ReadImage(str(path))
            read = _Read(_geometry_of(image), image.GetNumberOfComponentsPerPixel(), image)
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            read = _Read(_geometry_of(reader), reader.GetNumberOfComponents())
    except RuntimeError as error:
        raise _ImageError(sitk_message(error)) from None
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path, thorough=full)
    return read


def _read_dicom(folder: Path) -> _Read:
    try:
        image = read_dicom_series(folder)
    except DicomSeriesError as error:
        if not error.found:
            raise _ImageError("no DICOM series found in the folder") from None
        raise _ImageError(f"the folder holds {error.found} DICOM series; expected one") from None
    return _Read(_geometry_of(image), image.GetNumberOfComponentsPerPixel(), image)


def _geometry_of(source: Any) -> _Geometry:
    return _Geometry(
        tuple(int(v) for v in source.GetSize()),
        tuple(float(v) for v in source.GetSpacing()),
        tuple(float(v) for v in source.GetOrigin()),
        tuple(float(v) for v in source.GetDirection()),
    )


def _check_nifti_complete(path: Path, *, thorough: bool) -> None:
    """SimpleITK reads truncated NIfTI files without error; check the data is all there.

    Uncompressed: file size. Gzip: the trailer's length field (cheap), and with `thorough`
    (or when the trailer disagrees) a full decompression, which also checks the CRC.
    """
    compressed = path.name.endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as stream:
            expected = _nifti_total_bytes(stream.read(540))
    except EOFError:
        raise _ImageError("file is truncated (compressed stream ends early)") from None
    except (OSError, zlib.error) as error:
        raise _ImageError(f"corrupt file ({one_line(error)})") from None
    if expected is None:
        return  # not a header we understand; SimpleITK accepted it
    if not compressed:
        actual = path.stat().st_size
    elif not thorough and _gzip_trailer_size(path) == expected % 2**32:
        return
    else:
        actual = _gunzipped_size(path)
    if actual < expected:
        raise _ImageError(f"file is truncated ({actual} of {expected} bytes)")


def _nifti_total_bytes(header: bytes) -> int | None:
    """vox_offset + data bytes from a NIfTI-1/2 header, or None if not a NIfTI header."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = max(struct.unpack(endian + "q", header[168:176])[0], 544)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]]))
    return offset + voxels * bitpix // 8


def _gzip_trailer_size(path: Path) -> int:
    with path.open("rb") as handle:
        handle.seek(-4, 2)
        return struct.unpack("<I", handle.read(4))[0]


def _gunzipped_size(path: Path) -> int:
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    except EOFError:
        raise _ImageError("file is truncated (compressed stream ends early)") from None
    except (OSError, zlib.error) as error:
        raise _ImageError(f"corrupt compressed data ({one_line(error)})") from None
    return total
