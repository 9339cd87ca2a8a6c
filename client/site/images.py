"""The image checks of a site folder (`feddlr check-site`, and `load_site` for the stages
that need images): each patient's image and masks found, read (headers only, or in full; a
DICOM series folder included) and checked by `client.site.image_pair`, the path every stage
uses: one source per image, readable and complete, right dimension, each mask on the
image's region (resampled from another grid in physical space, refused when elsewhere),
non-empty. Each problem is (file, message)."""

from __future__ import annotations

from pathlib import Path

from client.site.image_pair import (
    DIMENSION,
    IMAGE_NAMES,
    Grid,
    ImageRefused,
    find_image,
    flat,
    nifti_complete,
    on_image_grid,
    one_source,
    placement,
    read_grid,
    read_image,
    tumour,
)
from client.site.messages import shown_name, site_relative, tidy

IMAGES_DIR = "images"
__all__ = ["IMAGES_DIR", "IMAGE_NAMES", "find_image", "patient_image_problems"]


def patient_image_problems(
    root: Path, patient: str, needs: set[str], *, full_read: bool,
    mask_label: int | None = None, notes: list[tuple[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """(file, message) for every image problem of one patient under `needs`: the checks of
    `client.site.image_pair`, the same every stage applies. `notes` receives (file, note) for
    what is not a problem but done (a mask on another grid resampled)."""
    folder = root / IMAGES_DIR / patient
    where = f"{IMAGES_DIR}/{patient}/"
    if not folder.is_dir():
        return [(where, f"no image folder (needed for {', '.join(sorted(needs))})")]
    problems: list[tuple[str, str]] = []
    if needs & {"mri", "mri_r2"}:
        problems += _pair_problems(
            root, folder, "mri", "mri_mask", "MRI image", "reader-1 mask", full_read=full_read,
            dims=(3,), optional_mask="mri_mask_r2" if "mri_r2" in needs else None,
            label=mask_label, notes=notes,
        )
    if "us" in needs:
        problems += _pair_problems(
            root, folder, "us", "us_mask", "ultrasound image", "ultrasound mask",
            full_read=full_read, dims=(2,), label=mask_label, notes=notes,
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
    label: int | None = None,
    notes: list[tuple[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """An image and its mask(s): one source each, readable, right dimension, the mask on the
    image's region (client.site.image_pair), its tumour voxels non-empty."""
    problems: list[tuple[str, str]] = []

    def refused(error: ImageRefused, path: Path) -> None:
        shown = error.file if error.file is not None else path
        problems.append((site_relative(root, shown), tidy(str(error), root)))

    image_path = find_image(folder, image_kind)
    grid: Grid | None = None
    if image_path is None:
        names = ", ".join(n + ("/ (DICOM)" if n == "mri" else "") for n in IMAGE_NAMES[image_kind])
        problems.append(
            (site_relative(root, folder) + "/", f"missing {image_name} (one of {names})")
        )
    else:
        try:
            grid = _image_grid(image_path, full_read, dims)
        except ImageRefused as error:
            refused(error, image_path)
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
        try:
            note = _check_mask(path, grid, image_path, name, dims, label)
            if note is not None and notes is not None:
                notes.append((site_relative(root, path), f"{name} {note}"))
        except ImageRefused as error:
            refused(error, path)
    return problems


def _image_grid(path: Path, full: bool, dims: tuple[int, ...]) -> Grid:
    """The image's grid, after its checks: one source, readable (in full when `full`; a
    DICOM folder always), complete, of a dimension in `dims` (a one-slice volume is 2D)."""
    one_source(path)
    grid = Grid.of(read_image(path)) if full or path.is_dir() else read_grid(path)[0]
    nifti_complete(path, thorough=full)
    _check_dimension(grid, dims, path)
    return grid.flat() if 2 in dims else grid


def _check_mask(path: Path, grid: Grid | None, image_path: Path | None,
                name: str, dims: tuple[int, ...], label: int | None) -> str | None:
    """The mask's checks; how it is put on the image's grid (None: it is on it)."""
    one_source(path)
    mask = read_image(path)
    nifti_complete(path, thorough=True)
    _check_dimension(Grid.of(mask), dims, path)
    if 2 in dims:
        mask = flat(mask)
    binary = tumour(mask, label, path, name)
    if grid is None or image_path is None:
        return None
    on_image_grid(binary, grid, path, name, shown_name(image_path))
    return placement(Grid.of(binary), grid, path, name, shown_name(image_path))


def _check_dimension(grid: Grid, dims: tuple[int, ...], path: Path) -> None:
    dimension = grid.dimension
    if dimension == 3 and 2 in dims and grid.size[2] == 1:
        dimension = 2  # a single-slice volume is a 2D image
    if dimension not in dims:
        expected = " or ".join(f"{d}D" for d in dims)
        raise ImageRefused(DIMENSION, f"image is {grid.dimension}D; expected {expected}", path)
