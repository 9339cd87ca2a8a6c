"""A realistic hospital site folder, built at test time from images that packages ship:
pyradiomics' breast1 MRI and tumour mask, written the ways hospital systems write them —
a DICOM series (pydicom; stored integers with rescale slope/intercept, reversed instance
numbers, a missing slice, an enhanced multi-frame file) and masks exported on other grids
(resampled, reoriented prone or sagittal, shifted).

Each builder writes one patient's files; `realistic_site` writes a whole site folder. Tests
of the image path (tests/test_site_geometry.py, tests/test_site_dicom_series.py) and study
tests use them.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

REPO = Path(__file__).resolve().parents[2]
# pyradiomics' test case; a checkout has it beside the repository (shared/data/breast1),
# else pyradiomics fetches it (radiomics.getTestCase)
BREAST1_DIRS = (REPO.parent / "shared" / "data" / "breast1", Path("/work/shared/data/breast1"))

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SLOPE, INTERCEPT = 0.5, -20.0  # stored = (value - intercept) / slope


# --------------------------------------------------------------------------- breast1


def breast1() -> tuple[Path, Path]:
    """(image, mask) NRRD files of pyradiomics' breast1 test case."""
    for folder in BREAST1_DIRS:
        image, mask = folder / "breast1_image.nrrd", folder / "breast1_label.nrrd"
        if image.is_file() and mask.is_file():
            return image, mask
    import radiomics

    image, mask = radiomics.getTestCase("breast1")
    if image is None or mask is None:
        pytest.fail("pyradiomics' breast1 test case is neither beside the repository nor "
                    "downloadable")
    return Path(image), Path(mask)


def breast1_images() -> tuple[sitk.Image, sitk.Image]:
    image, mask = breast1()
    return sitk.ReadImage(str(image)), sitk.ReadImage(str(mask))


# --------------------------------------------------------------------------- DICOM


def _uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid())


def _base_dataset(sop_class: str, series_uid: str, study_uid: str, frame_uid: str) -> object:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "MR"
    ds.PatientID, ds.PatientName = "ANON", "Anon^Patient"
    ds.StudyDate = ds.SeriesDate = datetime.date(2024, 1, 1).strftime("%Y%m%d")
    ds.SeriesNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def _stored(values: np.ndarray) -> np.ndarray:
    return np.round((values.astype(np.float64) - INTERCEPT) / SLOPE).astype(np.uint16)


def write_dicom_series(image: sitk.Image, folder: Path, *, missing: Iterable[int] = (),
                       reverse_instances: bool = False, series_uid: str | None = None,
                       file_names: str = "IM{:04d}") -> Path:
    """`image` as a classic MR DICOM series (one file per slice, no extension), stored as
    unsigned integers with rescale slope/intercept. `missing`: slice indices left out (a
    lost file); `reverse_instances`: instance numbers run against the slice positions."""
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    series_uid = series_uid or _uid()
    study_uid, frame_uid = _uid(), _uid()
    kept = [z for z in range(array.shape[0]) if z not in set(missing)]
    for number, z in enumerate(kept, start=1):
        ds = _base_dataset(MR_IMAGE_STORAGE, series_uid, study_uid, frame_uid)
        ds.InstanceNumber = len(kept) + 1 - number if reverse_instances else number
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint(
            (0, 0, z))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in
                                      (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row, column
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.RescaleSlope, ds.RescaleIntercept = f"{SLOPE}", f"{INTERCEPT}"
        ds.PixelData = _stored(array[z]).tobytes()
        ds.save_as(folder / file_names.format(number), enforce_file_format=True)
    return folder


def write_enhanced_mr(image: sitk.Image, path: Path) -> Path:
    """`image` as one enhanced multi-frame MR file (per-frame plane positions, shared pixel
    measures, orientation and rescale)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    array = sitk.GetArrayFromImage(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    ds = _base_dataset(ENHANCED_MR_STORAGE, _uid(), _uid(), _uid())
    ds.InstanceNumber = 1
    ds.NumberOfFrames = array.shape[0]
    ds.Rows, ds.Columns = array.shape[1], array.shape[2]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    measures, orientation, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
    measures.SliceThickness = f"{spacing[2]:.6f}"
    measures.SpacingBetweenSlices = f"{spacing[2]:.6f}"
    orientation.ImageOrientationPatient = [f"{v:.6f}" for v in
                                           (*direction[:, 0], *direction[:, 1])]
    rescale.RescaleSlope, rescale.RescaleIntercept = f"{SLOPE}", f"{INTERCEPT}"
    rescale.RescaleType = "US"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for z in range(array.shape[0]):
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in
                                         image.TransformIndexToPhysicalPoint((0, 0, z))]
        frame.PlanePositionSequence = Sequence([position])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = _stored(array).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- ultrasound

US_FILE = "examples_rgb_color.dcm"  # pydicom's own test file: a 240 x 320 RGB US frame


def write_ultrasound(folder: Path) -> tuple[Path, Path]:
    """pydicom's RGB ultrasound frame as the patient's us.png (as a hospital exports a
    frame, colour and all) and an elliptic lesion mask us_mask.png (0/255)."""
    import pydicom
    from pydicom.data import get_testdata_file

    frame = pydicom.dcmread(get_testdata_file(US_FILE)).pixel_array.astype(np.uint8)
    rows, columns = frame.shape[:2]
    y, x = np.ogrid[:rows, :columns]
    lesion = ((y - rows * 0.55) / (rows * 0.12)) ** 2 + ((x - columns * 0.5) /
                                                          (columns * 0.1)) ** 2 <= 1
    folder.mkdir(parents=True, exist_ok=True)
    us = write(sitk.GetImageFromArray(frame, isVector=True), folder / "us.png")
    mask = write(sitk.GetImageFromArray(lesion.astype(np.uint8) * 255), folder / "us_mask.png")
    return us, mask


# --------------------------------------------------------------------------- masks


def on_grid(mask: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    """The mask exported on another grid over the same physical box (nearest neighbour),
    as a tool that resamples to `spacing` would write it."""
    old_size, old_spacing = np.array(mask.GetSize()), np.array(mask.GetSpacing())
    new_spacing = np.array(spacing, dtype=float)
    size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    # the same box: its corner (index -0.5) stays where it was
    corner = np.array(mask.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)))
    origin = corner + direction @ (new_spacing / 2)
    return sitk.Resample(mask, [int(s) for s in size], sitk.Transform(),
                         sitk.sitkNearestNeighbor, tuple(origin), tuple(new_spacing),
                         mask.GetDirection(), 0, mask.GetPixelID())


def reoriented(mask: sitk.Image, orientation: str) -> sitk.Image:
    """The same voxels in another orientation (e.g. "RAS" as a prone export writes it, "PIR"
    for a sagittal grid): the array permuted/flipped, the geometry changed to match."""
    return sitk.DICOMOrient(mask, orientation)


def shifted(mask: sitk.Image, offset_mm: tuple[float, float, float]) -> sitk.Image:
    """The same array with its origin moved by `offset_mm` (physical, LPS): a mask
    misregistered by that much (or exported with a half-voxel convention)."""
    moved = sitk.Image(mask)
    moved.SetOrigin(tuple(np.array(mask.GetOrigin()) + np.array(offset_mm)))
    return moved


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


# --------------------------------------------------------------------------- a site


def write_site(root: Path, patients: dict[str, str], *, site_id: str = "realistic",
               extra_config: dict | None = None) -> Path:
    """site.yaml and clinical.csv for `patients` ({patient_id: her2_ihc}); images are written
    by the builders above into images/<patient>/."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"site_id": site_id, "roles": ["train"], "time_unit": "days",
              "privacy": {"min_patients": 1, "min_cell_count": 1}, **(extra_config or {})}
    (root / "site.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    rows = [{"patient_id": p, "her2_ihc": ihc, "her2_ish": ""} for p, ihc in patients.items()]
    pd.DataFrame(rows).to_csv(root / "clinical.csv", index=False)
    return root


def copy_breast1(folder: Path) -> tuple[Path, Path]:
    """breast1's image and mask as the patient's mri.nrrd and mri_mask.nrrd."""
    image, mask = breast1()
    folder.mkdir(parents=True, exist_ok=True)
    return (Path(shutil.copy(image, folder / "mri.nrrd")),
            Path(shutil.copy(mask, folder / "mri_mask.nrrd")))


# The quirks of the realistic site: patient id -> what its image folder holds
QUIRKS = {
    "plain": "breast1 as pyradiomics ships it (NRRD, mask on the image grid)",
    "dicom": "DICOM series, rescale slope/intercept, reversed instance numbers",
    "resampled": "mask exported on a 1 mm isotropic grid",
    "subdivided": "mask exported on a grid that subdivides the image's (1/2, 1/2, 1/3)",
    "prone": "mask in RAS orientation (prone export)",
    "sagittal": "mask on a sagittal (PIR) grid",
    "half-voxel": "mask origin at its first voxel's corner (half a voxel off in-plane)",
    "labels12": "mask labelled 1 and 2",
    "misregistered": "mask shifted by 20 mm (refused)",
    "missing-slice": "DICOM series with a missing slice (refused)",
    "two-sources": "mri.nrrd beside a DICOM folder mri/ (refused)",
    "enhanced": "enhanced multi-frame MR file",
    "ultrasound": "breast1 MRI and pydicom's RGB ultrasound frame as us.png with a 0/255 mask",
}
REFUSED = ("misregistered", "missing-slice", "two-sources")


def realistic_site(root: Path, quirks: Iterable[str] = tuple(QUIRKS), *,
                   site_id: str = "realistic", her2_ihc: dict[str, str] | None = None,
                   prefix: str = "") -> Path:
    """A site folder with one patient per quirk (QUIRKS), each from breast1, its id
    `prefix` + quirk (a hospital's ids are not words: "RS-prone", not "prone", which the
    guard would find in the reasons a reply counts patients by); `her2_ihc` per quirk
    (default 3+). A study test writes its own clinical.csv over it."""
    image, mask = breast1_images()
    quirks = list(quirks)
    write_site(root, {prefix + q: (her2_ihc or {}).get(q, "3") for q in quirks},
               site_id=site_id)
    for quirk in quirks:
        folder = root / "images" / (prefix + quirk)
        folder.mkdir(parents=True, exist_ok=True)
        _write_quirk(quirk, folder, image, mask)
    return root


def labelled_12(mask: sitk.Image) -> sitk.Image:
    """The tumour with its upper slices labelled 2 (non-zero = tumour: both count)."""
    array = sitk.GetArrayFromImage(mask).astype(np.uint8)
    z = np.nonzero(array)[0]
    array[(array > 0) & (np.arange(array.shape[0])[:, None, None] >= int(np.median(z)))] = 2
    labelled = sitk.GetImageFromArray(array)
    labelled.CopyInformation(mask)
    return labelled


def _write_quirk(patient: str, folder: Path, image: sitk.Image, mask: sitk.Image) -> None:
    spacing = np.array(mask.GetSpacing())
    masks = {
        "resampled": lambda: on_grid(mask, (1.0, 1.0, 1.0)),
        "subdivided": lambda: on_grid(mask, tuple(spacing / (2, 2, 3))),
        "prone": lambda: reoriented(mask, "RAS"),
        "sagittal": lambda: reoriented(mask, "PIR"),
        "half-voxel": lambda: shifted(mask, (-spacing[0] / 2, -spacing[1] / 2, 0.0)),
        "labels12": lambda: labelled_12(mask),
        "misregistered": lambda: shifted(mask, (0.0, 0.0, 20.0)),
    }
    if patient in ("dicom", "missing-slice"):
        write_dicom_series(image, folder / "mri", reverse_instances=patient == "dicom",
                           missing=(image.GetSize()[2] // 2,) if patient == "missing-slice"
                           else ())
    elif patient == "enhanced":
        write_enhanced_mr(image, folder / "mri" / "EMR0001")
    else:
        write(image, folder / "mri.nrrd")
    if patient == "two-sources":
        write_dicom_series(image, folder / "mri")
    if patient == "ultrasound":
        write_ultrasound(folder)
    write(masks.get(patient, lambda: mask)(), folder / "mri_mask.nrrd")


# --------------------------------------------------------------------------- clinical.csv

# The clinical.csv format an Excel export declares (site.yaml `clinical_csv`)
EXCEL_FORMAT = {"separator": ";", "decimal": ","}


def excel_clinical(frame: pd.DataFrame, path: Path, *, na: str = "#N/A",
                   ihc_prefix: bool = True, capitalize: Iterable[str] = ()) -> Path:
    """`frame` written the way Excel writes clinical.csv in a comma-decimal locale: a UTF-8
    byte-order mark, `;` between fields, CRLF line ends, decimal commas (63,5), `na` for
    a missing value, her2_ihc as `IHC 2+` (`ihc_prefix`; else as the frame holds it), and
    the text columns in `capitalize` with their first letter upper-case on every other row
    (`Positive` beside `positive`)."""
    out = frame.copy().astype(object)
    for column in out.columns:
        if column == "her2_ihc" and ihc_prefix:
            out[column] = [na if _absent(v) else f"IHC {int(float(v))}" + ("+" if int(float(v))
                           else "") for v in out[column]]
            continue
        out[column] = [na if _absent(v) else _excel_cell(v) for v in out[column]]
    for column in capitalize:
        out[column] = [v.capitalize() if i % 2 and v != na else v
                       for i, v in enumerate(out[column])]
    text = out.to_csv(sep=";", index=False, lineterminator="\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return path


def _absent(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""


def _excel_cell(value: object) -> str:
    """A number with a decimal comma (integral floats without a fraction), text as it is."""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}".replace(".", ",") if float(value) != int(value) \
            else str(int(value))
    return str(value)


def excel_export(root: Path, frame: pd.DataFrame, **options: object) -> Path:
    """A site folder's clinical.csv replaced by `frame` as Excel exports it (excel_clinical,
    `options` passed on), with the format declared in its site.yaml (EXCEL_FORMAT)."""
    excel_clinical(frame, root / "clinical.csv", **options)  # type: ignore[arg-type]
    config = yaml.safe_load((root / "site.yaml").read_text(encoding="utf-8"))
    config["clinical_csv"] = dict(EXCEL_FORMAT)
    (root / "site.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return root
