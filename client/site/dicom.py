"""Reading a DICOM folder into one 3D SimpleITK image, or refusing it with the true cause.

- **One series** per folder (GDCM groups the files by series UID; files need no
  extension); slices are ordered by their position along the slice normal, whatever their
  instance numbers say. Rescale slope/intercept are applied (SimpleITK).
- **Uniform slice spacing.** ITK averages the gaps of a series with a missing slice (2.1 mm
  slices become 2.21 mm, and every slice after the gap is misplaced); each gap between
  consecutive slice positions must equal the median gap within `SLICE_GAP_TOLERANCE`, else
  the folder is refused naming the gap.
- **Enhanced multi-frame** (one file holding every slice): read as one 3D image, its frame
  positions checked the same way (pydicom reads them from the per-frame functional groups).

Imports only SimpleITK and numpy (pydicom for multi-frame files only), so the extraction
worker processes (`client.local.extraction_job`) can use it without torch or MONAI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

# A gap between consecutive slices may differ from the median gap by this share of it
# (or 0.01 mm, whichever is larger) — positions are written with a few decimals; a
# missing slice doubles a gap.
SLICE_GAP_TOLERANCE = 0.01
POSITION_TAG = "0020|0032"  # Image Position (Patient)


class DicomSeriesError(ValueError):
    """A folder that does not hold exactly one DICOM series; `.found` is how many it holds."""

    def __init__(self, folder: Path, found: int) -> None:
        self.found = found
        super().__init__(f"{folder.name}/ holds {found} DICOM series; expected one")


class DicomGeometryError(ValueError):
    """A series whose slices are not evenly spaced (a missing or duplicated slice)."""


def read_dicom_series(folder: Path) -> sitk.Image:
    """The one DICOM series in `folder` as a 3D image; DicomSeriesError if it holds none or
    several, DicomGeometryError if its slices are unevenly spaced; SimpleITK's RuntimeError
    if a file cannot be read."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        raise DicomSeriesError(folder, len(series))
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    if len(files) == 1:
        return _single_file(Path(files[0]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "non uniform" warning: ours
    try:
        image = reader.Execute()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    if image.GetDimension() != 3:
        raise DicomGeometryError(f"the series' files are {image.GetDimension() - 1}D "
                                 "images each; expected one 2D slice per file")
    positions = [_position(reader.GetMetaData(i, POSITION_TAG)) if
                 reader.HasMetaDataKey(i, POSITION_TAG) else None for i in range(len(files))]
    if any(p is None for p in positions):
        raise DicomGeometryError("a slice has no Image Position (Patient); the slice order "
                                 "and spacing cannot be known")
    check_slice_gaps(np.array(positions, dtype=float), image, "slices")
    return image


def check_slice_gaps(positions: np.ndarray, image: sitk.Image, what: str) -> None:
    """Each gap between consecutive positions along the slice normal equals the median gap
    (and the image's slice spacing); else DicomGeometryError naming the gap."""
    if len(positions) < 2:
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    along = np.sort(positions @ normal)
    gaps = np.diff(along)
    median = float(np.median(gaps))
    if median <= 1e-6:
        raise DicomGeometryError(f"several {what} lie at the same position (a repeated "
                                 "acquisition or a 4D series?); expected one 3D volume")
    tolerance = max(SLICE_GAP_TOLERANCE * median, 0.01)
    bad = np.flatnonzero(np.abs(gaps - median) > tolerance)
    if len(bad):
        first = int(bad[0])
        raise DicomGeometryError(
            f"non-uniform slice spacing: the gap between {what} {first + 1} and {first + 2} "
            f"(of {len(positions)}, by position) is {gaps[first]:.3g} mm, the others "
            f"{median:.3g} mm ({len(bad)} uneven gap{'s' if len(bad) > 1 else ''}; a missing "
            "slice?)")
    spacing = image.GetSpacing()[2]
    if abs(spacing - median) > tolerance:
        raise DicomGeometryError(f"slice spacing {spacing:.3g} mm in the header but the "
                                 f"slice positions are {median:.3g} mm apart")


def _position(text: str) -> tuple[float, float, float] | None:
    try:
        values = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    return values if len(values) == 3 else None  # type: ignore[return-value]


def _single_file(path: Path) -> sitk.Image:
    """A folder of one file: an enhanced multi-frame image read as 3D (ImageSeriesReader
    would make it 4D), its frame positions checked; a single 2D slice is refused."""
    image = sitk.ReadImage(str(path))
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and image.GetSize()[2] == 1):
        raise DicomGeometryError("the series holds one 2D slice; expected a 3D volume "
                                 "(one file per slice, or one enhanced multi-frame file)")
    if image.GetDimension() != 3:
        raise DicomGeometryError(f"the file holds a {image.GetDimension()}D image; "
                                 "expected 3D")
    positions = _frame_positions(path)
    if positions is not None:
        if len(positions) != image.GetSize()[2]:
            raise DicomGeometryError(f"{len(positions)} frame positions for "
                                     f"{image.GetSize()[2]} frames")
        check_slice_gaps(positions, image, "frames")
    return image


def _frame_positions(path: Path) -> np.ndarray | None:
    """The per-frame Image Position (Patient) of an enhanced multi-frame file (pydicom);
    None when the file has no per-frame positions. DicomGeometryError if pydicom is
    missing (then the frames' spacing cannot be checked)."""
    try:
        import pydicom
    except ImportError:
        raise DicomGeometryError("a multi-frame DICOM file: its frame positions are read "
                                 "with pydicom, which is not installed (pip install "
                                 "pydicom)") from None
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    frames = dataset.get("PerFrameFunctionalGroupsSequence")
    if not frames:
        return None
    positions = []
    for frame in frames:
        planes = frame.get("PlanePositionSequence")
        if not planes or "ImagePositionPatient" not in planes[0]:
            return None
        positions.append([float(v) for v in planes[0].ImagePositionPatient])
    return np.array(positions, dtype=float)
