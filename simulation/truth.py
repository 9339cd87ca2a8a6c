"""truth.json of a simulated cohort: the generator's settings, the design, and per site
and patient what was drawn (class, phenotype), which no site folder holds."""

from __future__ import annotations

from typing import Any

import numpy as np

from simulation.generative_model import (
    ACCRUAL_FOLLOW_UP_DAYS,
    APPEARANCE,
    COVARIATE_CODING,
    COX_COEFFICIENTS,
    DEDICATED_SCANNER,
    DROPOUT_MEAN_DAYS,
    FOV_PER_TUMOUR,
    FOV_Z_FRACTION,
    GENERATOR,
    GENERATOR_VERSION,
    HER2_CLASSES,
    LOG_SIZE_SD,
    LOG_SIZE_SHIFTS,
    PAPER1_SITES,
    PHENOTYPE_SHIFTS,
    PHENOTYPES,
    REFERENCE_INPLANE_MM,
    US_MM_PER_CLINICAL_MM,
    US_PIXEL_MM,
    US_SIZE_PX,
    WEIBULL_SCALE_DAYS,
    WEIBULL_SHAPE,
    SiteDraw,
    SitePlan,
)
from simulation.phantoms import mri_mm_per_clinical_mm


def truth_header(seed: int, n_sites: int, n_patients: int, effect_size: float,
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


def with_design(truth: dict[str, Any], design: str, plans: list[SitePlan]
                 ) -> dict[str, Any]:
    """The header with a ``design`` block (which site plays which dataset) before ``sites``."""
    plays = {d.site_id: d for d in PAPER1_SITES}
    block = {
        "name": design,
        "sites": {p.site_id: {"roles": list(p.roles), "plays": plays[p.site_id].plays,
                              "her2_negative_only": plays[p.site_id].her2_negative_only,
                              "scanner": p.scanner.name}
                  for p in plans},
        "dedicated_scanner": {
            "sites": [d.site_id for d in PAPER1_SITES if d.dedicated_scanner],
            "ranges": {k: list(v) for k, v in DEDICATED_SCANNER.items()},
            "note": "outside the other sites' strata (in-plane 0.6-1.0 mm, slices 1-3 mm, "
                    "intensity scale 300-3000, offset 0-15 % of the scale); noise and bias "
                    "field from the same ranges as the others",
        },
        "sizes": "x 1.25, 1.0, 0.75 the requested patients per site (at least 20)",
    }
    keys = list(truth)
    at = keys.index("sites")
    return {**{k: truth[k] for k in keys[:at]}, "design": block,
            **{k: truth[k] for k in keys[at:]}}


def site_truth(plan: SitePlan, draw: SiteDraw) -> dict[str, Any]:
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


def patient_truth(plan: SitePlan, draw: SiteDraw) -> dict[str, dict[str, Any]]:
    return {
        pid: {
            "site_id": plan.site_id,
            "her2_class": str(draw.her2_class[j]),
            "phenotype": {p: round(float(v), 5) for p, v in zip(PHENOTYPES, draw.phenotype[j],
                                                                strict=True)},
        }
        for j, pid in enumerate(draw.clinical["patient_id"])
    }
