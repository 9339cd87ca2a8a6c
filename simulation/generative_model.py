"""The synthetic cohort's generative model: its fixed parameters and the records a run draws.

Survival truth (the Cox-Weibull model and its censoring), image truth (phenotypes, their
HER2-class shifts, how they show in the pixels, MRI and ultrasound geometry), the ceiling's
Monte Carlo settings, and the per-site records ``ScannerProfile``, ``SitePlan`` and
``SiteDraw``. ``simulation.cohort`` describes the model as a whole and draws from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

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

# --- study designs -------------------------------------------------------------------------
DESIGNS: tuple[str, ...] = ("sites", "paper1")
# paper 1's Dataset 3 was imaged on a special breast MRI system: its profile lies outside
# the ranges every other site's strata cover (in-plane 0.6-1.0 mm, slices 1-3 mm,
# intensity scale 300-3000, offset 0-15 % of the scale); noise and bias as the others.
DEDICATED_SCANNER: dict[str, tuple[float, float]] = {
    "inplane_spacing_mm": (1.1, 1.3),
    "slice_thickness_mm": (0.6, 0.8),
    "intensity_scale": (4000.0, 5000.0),
    "intensity_offset_fraction": (0.2, 0.3),
    "noise_sd": (0.02, 0.07),
    "bias_field_strength": (0.1, 0.45),
}


@dataclass(frozen=True)
class DesignSite:
    """One site of a fixed study design (``PAPER1_SITES``)."""

    site_id: str
    roles: tuple[str, ...]
    size_factor: float  # x --patients (at least 20)
    her2_negative_only: bool
    dedicated_scanner: bool
    plays: str


PAPER1_SITES: tuple[DesignSite, ...] = (
    DesignSite("centre-1", ("train", "survival"), 1.25, False, False,
               "paper 1's Dataset 1 (Centre 1): training"),
    DesignSite("centre-2", ("external", "survival"), 1.0, False, False,
               "paper 1's Dataset 2 (Centre 2): external validation"),
    DesignSite("centre-3", ("survival",), 0.75, True, True,
               "paper 1's Dataset 3: survival cohort of HER2-negative patients (HER2-zero "
               "and HER2-low, no HER2-positive) imaged on a different, dedicated breast MRI "
               "system (scanner profile outside the other sites' strata)"),
)


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
