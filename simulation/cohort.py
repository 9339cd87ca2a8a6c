"""Deterministic synthetic multi-site HER2 breast-cancer cohort (site folders per docs/SITE.md).

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

Two layouts (``design``): ``sites``, N numbered sites as above, and ``paper1``, paper 1's
three datasets (``PAPER1_SITES``: training centre, external centre, and a survival-only
cohort of HER2-negative patients whose scanner profile lies outside the strata, drawn from
``DEDICATED_SCANNER``); ``truth["design"]`` says which site plays which dataset.

Everything that generated the data is written to ``<out>/truth.json``; the pipeline never
reads it. The parameters live in ``simulation.generative_model``, the phantoms in
``simulation.phantoms``, the ceiling in ``simulation.ceiling``; this module draws the
sites and writes them, and re-exports their public names.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml
from PIL import Image

from shared.labels import her2_low_status, parse_ihc, parse_ish
from simulation.ceiling import (
    CEILING_TASKS,
    MRI_COLUMNS,
    attainable_auc,
    ceiling_truth,
    optimal_score,
)
from simulation.generative_model import (
    ACCRUAL_FOLLOW_UP_DAYS,
    APPEARANCE,
    CEILING_DRAWS,
    CEILING_SEED,
    CLINICAL_COLUMNS,
    COVARIATE_CODING,
    COX_COEFFICIENTS,
    DEDICATED_SCANNER,
    DEFAULT_IMAGE_SIZE,
    DESIGNS,
    DROPOUT_MEAN_DAYS,
    FOV_PER_TUMOUR,
    FOV_Z_FRACTION,
    GENERATOR,
    GENERATOR_VERSION,
    HER2_CLASSES,
    LOG_SIZE_SD,
    LOG_SIZE_SHIFTS,
    MAX_RADIUS_FACTOR,
    PAPER1_SITES,
    PHENOTYPE_SHIFTS,
    PHENOTYPES,
    REFERENCE_INPLANE_MM,
    SITE_PRIVACY,
    TUMOUR_LEVEL,
    TUMOUR_SIZE_RANGE_MM,
    US_MM_PER_CLINICAL_MM,
    US_PIXEL_MM,
    US_SIZE_PX,
    WEIBULL_SCALE_DAYS,
    WEIBULL_SHAPE,
    DesignSite,
    ScannerProfile,
    SiteDraw,
    SitePlan,
)
from simulation.phantoms import appearance, mri_mm_per_clinical_mm, mri_phantom, ultrasound_phantom
from simulation.truth import patient_truth, site_truth, truth_header, with_design

__all__ = [
    "ACCRUAL_FOLLOW_UP_DAYS", "APPEARANCE", "CEILING_DRAWS", "CEILING_SEED", "CEILING_TASKS",
    "CLINICAL_COLUMNS", "COVARIATE_CODING", "COX_COEFFICIENTS", "DEDICATED_SCANNER",
    "DEFAULT_IMAGE_SIZE", "DESIGNS", "DROPOUT_MEAN_DAYS", "FOV_PER_TUMOUR", "FOV_Z_FRACTION",
    "GENERATOR", "GENERATOR_VERSION", "HER2_CLASSES", "LOG_SIZE_SD", "LOG_SIZE_SHIFTS",
    "MAX_RADIUS_FACTOR", "MRI_COLUMNS", "PAPER1_SITES", "PHENOTYPES", "PHENOTYPE_SHIFTS",
    "REFERENCE_INPLANE_MM", "SITE_PRIVACY", "TUMOUR_LEVEL", "TUMOUR_SIZE_RANGE_MM",
    "US_MM_PER_CLINICAL_MM", "US_PIXEL_MM", "US_SIZE_PX", "WEIBULL_SCALE_DAYS", "WEIBULL_SHAPE",
    "DesignSite", "ScannerProfile", "SiteDraw", "SitePlan", "appearance", "attainable_auc",
    "cox_covariates", "her2_labels", "mri_mm_per_clinical_mm", "mri_phantom", "optimal_score",
    "simulate_cohort", "ultrasound_phantom"
]

# stream ids inside SeedSequence spawn keys (_PAPER1: that design's cohort-level draws)
_COHORT, _SITE, _PAPER1 = 0, 1, 2
_S_PROFILE, _S_CLINICAL, _S_SURVIVAL, _S_IMAGE = 0, 1, 2, 3


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
    design: str = "sites",
) -> dict[str, Any]:
    """Write ``out/<site_id>/`` folders (docs/SITE.md layout) and ``out/truth.json``.

    ``design="sites"``: ``n_sites`` sites ``site-<i>``, ``n_patients`` each (varied +-25 %,
    at least 20), all ``roles: [train, survival]`` but the last ``external_sites``, which
    get ``[external, survival]``. ``design="paper1"``: paper 1's three datasets
    (``PAPER1_SITES``): ``centre-1`` (training), ``centre-2`` (external validation) and
    ``centre-3`` (survival only, HER2-negative patients, a dedicated breast MRI system);
    ``n_sites`` must be 3 and ``external_sites`` 0 there. ``images=False`` writes only
    site.yaml and clinical.csv (the clinical rows are identical either way). Returns the
    truth dict.
    """
    _check_args(n_sites, n_patients, seed, effect_size, image_size, external_sites)
    _check_design(design, n_sites, external_sites)
    out = Path(out)
    _prepare_out(out)
    say = progress or (lambda _msg: None)
    if design == "paper1":
        plans = _plan_paper1(seed, n_patients)
    else:
        plans = _plan_sites(seed, n_sites, n_patients, external_sites)
    truth = truth_header(seed, n_sites, n_patients, effect_size, image_size, images)
    if design != "sites":  # the sites design's truth.json stays byte for byte as it was
        truth = with_design(truth, design, plans)
    draws = {}
    for plan in plans:
        draw = _draw_site(seed, plan, effect_size)
        site_dir = out / plan.site_id
        _write_site_yaml(site_dir, plan)
        draw.clinical.to_csv(site_dir / "clinical.csv", index=False)
        if images:
            _write_site_images(seed, plan, draw, site_dir, effect_size, image_size, say)
        say(f"{plan.site_id}: {plan.n_patients} patients written")
        truth["sites"][plan.site_id] = site_truth(plan, draw)
        truth["patients"].update(patient_truth(plan, draw))
        draws[plan.site_id] = (plan, draw)
    truth["ceiling"] = ceiling_truth(draws, effect_size)
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def her2_labels(clinical: pd.DataFrame) -> pd.Series:
    """ASCO/CAP 2018 class per row, by ``shared.labels``: 'positive', 'low', 'zero', or NaN
    (IHC2+ without ISH); LabelError for a value ``shared.labels`` rejects."""
    classes = [_her2_class(ihc, ish) for ihc, ish in
               zip(clinical["her2_ihc"], clinical["her2_ish"], strict=True)]
    return pd.Series(classes, index=clinical.index, dtype=object)


def _her2_class(ihc: object, ish: object) -> str | float:
    if parse_ihc(ihc) == 2 and parse_ish(ish) is None:
        return np.nan
    return her2_low_status(ihc, ish)


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


def _check_design(design: str, n_sites: int, external_sites: int) -> None:
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {', '.join(DESIGNS)}, got {design!r}")
    if design == "paper1" and (n_sites != len(PAPER1_SITES) or external_sites != 0):
        raise ValueError("design paper1 has its own three sites (centre-1 train, centre-2 "
                         "external, centre-3 survival): leave n_sites at 3 and "
                         "external_sites at 0")


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


def _plan_paper1(seed: int, n_patients: int) -> list[SitePlan]:
    """Paper 1's three datasets (``PAPER1_SITES``); centre-1 and centre-2 draw their scanners
    from the usual strata, centre-3 gets the dedicated breast MRI system."""
    rng = _rng(seed, _PAPER1)
    standard = iter(_scanner_profiles(rng, sum(not d.dedicated_scanner for d in PAPER1_SITES)))
    plans = []
    for i, site in enumerate(PAPER1_SITES):
        site_rng = _rng(seed, _SITE, i, _S_PROFILE)
        scanner = _dedicated_scanner(rng) if site.dedicated_scanner else next(standard)
        plans.append(SitePlan(
            index=i, site_id=site.site_id, n_patients=max(20, round(n_patients * site.size_factor)),
            roles=site.roles, scanner=scanner, prevalence=_design_prevalence(site_rng, site),
            shifts=_site_shifts(site_rng),
        ))
    return plans


def _design_prevalence(rng: np.random.Generator, site: DesignSite) -> dict[str, Any]:
    prevalence = _site_prevalence(rng)
    if site.her2_negative_only:  # every patient's HER2 status is known: no IHC2+ without ISH
        prevalence.update(her2_positive=0.0, ish_missing_fraction=0.0)
    return prevalence


def _dedicated_scanner(rng: np.random.Generator) -> ScannerProfile:
    def draw(key: str) -> float:
        return float(rng.uniform(*DEDICATED_SCANNER[key]))

    scale = round(draw("intensity_scale"), 1)
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    return ScannerProfile(
        name="synthetic-dedicated-breast-mri",
        inplane_spacing_mm=round(draw("inplane_spacing_mm"), 3),
        slice_thickness_mm=round(draw("slice_thickness_mm"), 2),
        intensity_scale=scale,
        intensity_offset=round(scale * draw("intensity_offset_fraction"), 1),
        noise_sd=round(draw("noise_sd"), 4),
        bias_field_strength=round(draw("bias_field_strength"), 3),
        bias_direction=tuple(round(float(v), 4) for v in direction),
        origin_mm=tuple(round(float(v), 2) for v in rng.uniform(-60.0, 60.0, 3)),
        us_gain=round(float(rng.uniform(0.85, 1.15)), 3),
        us_dynamic_range=round(float(rng.uniform(20.0, 60.0)), 1),
    )


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
    negative_only = plan.prevalence["her2_positive"] == 0
    for attempt in range(1000):
        rng = _rng(seed, _SITE, plan.index, _S_CLINICAL, attempt)
        cls, ihc = _draw_her2(rng, n, plan.prevalence)
        if _all_categories(cls, ihc, negative_only):
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


def _all_categories(cls: np.ndarray, ihc: np.ndarray, negative_only: bool = False) -> bool:
    """Every IHC score and both ISH results, with room for the ISH-missing patients (a
    HER2-negative-only site: IHC 0, 1+ and 2+/ISH-)."""
    counts = [np.sum(ihc == k) for k in range(4)]
    ish_pos = np.sum((ihc == 2) & (cls == "positive"))
    ish_neg = np.sum((ihc == 2) & (cls != "positive"))
    if negative_only:
        return min(counts[:3]) >= 1 and ish_neg >= 1
    return min(counts) >= 1 and ish_pos >= 1 and ish_neg >= 1 and counts[2] >= 3


def _draw_ish(rng: np.random.Generator, cls: np.ndarray, ihc: np.ndarray,
              missing_fraction: float) -> list[str]:
    ish = np.where(ihc == 2, np.where(cls == "positive", "positive", "negative"), "")
    if missing_fraction <= 0:
        return ish.tolist()
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
