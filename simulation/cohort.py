"""Deterministic synthetic multi-site HER2 breast-cancer cohort (site folders per DESIGN.md).

Generative model, per site and patient (all draws from numpy Generators seeded by
``SeedSequence(seed)`` spawn keys, so a seed fixes every byte of the arrays):

1. **Site.** Cohort size ``n_patients`` varied by up to +-25 % (at least 20), a scanner
   profile (in-plane spacing 0.6-1.0 mm, slice thickness 1-3 mm, intensity scale and offset,
   Gaussian noise, smooth multiplicative bias field, ultrasound gain/dynamic range) drawn
   from disjoint strata so sites differ clearly, a HER2-positive prevalence in 25-40 %, a
   HER2-low share among negatives in 55-65 %, and mild covariate shifts.
2. **HER2.** Latent class zero / low / positive, then IHC (positive: 3+ or 2+/ISH+; low:
   1+ or 2+/ISH-; zero: 0) and ISH for IHC2+. About 3 % of patients are IHC2+ with ISH left
   empty (excluded from HER2 tasks downstream, as in real registries).
3. **Covariates.** Age, HR status, Ki-67 and lesion type depend on the HER2 class as in the
   literature (HER2+: more HR-negative, higher Ki-67, more non-mass); tumour size depends on
   the class only through ``effect_size``.
4. **DFS.** Cox proportional hazards with a Weibull baseline,
   ``H(t | x) = (t / scale) ** shape * exp(beta . x)``, over the coded covariates in
   ``COVARIATE_CODING`` (``cox_covariates`` builds them from clinical.csv), censored by the
   minimum of administrative censoring (staggered accrual) and exponential drop-out.
5. **Images.** An image phenotype ``z = noise + effect_size * shift[class]`` (tumour
   heterogeneity, margin irregularity, enhancement, ultrasound posterior feature; SD 1) is the
   only class-dependent image signal besides tumour size; ``appearance`` / ``APPEARANCE`` say
   how each SD shows in the pixels. MRI: an in-plane FOV of ``image_size * 0.8`` mm (0.6 x
   that through-plane) of fat and enhancing fibroglandular tissue, with an ellipsoidal tumour
   (lobulated, spiculated margin; diameter ``mri_mm_per_clinical_mm(image_size) *
   tumour_size_mm``, so the largest possible tumour spans at most 1 / 2.5 of the in-plane FOV
   at every image size) at a uniformly random position, in a patch of gland. Tumour
   intensity is ``exp(0.3 z)`` times a fixed level (about 1.9 x the gland, +35 % per SD,
   well above the sites' scanner noise of 2-7 % of that level), texture inside it has a
   log-SD (about the coefficient of variation) of ``0.16 exp(0.4 z)``. Ultrasound
   (64 x 64 mm): skin, fat, gland and muscle with speckle, a hypoechoic lesion (echo
   ``0.15 exp(0.35 z_enhancement)``, textured, same margin model, at most about half the
   width) at a random lateral position and depth, shadowing or posterior enhancement below.
   ``effect_size = 0`` makes images independent of HER2. The site's scanner profile is
   applied last (spacing, intensity scale/offset, noise, bias field); placement, FOV and
   scaling never depend on the class. Reader 1's mask is the phantom's true extent; reader
   2's mask perturbs the boundary by about one voxel (outward in some parts, inward in
   others) and shifts it slightly.
6. **Ceiling.** ``truth["ceiling"]`` holds, per task (her2-positive: positive vs zero + low;
   her2-low: low vs zero; latent class, IHC2+ without ISH excluded), the AUC attainable from
   what generated the images (phenotype + log tumour size) with the Bayes-optimal score
   (``optimal_score``): the population value (``attainable_auc``, seeded Monte Carlo) and
   the sample value on the drawn patients, pooled and per site. her2-positive population
   ceiling by effect size: 0.5 -> 0.74, 1 (default) -> 0.90, 1.5 -> 0.97, 2 -> 0.99,
   3 -> 1.00; her2-low: 0.63, 0.75, 0.84, 0.91, 0.98.

Everything that generated the data is written to ``<out>/truth.json``; the pipeline never
reads it.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

GENERATOR = "feddlr.simulation.cohort"
GENERATOR_VERSION = 2

HER2_CLASSES: tuple[str, ...] = ("zero", "low", "positive")
CLINICAL_COLUMNS: tuple[str, ...] = (
    "patient_id", "her2_ihc", "her2_ish", "dfs_time", "dfs_event",
    "age", "tumour_size_mm", "hr_status", "ki67", "lesion_type",
)
SITE_PRIVACY: dict[str, Any] = {
    "min_patients": 10,
    "min_cell_count": 3,
    "time_bin": 30,
    "allow_event_queries": False,
    "max_feature_ratio": 0.33,
}

# --- survival truth ------------------------------------------------------------------------
# coded covariate = (value - center) / scale; HER2 dummies are against HER2-zero.
COVARIATE_CODING: dict[str, dict[str, Any]] = {
    "her2_positive": {"column": "her2_ihc/her2_ish", "definition": "IHC3+ or IHC2+/ISH+",
                      "center": 0.0, "scale": 1.0},
    "her2_low": {"column": "her2_ihc/her2_ish", "definition": "IHC1+ or IHC2+/ISH-",
                 "center": 0.0, "scale": 1.0},
    "tumour_size_mm": {"column": "tumour_size_mm", "definition": "per mm",
                       "center": 20.0, "scale": 1.0},
    "hr_positive": {"column": "hr_status", "definition": "hr_status == positive",
                    "center": 0.0, "scale": 1.0},
    "ki67_per10": {"column": "ki67", "definition": "per 10 percentage points",
                   "center": 20.0, "scale": 10.0},
    "age_per10": {"column": "age", "definition": "per 10 years", "center": 50.0, "scale": 10.0},
}
COX_COEFFICIENTS: dict[str, float] = {
    "her2_positive": 0.6,
    "her2_low": -0.5,
    "tumour_size_mm": 0.03,
    "hr_positive": -0.5,
    "ki67_per10": 0.15,
    "age_per10": 0.1,
}
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE_DAYS = 2500.0  # reference patient (all coded covariates 0)
ACCRUAL_FOLLOW_UP_DAYS = (730.0, 2920.0)  # administrative censoring ~ U(2 y, 8 y)
DROPOUT_MEAN_DAYS = 5475.0  # exponential loss to follow-up, mean 15 y

# --- image truth ---------------------------------------------------------------------------
PHENOTYPES: tuple[str, ...] = ("heterogeneity", "irregularity", "enhancement", "posterior")
# class shift in SD units of the patient-level phenotype noise, multiplied by effect_size.
PHENOTYPE_SHIFTS: dict[str, dict[str, float]] = {
    "zero": {"heterogeneity": 0.0, "irregularity": 0.6, "enhancement": 0.0, "posterior": 0.0},
    "low": {"heterogeneity": 0.5, "irregularity": 0.0, "enhancement": 0.4, "posterior": 0.3},
    "positive": {"heterogeneity": 0.8, "irregularity": 1.0, "enhancement": 1.6,
                 "posterior": 0.8},
}
LOG_SIZE_SHIFTS: dict[str, float] = {"zero": 0.0, "low": 0.05, "positive": 0.15}
LOG_SIZE_SD = 0.38  # patient-level SD of log tumour size
TUMOUR_SIZE_RANGE_MM = (10.0, 45.0)
# how each phenotype (z, in SD units) shows in the pixels; ``appearance`` implements it
APPEARANCE: dict[str, str] = {
    "enhancement": "MRI tumour intensity = TUMOUR_LEVEL * exp(0.3 z) (clip 0.35-3) over "
                   "fibroglandular tissue ~0.45 and fat 0.12, before the scanner: +35 % per SD",
    "heterogeneity": "MRI and US texture inside the tumour: log-normal (MRI: tails bounded "
                     "at 1.5 SD), log-SD 0.16 * exp(0.4 z) (clip 0.03-0.5; US x 1.4), "
                     "correlation ~1 mm; scanner noise is 0.02-0.07 of TUMOUR_LEVEL",
    "irregularity": "u = 1 / (1 + exp(-1.1 z)): MRI lobulation up to 0.04 + 0.21 u of the "
                    "radius and 2 + 14 u spicules of (0.05 + 0.35 u) x the semi-axis; US "
                    "lobulation up to 0.04 + 0.12 u and 2 + 12 u spicules of the same length",
    "posterior": "US echo below the lesion x (1 + p), p = -0.25 + 0.45 z (clip -0.85-1.2): "
                 "shadowing (p < 0) to posterior enhancement (p > 0)",
    "echogenicity": "US lesion echo 0.15 * exp(0.35 z_enhancement) (clip 0.04-0.6) vs gland "
                    "0.70 and fat 0.22: hypoechoic, brighter when enhancing",
}
TUMOUR_LEVEL = 0.85  # x exp(0.3 z): about 1.9 x the gland at z = 0
DEFAULT_IMAGE_SIZE = 96
REFERENCE_INPLANE_MM = 0.8  # MRI FOV in-plane = image_size x 0.8 mm at every site
FOV_Z_FRACTION = 0.6  # MRI FOV through-plane = 0.6 x the in-plane FOV
FOV_PER_TUMOUR = 2.5  # in-plane FOV / extent of the largest possible tumour
MAX_RADIUS_FACTOR = 1.65  # largest margin radius / semi-major axis (lobes 1.25 + spicules 0.4)
US_MM_PER_CLINICAL_MM = 0.5  # ultrasound lesion width per clinical mm
US_SIZE_PX = 128
US_PIXEL_MM = 0.5
CEILING_DRAWS = 200_000  # Monte Carlo draws per class for the population ceiling
CEILING_SEED = 20_240_607

# stream ids inside SeedSequence spawn keys
_COHORT, _SITE = 0, 1
_S_PROFILE, _S_CLINICAL, _S_SURVIVAL, _S_IMAGE = 0, 1, 2, 3


@dataclass(frozen=True)
class ScannerProfile:
    """One site's acquisition: MRI geometry and intensity, plus ultrasound settings."""

    name: str
    inplane_spacing_mm: float
    slice_thickness_mm: float
    intensity_scale: float
    intensity_offset: float
    noise_sd: float  # Gaussian, as a fraction of intensity_scale
    bias_field_strength: float  # log-amplitude of the smooth multiplicative field
    bias_direction: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    us_gain: float
    us_dynamic_range: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bias_direction"] = list(self.bias_direction)
        d["origin_mm"] = list(self.origin_mm)
        d["spacing_mm"] = [self.inplane_spacing_mm, self.inplane_spacing_mm,
                           self.slice_thickness_mm]
        return d


@dataclass(frozen=True)
class SitePlan:
    index: int
    site_id: str
    n_patients: int
    roles: tuple[str, ...]
    scanner: ScannerProfile
    prevalence: dict[str, Any]
    shifts: dict[str, float]


@dataclass
class SiteDraw:
    clinical: pd.DataFrame
    her2_class: np.ndarray
    phenotype: np.ndarray  # (n, len(PHENOTYPES))


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------
def simulate_cohort(
    out: Path,
    n_sites: int = 3,
    n_patients: int = 40,
    seed: int = 0,
    *,
    effect_size: float = 1.0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    progress: Callable[[str], None] | None = None,
    external_sites: int = 0,
    images: bool = True,
) -> dict[str, Any]:
    """Write ``out/<site_id>/`` folders (DESIGN.md layout) and ``out/truth.json``.

    ``n_patients`` is per site (varied +-25 %, at least 20). The last ``external_sites``
    sites get ``roles: [external, survival]``. ``images=False`` writes only site.yaml and
    clinical.csv (the clinical rows are identical either way). Returns the truth dict.
    """
    _check_args(n_sites, n_patients, seed, effect_size, image_size, external_sites)
    out = Path(out)
    _prepare_out(out)
    say = progress or (lambda _msg: None)
    plans = _plan_sites(seed, n_sites, n_patients, external_sites)
    truth = _truth_header(seed, n_sites, n_patients, effect_size, image_size, images)
    draws = {}
    for plan in plans:
        draw = _draw_site(seed, plan, effect_size)
        site_dir = out / plan.site_id
        _write_site_yaml(site_dir, plan)
        draw.clinical.to_csv(site_dir / "clinical.csv", index=False)
        if images:
            _write_site_images(seed, plan, draw, site_dir, effect_size, image_size, say)
        say(f"{plan.site_id}: {plan.n_patients} patients written")
        truth["sites"][plan.site_id] = _site_truth(plan, draw)
        truth["patients"].update(_patient_truth(plan, draw))
        draws[plan.site_id] = (plan, draw)
    truth["ceiling"] = _ceiling_truth(draws, effect_size)
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def her2_labels(clinical: pd.DataFrame) -> pd.Series:
    """ASCO/CAP 2018 class per row: 'positive', 'low', 'zero', or NaN (IHC2+ without ISH)."""
    ihc = clinical["her2_ihc"].astype(int)
    ish = clinical["her2_ish"].fillna("").astype(str).str.strip().str.lower()
    label = pd.Series(np.nan, index=clinical.index, dtype=object)
    label[ihc == 0] = "zero"
    label[ihc == 1] = "low"
    label[ihc == 3] = "positive"
    label[(ihc == 2) & (ish == "positive")] = "positive"
    label[(ihc == 2) & (ish == "negative")] = "low"
    return label


def cox_covariates(clinical: pd.DataFrame, her2_class: pd.Series | None = None) -> pd.DataFrame:
    """Coded covariates of the truth Cox model (columns = COX_COEFFICIENTS keys).

    HER2 comes from IHC/ISH (NaN for IHC2+ without ISH) unless ``her2_class`` (the latent
    class from truth.json) is given.
    """
    cls = her2_labels(clinical) if her2_class is None else her2_class
    raw = {
        "her2_positive": (cls == "positive").astype(float).where(cls.notna()),
        "her2_low": (cls == "low").astype(float).where(cls.notna()),
        "tumour_size_mm": clinical["tumour_size_mm"].astype(float),
        "hr_positive": (clinical["hr_status"] == "positive").astype(float),
        "ki67_per10": clinical["ki67"].astype(float),
        "age_per10": clinical["age"].astype(float),
    }
    coded = {
        name: (values - COVARIATE_CODING[name]["center"]) / COVARIATE_CODING[name]["scale"]
        for name, values in raw.items()
    }
    return pd.DataFrame(coded, index=clinical.index)


# ---------------------------------------------------------------------------------------
# arguments, output folder, seeds
# ---------------------------------------------------------------------------------------
def _check_args(n_sites: int, n_patients: int, seed: int, effect_size: float,
                image_size: int, external_sites: int) -> None:
    if int(n_sites) != n_sites or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    if int(n_patients) != n_patients or n_patients < 1:
        raise ValueError(f"n_patients must be an integer >= 1, got {n_patients!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not math.isfinite(effect_size) or effect_size < 0:
        raise ValueError(f"effect_size must be a finite number >= 0, got {effect_size!r}")
    if int(image_size) != image_size or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    if int(external_sites) != external_sites or not 0 <= external_sites < n_sites:
        raise ValueError(
            f"external_sites must be an integer in [0, n_sites - 1] = [0, {n_sites - 1}], "
            f"got {external_sites!r} (at least one site must train)"
        )


def _prepare_out(out: Path) -> None:
    """Create ``out``; wipe it only if it is empty or holds a previous cohort."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "truth.json").is_file():
            raise ValueError(
                f"output folder {out} is not empty and holds no previous synthetic cohort "
                "(no truth.json); refusing to overwrite it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Generator for a spawn path: equals ``SeedSequence(seed).spawn(..)[k1].spawn(..)[k2]``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(key)))


def _strata(rng: np.random.Generator, k: int, lo: float, hi: float) -> np.ndarray:
    """One value per site from disjoint strata of [lo, hi] in random order (sites differ)."""
    order = rng.permutation(k)
    jitter = rng.uniform(0.35, 0.65, size=k)
    return lo + (hi - lo) * (order + jitter) / k


# ---------------------------------------------------------------------------------------
# site plans
# ---------------------------------------------------------------------------------------
def _plan_sites(seed: int, n_sites: int, n_patients: int, external: int) -> list[SitePlan]:
    rng = _rng(seed, _COHORT)
    factors = rng.permutation(np.linspace(-0.25, 0.25, n_sites)) if n_sites > 1 else [0.0]
    sizes = [max(20, round(n_patients * (1.0 + f))) for f in factors]
    profiles = _scanner_profiles(rng, n_sites)
    plans = []
    for i in range(n_sites):
        site_rng = _rng(seed, _SITE, i, _S_PROFILE)
        roles = ("external", "survival") if i >= n_sites - external else ("train", "survival")
        plans.append(SitePlan(
            index=i, site_id=f"site-{i + 1}", n_patients=int(sizes[i]), roles=roles,
            scanner=profiles[i], prevalence=_site_prevalence(site_rng),
            shifts=_site_shifts(site_rng),
        ))
    return plans


def _scanner_profiles(rng: np.random.Generator, k: int) -> list[ScannerProfile]:
    inplane = _strata(rng, k, 0.6, 1.0)
    thickness = _strata(rng, k, 1.0, 3.0)
    log_scale = _strata(rng, k, math.log(300.0), math.log(3000.0))
    noise = _strata(rng, k, 0.02, 0.07)
    bias = _strata(rng, k, 0.1, 0.45)
    profiles = []
    for i in range(k):
        scale = round(float(np.exp(log_scale[i])), 1)
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        profiles.append(ScannerProfile(
            name=f"synthetic-scanner-{chr(ord('A') + i % 26)}{i // 26 or ''}",
            inplane_spacing_mm=round(float(inplane[i]), 3),
            slice_thickness_mm=round(float(thickness[i]), 2),
            intensity_scale=scale,
            intensity_offset=round(scale * float(rng.uniform(0.0, 0.15)), 1),
            noise_sd=round(float(noise[i]), 4),
            bias_field_strength=round(float(bias[i]), 3),
            bias_direction=tuple(round(float(v), 4) for v in direction),
            origin_mm=tuple(round(float(v), 2) for v in rng.uniform(-60.0, 60.0, 3)),
            us_gain=round(float(rng.uniform(0.85, 1.15)), 3),
            us_dynamic_range=round(float(rng.uniform(20.0, 60.0)), 1),
        ))
    return profiles


def _site_prevalence(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "her2_positive": round(float(rng.uniform(0.25, 0.40)), 4),
        "her2_low_among_negative": round(float(rng.uniform(0.55, 0.65)), 4),
        "ihc3_among_positive": 0.72,
        "ihc1_among_low": 0.62,
        "ish_missing_fraction": 0.03,
        "hr_positive": {"zero": 0.68, "low": 0.85, "positive": 0.5},
        "non_mass": {"zero": 0.22, "low": 0.22, "positive": 0.36},
        "ki67_mean_percent": {"zero": 24.0, "low": 20.0, "positive": 36.0},
    }


def _site_shifts(rng: np.random.Generator) -> dict[str, float]:
    return {
        "age_years": round(float(rng.uniform(-3.0, 3.0)), 3),
        "hr_positive_probability": round(float(rng.uniform(-0.05, 0.05)), 4),
        "ki67_factor": round(float(rng.uniform(0.9, 1.1)), 4),
        "log_tumour_size": round(float(rng.uniform(-0.08, 0.08)), 4),
        "non_mass_probability": round(float(rng.uniform(-0.03, 0.03)), 4),
    }


# ---------------------------------------------------------------------------------------
# clinical rows
# ---------------------------------------------------------------------------------------
def _draw_site(seed: int, plan: SitePlan, effect_size: float) -> SiteDraw:
    n = plan.n_patients
    for attempt in range(1000):
        rng = _rng(seed, _SITE, plan.index, _S_CLINICAL, attempt)
        cls, ihc = _draw_her2(rng, n, plan.prevalence)
        if _all_categories(cls, ihc):
            break
    else:  # pragma: no cover - needs n >= 20 and ~1e-100 bad luck
        raise RuntimeError(f"{plan.site_id}: could not draw every HER2 category")
    ish = _draw_ish(rng, cls, ihc, plan.prevalence["ish_missing_fraction"])
    covariates = _draw_covariates(rng, cls, plan, effect_size)
    phenotype = rng.standard_normal((n, len(PHENOTYPES)))
    phenotype += effect_size * np.array([[PHENOTYPE_SHIFTS[c][p] for p in PHENOTYPES]
                                         for c in cls])
    clinical = pd.DataFrame({
        "patient_id": [f"s{plan.index + 1}-p{j + 1:04d}" for j in range(n)],
        "her2_ihc": ihc,
        "her2_ish": ish,
        **covariates,
    })
    time, event = _draw_survival(_rng(seed, _SITE, plan.index, _S_SURVIVAL),
                                 clinical, pd.Series(cls, index=clinical.index))
    clinical.insert(3, "dfs_time", time)
    clinical.insert(4, "dfs_event", event)
    return SiteDraw(clinical=clinical[list(CLINICAL_COLUMNS)], her2_class=cls,
                    phenotype=phenotype)


def _draw_her2(rng: np.random.Generator, n: int,
               prev: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    u = rng.random(n)
    p_pos = prev["her2_positive"]
    p_low = (1.0 - p_pos) * prev["her2_low_among_negative"]
    cls = np.where(u < p_pos, "positive", np.where(u < p_pos + p_low, "low", "zero"))
    v = rng.random(n)
    ihc = np.select(
        [cls == "positive", cls == "low"],
        [np.where(v < prev["ihc3_among_positive"], 3, 2),
         np.where(v < prev["ihc1_among_low"], 1, 2)],
        default=0,
    ).astype(int)
    return cls, ihc


def _all_categories(cls: np.ndarray, ihc: np.ndarray) -> bool:
    """Every IHC score and both ISH results, with room for the ISH-missing patients."""
    counts = [np.sum(ihc == k) for k in range(4)]
    ish_pos = np.sum((ihc == 2) & (cls == "positive"))
    ish_neg = np.sum((ihc == 2) & (cls != "positive"))
    return min(counts) >= 1 and ish_pos >= 1 and ish_neg >= 1 and counts[2] >= 3


def _draw_ish(rng: np.random.Generator, cls: np.ndarray, ihc: np.ndarray,
              missing_fraction: float) -> list[str]:
    ish = np.where(ihc == 2, np.where(cls == "positive", "positive", "negative"), "")
    pos = np.flatnonzero((ihc == 2) & (cls == "positive"))
    neg = np.flatnonzero((ihc == 2) & (cls != "positive"))
    keep = {int(rng.choice(pos)), int(rng.choice(neg))}  # both ISH results stay present
    candidates = [i for i in np.flatnonzero(ihc == 2) if i not in keep]
    k = min(len(candidates), max(1, round(missing_fraction * len(cls))))
    for i in rng.choice(candidates, size=k, replace=False):
        ish[i] = ""
    return ish.tolist()


def _draw_covariates(rng: np.random.Generator, cls: np.ndarray, plan: SitePlan,
                     effect_size: float) -> dict[str, np.ndarray]:
    n, prev, shift = len(cls), plan.prevalence, plan.shifts
    pos = cls == "positive"
    age = rng.normal(53.0 + shift["age_years"] - 2.0 * pos, 11.0)
    age = np.clip(np.round(age), 26, 88).astype(int)
    p_hr = np.array([prev["hr_positive"][c] for c in cls]) + shift["hr_positive_probability"]
    hr_pos = rng.random(n) < np.clip(p_hr, 0.02, 0.98)
    ki_mean = np.array([prev["ki67_mean_percent"][c] for c in cls]) * shift["ki67_factor"]
    ki_mean = np.clip((ki_mean + 10.0 * ~hr_pos) / 100.0, 0.03, 0.9)
    ki67 = rng.beta(ki_mean * 6.0, (1.0 - ki_mean) * 6.0) * 100.0
    ki67 = np.clip(np.round(ki67), 1, 95).astype(int)
    log_size = (math.log(20.0) + shift["log_tumour_size"]
                + effect_size * np.array([LOG_SIZE_SHIFTS[c] for c in cls])
                + rng.normal(0.0, LOG_SIZE_SD, n))
    size = np.clip(np.round(np.exp(log_size)), *TUMOUR_SIZE_RANGE_MM).astype(int)
    p_nm = np.array([prev["non_mass"][c] for c in cls]) + shift["non_mass_probability"]
    non_mass = rng.random(n) < p_nm
    return {
        "age": age,
        "tumour_size_mm": size,
        "hr_status": np.where(hr_pos, "positive", "negative"),
        "ki67": ki67,
        "lesion_type": np.where(non_mass, "non-mass", "mass"),
    }


def _draw_survival(rng: np.random.Generator, clinical: pd.DataFrame,
                   her2_class: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Weibull-Cox event times, censored by accrual (administrative) and drop-out."""
    x = cox_covariates(clinical, her2_class)
    lp = x[list(COX_COEFFICIENTS)].to_numpy() @ np.array(list(COX_COEFFICIENTS.values()))
    n = len(clinical)
    t_event = WEIBULL_SCALE_DAYS * (rng.exponential(1.0, n) * np.exp(-lp)) ** (1 / WEIBULL_SHAPE)
    admin = rng.uniform(*ACCRUAL_FOLLOW_UP_DAYS, n)
    dropout = rng.exponential(DROPOUT_MEAN_DAYS, n)
    censor = np.minimum(admin, dropout)
    event = (t_event <= censor).astype(int)
    time = np.maximum(1, np.ceil(np.minimum(t_event, censor))).astype(int)
    return time, event


# ---------------------------------------------------------------------------------------
# site files
# ---------------------------------------------------------------------------------------
def _write_site_yaml(site_dir: Path, plan: SitePlan) -> None:
    site_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "site_id": plan.site_id,
        "roles": list(plan.roles),
        "time_unit": "days",
        "privacy": dict(SITE_PRIVACY),
        "scanner": {"note": "synthetic acquisition profile (informational)",
                    **plan.scanner.to_dict()},
    }
    (site_dir / "site.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _write_site_images(seed: int, plan: SitePlan, draw: SiteDraw, site_dir: Path,
                       effect_size: float, image_size: int,
                       say: Callable[[str], None]) -> None:
    clinical = draw.clinical
    for j, pid in enumerate(clinical["patient_id"]):
        rng = _rng(seed, _SITE, plan.index, _S_IMAGE, j)
        pheno = dict(zip(PHENOTYPES, draw.phenotype[j], strict=True))
        size_mm = float(clinical["tumour_size_mm"].iloc[j])
        folder = site_dir / "images" / pid
        folder.mkdir(parents=True, exist_ok=True)
        image, mask1, mask2 = mri_phantom(rng, plan.scanner, pheno, size_mm, image_size)
        sitk.WriteImage(image, str(folder / "mri.nii.gz"), True)
        sitk.WriteImage(mask1, str(folder / "mri_mask.nii.gz"), True)
        sitk.WriteImage(mask2, str(folder / "mri_mask_r2.nii.gz"), True)
        us, us_mask = ultrasound_phantom(rng, plan.scanner, pheno, size_mm)
        Image.fromarray(us, mode="L").save(folder / "us.png")
        Image.fromarray(us_mask, mode="L").save(folder / "us_mask.png")
        say(f"{plan.site_id}: patient {j + 1}/{len(clinical)} ({pid})")


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

# ---------------------------------------------------------------------------------------
# attainable AUC (ceiling)
# ---------------------------------------------------------------------------------------
CEILING_TASKS: tuple[str, ...] = ("her2-positive", "her2-low")


def _class_means(effect_size: float) -> dict[str, np.ndarray]:
    """Mean of the ceiling features (phenotype, standardized log tumour size) per class."""
    return {c: effect_size * np.array([*(PHENOTYPE_SHIFTS[c][p] for p in PHENOTYPES),
                                       LOG_SIZE_SHIFTS[c] / LOG_SIZE_SD])
            for c in HER2_CLASSES}


# ceiling features an MRI shows: every phenotype but the ultrasound's posterior feature,
# and the tumour size (columns of `_class_means`)
MRI_COLUMNS = (*(i for i, p in enumerate(PHENOTYPES) if p != "posterior"), len(PHENOTYPES))


def optimal_score(x: np.ndarray, task: str, effect_size: float, low_share: float,
                  columns: tuple[int, ...] | None = None) -> np.ndarray:
    """Bayes-optimal score (log-likelihood ratio) of the generating Gaussian model for
    ``x`` = (phenotype, (log tumour size - site mean) / LOG_SIZE_SD), rows = patients.

    her2-positive: positive vs the zero/low mixture with ``low_share`` low; her2-low: low
    vs zero. Identity covariance, class means ``effect_size`` x the shifts. ``columns``:
    the features one modality shows (identity covariance: the others marginalize out)."""
    means = _class_means(effect_size)
    if columns is not None:
        x = x[..., list(columns)]
        means = {c: m[list(columns)] for c, m in means.items()}
    ll = {c: -0.5 * ((x - m) ** 2).sum(axis=-1) for c, m in means.items()}
    if task == "her2-low":
        return ll["low"] - ll["zero"]
    if task != "her2-positive":
        raise ValueError(f"task must be one of {CEILING_TASKS}, got {task!r}")
    q = min(max(low_share, 1e-12), 1 - 1e-12)
    return ll["positive"] - np.logaddexp(ll["zero"] + math.log(1 - q), ll["low"] + math.log(q))


def attainable_auc(effect_size: float, low_share: float = 0.6, draws: int = CEILING_DRAWS,
                   seed: int = CEILING_SEED,
                   columns: tuple[int, ...] | None = None) -> dict[str, float]:
    """Population ceiling per task: AUC (scikit-learn) of ``optimal_score`` on a seeded
    Monte Carlo draw of ``draws`` patients per class (negatives of her2-positive: zero/low
    at ``low_share``). Depends only on the arguments; 0.5 at effect size 0."""
    rng = np.random.default_rng(seed)
    means = _class_means(effect_size)
    k = len(PHENOTYPES) + 1
    pos = means["positive"] + rng.standard_normal((draws, k))
    is_low = rng.random(draws) < low_share
    neg = np.where(is_low[:, None], means["low"], means["zero"]) + rng.standard_normal((draws, k))
    low = means["low"] + rng.standard_normal((draws, k))
    zero = means["zero"] + rng.standard_normal((draws, k))
    y = np.r_[np.ones(draws), np.zeros(draws)]
    return {
        "her2-positive": float(roc_auc_score(y, optimal_score(
            np.vstack([pos, neg]), "her2-positive", effect_size, low_share, columns))),
        "her2-low": float(roc_auc_score(y, optimal_score(
            np.vstack([low, zero]), "her2-low", effect_size, low_share, columns))),
    }


def _ceiling_features(plan: SitePlan, draw: SiteDraw) -> np.ndarray:
    size = draw.clinical["tumour_size_mm"].to_numpy(float)
    log_size = (np.log(size) - math.log(20.0) - plan.shifts["log_tumour_size"]) / LOG_SIZE_SD
    return np.column_stack([draw.phenotype, log_size])


def _sample_auc(task: str, cls: np.ndarray, known: np.ndarray, score: np.ndarray
                ) -> float | None:
    keep = known & (cls != "positive") if task == "her2-low" else known
    y = cls[keep] == ("low" if task == "her2-low" else "positive")
    if y.all() or not y.any():
        return None
    return round(float(roc_auc_score(y, score[keep])), 4)


def _ceiling_truth(draws: dict[str, tuple[SitePlan, SiteDraw]], effect_size: float
                   ) -> dict[str, Any]:
    low_share = float(np.mean([plan.prevalence["her2_low_among_negative"]
                               for plan, _ in draws.values()]))
    population = attainable_auc(effect_size, low_share)
    mri = attainable_auc(effect_size, low_share, columns=MRI_COLUMNS)
    out: dict[str, Any] = {}
    for task in CEILING_TASKS:
        parts = []
        for plan, draw in draws.values():
            cl = draw.clinical
            known = ~((cl["her2_ihc"] == 2) & (cl["her2_ish"] == "")).to_numpy()
            x = _ceiling_features(plan, draw)
            parts.append((plan.site_id, draw.her2_class, known,
                          optimal_score(x, task, effect_size, low_share),
                          optimal_score(x, task, effect_size, low_share, MRI_COLUMNS)))
        pooled = [np.concatenate([p[i] for p in parts]) for i in (1, 2, 3, 4)]
        out[task] = {
            "population": round(population[task], 4),
            "sample": _sample_auc(task, *pooled[:3]),
            "sites": {site: _sample_auc(task, cls, known, score)
                      for site, cls, known, score, _ in parts},
            "mri": {"population": round(mri[task], 4),
                    "sample": _sample_auc(task, pooled[0], pooled[1], pooled[3])},
        }
    out["low_share_among_negative"] = round(low_share, 4)
    out["method"] = (
        "AUC (sklearn roc_auc_score) of the Bayes-optimal score, the log-likelihood ratio of "
        "the generating Gaussian model: features = the 4 phenotypes and (log tumour size - "
        "log 20 mm - site shift) / LOG_SIZE_SD, identity covariance, class means effect_size "
        "x (PHENOTYPE_SHIFTS, LOG_SIZE_SHIFTS / LOG_SIZE_SD); her2-positive = positive vs the "
        "zero/low mixture at the cohort's mean low share among negatives, her2-low = low vs "
        "zero among negatives; latent class, IHC2+ without ISH excluded. population: "
        f"seeded Monte Carlo, {CEILING_DRAWS} draws per class (seed {CEILING_SEED}); "
        "sample: the drawn patients (clinical tumour size, rounded and clipped), pooled and "
        "per site (null where a site lacks a class). mri: the same without the ultrasound's "
        "posterior feature, the ceiling of a model that sees only the MRI."
    )
    return out


# ---------------------------------------------------------------------------------------
# truth.json
# ---------------------------------------------------------------------------------------
def _truth_header(seed: int, n_sites: int, n_patients: int, effect_size: float,
                  image_size: int, images: bool) -> dict[str, Any]:
    fov = image_size * REFERENCE_INPLANE_MM
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "n_sites": int(n_sites),
        "n_patients_requested": int(n_patients),
        "effect_size": float(effect_size),
        "image_size": int(image_size),
        "images": bool(images),
        "labels": "ASCO/CAP 2018: positive = IHC3+ or IHC2+/ISH+; low = IHC1+ or "
                  "IHC2+/ISH-; zero = IHC0; IHC2+ without ISH excluded",
        "survival": {
            "model": "cox_weibull",
            "time_unit": "days",
            "coefficients": dict(COX_COEFFICIENTS),
            "covariate_coding": COVARIATE_CODING,
            "baseline": {
                "distribution": "weibull",
                "shape": WEIBULL_SHAPE,
                "scale_days": WEIBULL_SCALE_DAYS,
                "cumulative_hazard": "H0(t) = (t / scale_days) ** shape at coded x = 0",
            },
            "censoring": {
                "administrative_days_uniform": list(ACCRUAL_FOLLOW_UP_DAYS),
                "dropout_exponential_mean_days": DROPOUT_MEAN_DAYS,
                "time_rounding": "ceil to whole days, at least 1",
            },
        },
        "image_model": {
            "phenotypes": list(PHENOTYPES),
            "phenotype_noise_sd": 1.0,
            "phenotype_shifts": PHENOTYPE_SHIFTS,
            "log_tumour_size_shifts": LOG_SIZE_SHIFTS,
            "shift_multiplier": "effect_size",
            "log_tumour_size_sd": LOG_SIZE_SD,
            "appearance": APPEARANCE,
            "mri_mm_per_clinical_mm": round(mri_mm_per_clinical_mm(image_size), 6),
            "mri_fov_mm": [round(fov, 3), round(fov, 3), round(FOV_Z_FRACTION * fov, 3)],
            "mri_fov_per_largest_tumour": FOV_PER_TUMOUR,
            "mri_tumour_placement": "uniform over the FOV where the whole margin fits",
            "us_mm_per_clinical_mm": US_MM_PER_CLINICAL_MM,
            "us_pixel_mm": US_PIXEL_MM,
            "us_fov_mm": [US_SIZE_PX * US_PIXEL_MM, US_SIZE_PX * US_PIXEL_MM],
        },
        "sites": {},
        "patients": {},
    }


def _site_truth(plan: SitePlan, draw: SiteDraw) -> dict[str, Any]:
    cl = draw.clinical
    cls = draw.her2_class
    return {
        "n_patients": plan.n_patients,
        "roles": list(plan.roles),
        "scanner": plan.scanner.to_dict(),
        "prevalence": plan.prevalence,
        "covariate_shifts": plan.shifts,
        "observed": {
            "her2_class": {c: int(np.sum(cls == c)) for c in HER2_CLASSES},
            "her2_ihc": {str(k): int(np.sum(cl["her2_ihc"] == k)) for k in range(4)},
            "ish_missing": int(np.sum((cl["her2_ihc"] == 2) & (cl["her2_ish"] == ""))),
            "events": int(cl["dfs_event"].sum()),
        },
    }


def _patient_truth(plan: SitePlan, draw: SiteDraw) -> dict[str, dict[str, Any]]:
    return {
        pid: {
            "site_id": plan.site_id,
            "her2_class": str(draw.her2_class[j]),
            "phenotype": {p: round(float(v), 5) for p, v in zip(PHENOTYPES, draw.phenotype[j],
                                                                strict=True)},
        }
        for j, pid in enumerate(draw.clinical["patient_id"])
    }
