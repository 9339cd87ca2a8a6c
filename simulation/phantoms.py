"""MRI and ultrasound phantoms of one patient, drawn from its image phenotype.

``appearance`` says what each phenotype does to the pixels (shared by both modalities).
``mri_phantom`` draws a DCE-MRI-like volume with reader-1 and reader-2 masks,
``ultrasound_phantom`` a B-mode-like image with its lesion mask; the site's scanner profile
is applied last.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from simulation.generative_model import (
    DEFAULT_IMAGE_SIZE,
    FOV_PER_TUMOUR,
    FOV_Z_FRACTION,
    MAX_RADIUS_FACTOR,
    REFERENCE_INPLANE_MM,
    TUMOUR_LEVEL,
    TUMOUR_SIZE_RANGE_MM,
    US_MM_PER_CLINICAL_MM,
    US_PIXEL_MM,
    US_SIZE_PX,
    ScannerProfile,
)


# ---------------------------------------------------------------------------------------
# phenotype -> appearance (shared by the MRI and the ultrasound phantom)
# ---------------------------------------------------------------------------------------
def appearance(pheno: dict[str, float]) -> dict[str, float]:
    """What each phenotype does to the pixels (see ``APPEARANCE``); monotone in each SD."""
    return {
        "enhancement": float(np.clip(np.exp(0.3 * pheno["enhancement"]), 0.35, 3.0)),
        "heterogeneity": float(np.clip(0.16 * np.exp(0.4 * pheno["heterogeneity"]), 0.03, 0.5)),
        "irregularity": float(1.0 / (1.0 + np.exp(-1.1 * pheno["irregularity"]))),
        "posterior": float(np.clip(-0.25 + 0.45 * pheno["posterior"], -0.85, 1.2)),
        "echogenicity": float(np.clip(0.15 * np.exp(0.35 * pheno["enhancement"]), 0.04, 0.6)),
    }


def mri_mm_per_clinical_mm(image_size: int) -> float:
    """MRI phantom diameter per clinical mm: the largest possible tumour (TUMOUR_SIZE_RANGE_MM
    top, most irregular margin) spans 1 / FOV_PER_TUMOUR of the in-plane FOV."""
    fov = image_size * REFERENCE_INPLANE_MM
    return fov / (FOV_PER_TUMOUR * MAX_RADIUS_FACTOR * TUMOUR_SIZE_RANGE_MM[1])


# ---------------------------------------------------------------------------------------
# MRI phantom
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tumour:
    center: np.ndarray  # mm, (x, y, z)
    rotation: np.ndarray  # 3x3, columns = tumour axes
    axes: np.ndarray  # semi-axes, mm
    lobe_dirs: np.ndarray  # (k, 3) unit
    lobe_weights: np.ndarray
    lobe_amplitude: float  # relative
    spicule_dirs: np.ndarray  # (m, 3) unit
    spicule_length_mm: float
    half_extent: np.ndarray  # mm, (x, y, z): the margin lies inside center +- half_extent


def mri_phantom(rng: np.random.Generator, scanner: ScannerProfile, pheno: dict[str, float],
                size_mm: float, image_size: int = DEFAULT_IMAGE_SIZE
                ) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """One DCE-MRI-like volume (int16) with reader-1 and reader-2 masks (uint8, same grid).

    The in-plane FOV is ``image_size * REFERENCE_INPLANE_MM`` at every site; the tumour sits
    at a random position inside it, in fibroglandular tissue surrounded by fat and gland.
    Everything tumour-related is computed in the tumour's bounding box only (speed)."""
    spacing = np.array([scanner.inplane_spacing_mm, scanner.inplane_spacing_mm,
                        scanner.slice_thickness_mm])
    shape_xyz = _mri_matrix(spacing, image_size)
    shape_zyx = shape_xyz[::-1]
    look = appearance(pheno)
    tumour = _tumour(rng, look, size_mm, mri_mm_per_clinical_mm(image_size), shape_xyz, spacing)
    box = _tumour_box(tumour, shape_xyz, spacing)
    coords = _mm_grid(shape_xyz, spacing, box)  # (x, y, z), broadcastable over the box
    inside = _tumour_margin(coords, tumour)  # mm, > 0 inside
    mask1_box = inside >= 0
    if not mask1_box.any():  # a tiny tumour between voxel centres: keep its nearest voxel
        mask1_box[tuple(i - s.start for i, s in
                        zip(_nearest_voxel(tumour.center, shape_xyz, spacing), box,
                            strict=True))] = True
    mask2_box = _reader2_mask(rng, coords, tumour, mask1_box, spacing)
    signal = _background(rng, shape_xyz, spacing, tumour)
    signal[box] = _add_tumour(rng, signal[box], inside, look, spacing)
    values = _apply_scanner(rng, signal, _mm_grid(shape_xyz, spacing), shape_xyz, spacing,
                            scanner)
    origin = np.array(scanner.origin_mm) + rng.uniform(-5.0, 5.0, 3)
    masks = []
    for part in (mask1_box, mask2_box):
        full = np.zeros(shape_zyx, np.uint8)
        full[box] = part
        masks.append(_to_sitk(full, spacing, origin))
    return _to_sitk(values.astype(np.int16), spacing, origin), masks[0], masks[1]


def _mri_matrix(spacing: np.ndarray, image_size: int) -> tuple[int, int, int]:
    """Voxel counts covering a fixed physical FOV (sites differ in matrix, not anatomy)."""
    fov = image_size * REFERENCE_INPLANE_MM
    nxy = max(16, round(fov / spacing[0]))
    nz = max(8, round(FOV_Z_FRACTION * fov / spacing[2]))
    return nxy, nxy, nz


def _axis_mm(n: int, step: float) -> np.ndarray:
    return (np.arange(n) - (n - 1) / 2) * step


def _mm_grid(shape_xyz: tuple[int, int, int], spacing: np.ndarray,
             box: tuple[slice, ...] | None = None) -> tuple[np.ndarray, ...]:
    """Voxel-centre coordinates (mm, FOV centre = 0) as (x, y, z) arrays broadcastable over
    (z, y, x), for the whole grid or the ``box`` (numpy order slices) of it."""
    axes = [_axis_mm(shape_xyz[i], spacing[i]) for i in range(3)]
    if box is not None:
        axes = [axes[i][box[2 - i]] for i in range(3)]
    x, y, z = axes
    return x[None, None, :], y[None, :, None], z[:, None, None]


def _unit_vectors(rng: np.random.Generator, k: int) -> np.ndarray:
    v = rng.standard_normal((k, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _tumour(rng: np.random.Generator, look: dict[str, float], size_mm: float, scale: float,
            shape_xyz: tuple[int, int, int], spacing: np.ndarray) -> _Tumour:
    """Ellipsoid with lobulated and spiculated margin, at a random place in the FOV."""
    irregular = look["irregularity"]
    semi = 0.5 * scale * size_mm
    axes = semi * np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.6, 0.95)])
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    lobe_amp = 0.04 + 0.21 * irregular  # <= 0.25
    spicule_len = (0.05 + 0.35 * irregular) * semi  # <= 0.4 semi: MAX_RADIUS_FACTOR 1.65
    n_spicules = 2 + round(14 * irregular)
    lobe_dirs, lobe_weights = _unit_vectors(rng, 5), rng.uniform(0.4, 1.0, 5)
    spicule_dirs = _unit_vectors(rng, n_spicules)
    # per-axis extent of the rotated ellipsoid, grown by the lobes, plus the spicules
    half = np.sqrt(((rotation * axes) ** 2).sum(axis=1)) * (1.0 + lobe_amp) + spicule_len
    reach = (np.array(shape_xyz) - 1) / 2 * spacing - half - spacing
    center = rng.uniform(-1.0, 1.0, 3) * np.maximum(reach, 0.0)
    return _Tumour(
        center=center, rotation=rotation, axes=axes, lobe_dirs=lobe_dirs,
        lobe_weights=lobe_weights, lobe_amplitude=lobe_amp, spicule_dirs=spicule_dirs,
        spicule_length_mm=spicule_len, half_extent=half,
    )


def _tumour_box(tumour: _Tumour, shape_xyz: tuple[int, int, int], spacing: np.ndarray
                ) -> tuple[slice, ...]:
    """Numpy-order slices of the voxels within the tumour's extent plus room for the soft
    edge and reader 2's boundary (2 voxels + 1 mm)."""
    n = np.array(shape_xyz)
    pad = tumour.half_extent + 2.0 * spacing + 1.0
    lo = np.floor((tumour.center - pad) / spacing + (n - 1) / 2).astype(int)
    hi = np.ceil((tumour.center + pad) / spacing + (n - 1) / 2).astype(int) + 1
    lo, hi = np.clip(lo, 0, n), np.clip(hi, 0, n)
    return tuple(slice(int(lo[i]), int(hi[i])) for i in (2, 1, 0))


def _local_directions(coords: tuple[np.ndarray, ...], tumour: _Tumour,
                      shift: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) from the tumour centre and unit direction in tumour axes, per voxel."""
    c = tumour.center if shift is None else tumour.center + shift
    d = [coords[i] - c[i] for i in range(3)]
    local = [sum(tumour.rotation[i, k] * d[i] for i in range(3)) for k in range(3)]
    r = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
    safe = np.maximum(r, 1e-6)
    u = np.stack([np.broadcast_to(v / safe, r.shape) for v in local], axis=-1)
    return r, u


def _bumps(u: np.ndarray, dirs: np.ndarray, kappa: float) -> np.ndarray:
    """von Mises bumps on the sphere, one per direction (..., k), peak 1."""
    return np.exp(kappa * (u @ dirs.T - 1.0))


def _boundary(u: np.ndarray, tumour: _Tumour) -> np.ndarray:
    """Radius (mm) of the tumour surface along direction u (tumour axes)."""
    ellipse = 1.0 / np.sqrt(((u / tumour.axes) ** 2).sum(axis=-1))
    lobes = np.minimum((_bumps(u, tumour.lobe_dirs, 5.0) * tumour.lobe_weights).sum(-1), 1.0)
    spikes = np.minimum(_bumps(u, tumour.spicule_dirs, 60.0).sum(-1), 1.0)
    return ellipse * (1.0 + tumour.lobe_amplitude * lobes) + tumour.spicule_length_mm * spikes


def _tumour_margin(coords: tuple[np.ndarray, ...], tumour: _Tumour) -> np.ndarray:
    r, u = _local_directions(coords, tumour)
    return _boundary(u, tumour) - r


def _reader2_mask(rng: np.random.Generator, coords: tuple[np.ndarray, ...], tumour: _Tumour,
                  mask1: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Reader 2: boundary moved ~1 voxel out in some parts and in elsewhere, slight shift."""
    patch_dirs = _unit_vectors(rng, 5)
    patch_sign = rng.normal(0.0, 1.0, 5)
    shift_unit = rng.normal(0.0, 1.0, 3) * np.array([0.35, 0.35, 0.2])
    amplitude = 0.9 * spacing[0]
    mask2 = mask1
    for _ in range(4):
        r, u = _local_directions(coords, tumour, shift=shift_unit * spacing)
        delta = amplitude * np.tanh((_bumps(u, patch_dirs, 3.0) * patch_sign).sum(-1))
        mask2 = (_boundary(u, tumour) + delta - r) >= 0
        if mask2.any() and not np.array_equal(mask2, mask1) and _dice(mask1, mask2) >= 0.75:
            return mask2
        amplitude *= 0.5
        shift_unit = shift_unit * 0.5
    if mask2.any() and not np.array_equal(mask2, mask1):
        return mask2
    return _one_voxel_edit(mask1)


def _one_voxel_edit(mask: np.ndarray) -> np.ndarray:
    """Smallest realistic disagreement: add the first outside neighbour of the boundary."""
    ring = ndimage.binary_dilation(mask) & ~mask
    out = mask.copy()
    out[tuple(np.argwhere(ring)[0])] = True
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 2.0 * float(np.logical_and(a, b).sum()) / float(total) if total else 1.0


def _nearest_voxel(center: np.ndarray, shape_xyz: tuple[int, int, int],
                   spacing: np.ndarray) -> tuple[int, int, int]:
    idx = [int(np.clip(round(center[i] / spacing[i] + (shape_xyz[i] - 1) / 2), 0,
                       shape_xyz[i] - 1)) for i in range(3)]
    return idx[2], idx[1], idx[0]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: np.ndarray
                  ) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(noise, sigma=sigma_vox, mode="reflect", truncate=3.0)
    return field / (field.std() + 1e-12)


def _coarse_field(rng: np.random.Generator, shape_zyx: tuple[int, ...],
                  spacing_zyx: np.ndarray, sigma_mm: float,
                  extra: Callable[[tuple[np.ndarray, ...]], np.ndarray] | None = None
                  ) -> np.ndarray:
    """Smooth random field (unit SD) drawn on a grid of sigma/2 mm spanning the same corners,
    plus ``extra(coarse coordinates)``, linearly interpolated to ``shape_zyx`` (fast)."""
    extent = (np.array(shape_zyx) - 1) * spacing_zyx
    coarse = tuple(int(max(2, min(n, math.ceil(e / (0.5 * sigma_mm)) + 1)))
                   for n, e in zip(shape_zyx, extent, strict=True))
    step = extent / np.maximum(np.array(coarse) - 1, 1)
    field = _smooth_field(rng, coarse, sigma_mm / np.maximum(step, 1e-6))
    if extra is not None:
        grid = [(np.arange(c) - (c - 1) / 2) * s for c, s in zip(coarse, step, strict=True)]
        field = field + extra((grid[0][:, None, None], grid[1][None, :, None],
                               grid[2][None, None, :]))
    wz, wy, wx = (_linear_weights(n, c) for n, c in zip(shape_zyx, coarse, strict=True))
    field = np.einsum("zc,cyx->zyx", wz, field.astype(np.float32))
    return np.matmul(np.matmul(wy, field), wx.T)


def _linear_weights(n: int, c: int) -> np.ndarray:
    """(n, c) matrix of linear interpolation from c to n samples spanning the same corners."""
    pos = np.arange(n) * (c - 1) / max(n - 1, 1)
    lo = np.minimum(np.floor(pos).astype(int), c - 2) if c > 1 else np.zeros(n, int)
    frac = pos - lo
    weights = np.zeros((n, c), np.float32)
    weights[np.arange(n), lo] = 1.0 - frac
    if c > 1:
        weights[np.arange(n), lo + 1] += frac
    return weights


def _background(rng: np.random.Generator, shape_xyz: tuple[int, int, int],
                spacing: np.ndarray, tumour: _Tumour) -> np.ndarray:
    """Fat (dark) and enhancing fibroglandular tissue; the tumour lies in a gland region
    (a bump of the gland field around it), the rest of the FOV is random fat/gland."""
    shape_zyx, spacing_zyx = shape_xyz[::-1], spacing[::-1]
    threshold = rng.uniform(-0.3, 0.5)
    bed_radius = 1.3 * float(tumour.axes.max()) + 6.0  # size only, not the margin
    c = tumour.center

    def tumour_bed(zyx: tuple[np.ndarray, ...]) -> np.ndarray:
        d2 = (zyx[2] - c[0]) ** 2 + (zyx[1] - c[1]) ** 2 + (zyx[0] - c[2]) ** 2
        return 2.0 * np.exp(-d2 / bed_radius**2)

    coarse = _coarse_field(rng, shape_zyx, spacing_zyx, 5.0, tumour_bed)
    fine = _smooth_field(rng, shape_zyx, 0.7 / spacing_zyx)
    gland = 1.0 / (1.0 + np.exp(-(coarse - threshold) / 0.15))
    gland_level = 0.45 * float(np.exp(rng.normal(0.0, 0.05)))  # background enhancement
    fat_level = 0.12
    signal = fat_level + (gland_level - fat_level) * gland + 0.06 * gland_level * gland * fine
    return (signal + 0.01 * fine).astype(np.float32)


def _add_tumour(rng: np.random.Generator, signal: np.ndarray, inside: np.ndarray,
                look: dict[str, float], spacing: np.ndarray) -> np.ndarray:
    """Enhancing tumour with heterogeneous (log-normal, mean-preserving) texture and a
    partial-volume edge, inside the tumour box."""
    h = look["heterogeneity"]
    texture = _smooth_field(rng, signal.shape, 0.9 / spacing[::-1])
    texture = np.exp(h * 1.5 * np.tanh(texture / 1.5))  # log-normal-like, bounded tails
    tumour = TUMOUR_LEVEL * look["enhancement"] * texture / texture.mean()
    soft = 1.0 / (1.0 + np.exp(-inside / (0.3 * spacing.min())))
    return (signal * (1.0 - soft) + tumour * soft).astype(np.float32)


def _apply_scanner(rng: np.random.Generator, signal: np.ndarray,
                   coords: tuple[np.ndarray, ...], shape_xyz: tuple[int, int, int],
                   spacing: np.ndarray, scanner: ScannerProfile) -> np.ndarray:
    """Smooth multiplicative bias, intensity scale and offset, Gaussian noise; int16 range."""
    half = np.array(shape_xyz) * spacing / 2
    direction = np.array(scanner.bias_direction) + rng.normal(0.0, 0.15, 3)
    direction /= np.linalg.norm(direction)
    linear = sum(direction[i] * coords[i] / half[i] for i in range(3))
    radial = (coords[0] / half[0]) ** 2 + (coords[1] / half[1]) ** 2 - 0.66
    bias = np.exp(scanner.bias_field_strength * (linear + 0.5 * radial)).astype(np.float32)
    noise = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(scanner.noise_sd)
    values = scanner.intensity_scale * (signal * bias + noise) + scanner.intensity_offset
    return np.clip(np.round(values), 0, 32767)


def _to_sitk(array_zyx: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(round(float(o), 3) for o in origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


# ---------------------------------------------------------------------------------------
# ultrasound phantom
# ---------------------------------------------------------------------------------------
def ultrasound_phantom(rng: np.random.Generator, scanner: ScannerProfile,
                       pheno: dict[str, float], size_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """US_SIZE_PX² B-mode-like image (uint8) and lesion mask (uint8, 0/255): skin, fat,
    gland, pectoral muscle; a hypoechoic lesion at a random place in the gland layer."""
    n = US_SIZE_PX
    depth = (np.arange(n)[:, None] + 0.5) * US_PIXEL_MM  # rows = depth, mm
    lateral = (np.arange(n)[None, :] - (n - 1) / 2) * US_PIXEL_MM
    look = appearance(pheno)
    echo, fat_end, gland_end = _us_tissue(rng, depth, lateral)
    margin, bottom, half_width, cx = _us_lesion_shape(rng, look, size_mm, depth, lateral,
                                                      fat_end, gland_end)
    mask = margin >= 0
    soft = 1.0 / (1.0 + np.exp(-margin / 0.4))
    hetero = 1.4 * look["heterogeneity"]
    texture = _smooth_field(rng, (n, n), np.array([1.5, 2.0]))
    inner = look["echogenicity"] * np.exp(hetero * texture - 0.5 * hetero * hetero)
    echo = echo * (1 - soft) + inner * soft
    below = np.clip((depth - bottom) / 2.0, 0.0, 1.0) * np.exp(-np.maximum(depth - bottom, 0) / 14)
    columns = np.exp(-(((lateral - cx) / max(half_width, 1.0)) ** 8))
    echo = echo * (1.0 + look["posterior"] * below * columns)
    return _us_render(rng, echo, depth, scanner), (mask * 255).astype(np.uint8)


def _us_tissue(rng: np.random.Generator, depth: np.ndarray, lateral: np.ndarray
               ) -> tuple[np.ndarray, float, float]:
    """Echo map of skin, subcutaneous fat, gland and muscle; (echo, fat end, gland end) mm."""
    n = depth.shape[0]
    smooth = _smooth_field(rng, (n, n), np.array([3.0, 8.0]))
    fat_mean = 8.0 + rng.uniform(-2.0, 3.0)
    gland_mean = 40.0 + rng.uniform(-4.0, 4.0)
    fat_end = fat_mean + 1.5 * np.sin(lateral / 9.0 + rng.uniform(0, 6))
    gland_end = gland_mean + 2.0 * smooth[:1, :]
    echo = np.where(depth < 1.5, 0.9, 0.0)
    echo = echo + np.where((depth >= 1.5) & (depth < fat_end), 0.22 + 0.06 * smooth, 0.0)
    echo = echo + np.where((depth >= fat_end) & (depth < gland_end), 0.70 + 0.12 * smooth, 0.0)
    muscle = 0.42 + 0.08 * np.sin(depth * 2 * np.pi / 1.6)
    wall = gland_end + 9.0
    echo = echo + np.where((depth >= gland_end) & (depth < wall), muscle, 0.0)
    echo = echo + np.where(depth >= wall, 0.12 + 0.03 * smooth, 0.0)
    return echo, fat_mean + 1.5, gland_mean - 2.0


def _us_lesion_shape(rng: np.random.Generator, look: dict[str, float], size_mm: float,
                     depth: np.ndarray, lateral: np.ndarray, fat_end: float, gland_end: float
                     ) -> tuple[np.ndarray, float, float, float]:
    """Signed margin (mm, > 0 inside), lesion bottom depth, half width, lateral centre."""
    irregular = look["irregularity"]
    fov = US_SIZE_PX * US_PIXEL_MM
    a = 0.5 * US_MM_PER_CLINICAL_MM * size_mm
    b = a * rng.uniform(0.55, 0.9)
    reach = 0.5 * fov - 1.5 * a - 2.0
    cx = rng.uniform(-1.0, 1.0) * max(reach, 0.0)
    top, deepest = max(fat_end + 0.3 * b, 1.3 * b + 3.0), min(gland_end, fov - 1.3 * b - 12.0)
    cz = rng.uniform(min(top, deepest), deepest)
    tilt = rng.uniform(-0.3, 0.3)
    dx, dz = lateral - cx, depth - cz
    lx = dx * np.cos(tilt) + dz * np.sin(tilt)
    lz = -dx * np.sin(tilt) + dz * np.cos(tilt)
    theta = np.arctan2(lz, lx)
    r = np.hypot(lx, lz)
    ellipse = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2)
    k = np.arange(2, 7)
    weights = rng.uniform(0.2, 1.0, k.size)
    lobes = (weights[:, None, None]
             * np.cos(k[:, None, None] * theta + rng.uniform(0, 2 * np.pi, k.size)[:, None, None]))
    lobulation = (0.04 + 0.12 * irregular) * lobes.sum(0) / weights.sum()  # |.| <= 0.16
    spike_angles = rng.uniform(-np.pi, np.pi, 2 + round(12 * irregular))
    spikes = np.exp(40.0 * (np.cos(theta[None] - spike_angles[:, None, None]) - 1.0)).sum(0)
    spike_len = (0.05 + 0.35 * irregular) * a
    boundary = ellipse * (1.0 + lobulation) + spike_len * np.minimum(spikes, 1.0)
    margin = boundary - r
    rows = np.flatnonzero((margin >= 0).any(axis=1))
    bottom = float(depth[rows[-1], 0]) if rows.size else cz + b
    return margin, bottom, a, cx


def _us_render(rng: np.random.Generator, echo: np.ndarray, depth: np.ndarray,
               scanner: ScannerProfile) -> np.ndarray:
    """Speckle (correlated Rayleigh), depth attenuation, log compression to 8 bits."""
    shape = echo.shape
    re = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0.8, 1.8))
    im = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0.8, 1.8))
    speckle = np.hypot(re, im)
    speckle /= speckle.mean()
    attenuation = np.exp(-0.012 * depth)
    amplitude = np.maximum(echo, 0.0) * speckle * attenuation * scanner.us_gain
    dr = scanner.us_dynamic_range
    compressed = np.log1p(dr * amplitude) / np.log1p(dr * 1.6)
    return np.clip(np.round(255.0 * compressed), 0, 255).astype(np.uint8)
