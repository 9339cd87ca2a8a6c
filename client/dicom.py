"""Reading a DICOM series folder into one SimpleITK image.

Imports only SimpleITK, so the extraction worker processes (`client.extraction_job`) can use
it without pulling in torch or MONAI.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk


class DicomSeriesError(ValueError):
    """A folder that does not hold exactly one DICOM series; `.found` is how many it holds."""

    def __init__(self, folder: Path, found: int) -> None:
        self.found = found
        super().__init__(f"{folder.name}/ holds {found} DICOM series; expected one")


def read_dicom_series(folder: Path) -> sitk.Image:
    """The one DICOM series in `folder` as an image; DicomSeriesError if it holds none or
    several; SimpleITK's RuntimeError if a file cannot be read."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        raise DicomSeriesError(folder, len(series))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()
