"""The attainable AUC (ceiling) of the HER2 tasks under the generating model.

``optimal_score`` is the Bayes-optimal score (the log-likelihood ratio of the generating
Gaussian model), ``attainable_auc`` its population AUC (seeded Monte Carlo), and
``ceiling_truth`` the ``truth["ceiling"]`` record: population and sample values, pooled and
per site, and the same for a model that sees only the MRI.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from simulation.generative_model import (
    CEILING_DRAWS,
    CEILING_SEED,
    HER2_CLASSES,
    LOG_SIZE_SD,
    LOG_SIZE_SHIFTS,
    PHENOTYPE_SHIFTS,
    PHENOTYPES,
    SiteDraw,
    SitePlan,
)

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


def ceiling_truth(draws: dict[str, tuple[SitePlan, SiteDraw]], effect_size: float
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
