"""Extraction throughput: the project's parallel extraction ÷ pyradiomics in a plain loop.

Both sides extract the paper's 1130 features from the same synthetic patients (reader-1
masks, empty cache for ours) in one run; prints `name: value  (what it means)` lines.

    .venv/bin/python bench/extraction.py [--patients 24] [--workers 2] [--image-size 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import radiomics
import SimpleITK as sitk
from radiomics.featureextractor import RadiomicsFeatureExtractor

from client.extraction import DEFAULT_PARAMS, extract_features
from client.site import load_site
from simulation.cohort import simulate_cohort


def plain_loop(site_dir: Path, patients: list[str]) -> float:
    """pyradiomics as a user would call it: one extractor, one patient after another."""
    radiomics.setVerbosity(logging.ERROR)
    extractor = RadiomicsFeatureExtractor(str(DEFAULT_PARAMS))
    started = time.perf_counter()
    for patient in patients:
        folder = site_dir / "images" / patient
        extractor.execute(sitk.ReadImage(str(folder / "mri.nii.gz")),
                          sitk.ReadImage(str(folder / "mri_mask.nii.gz")))
    return time.perf_counter() - started


def ours(site_dir: Path, workers: int) -> tuple[float, int]:
    shutil.rmtree(site_dir / "cache", ignore_errors=True)
    site = load_site(site_dir, task="her2-positive", needs=("clinical", "mri"))
    started = time.perf_counter()
    frame, _ = extract_features(site, workers=workers)
    return time.perf_counter() - started, len(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="feddlr-bench-"))
    try:
        simulate_cohort(root / "c", n_sites=1, n_patients=args.patients, seed=3,
                        image_size=args.image_size)
        site_dir = next(p for p in (root / "c").iterdir() if p.is_dir())
        patients = list(load_site(site_dir, task="her2-positive",
                                  needs=("clinical", "mri")).clinical.index)
        loop_s = plain_loop(site_dir, patients)
        ours_s, n = ours(site_dir, args.workers)
        site = load_site(site_dir, task="her2-positive", needs=("clinical", "mri"))
        cached_start = time.perf_counter()
        extract_features(site, workers=args.workers)
        cached_s = time.perf_counter() - cached_start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"extraction.patients: {n}  (synthetic {args.image_size}-px MRI, paper parameters, "
          "1130 features each)")
    print(f"extraction.plain_loop_patients_per_s: {len(patients) / loop_s:.2f}  "
          "(pyradiomics called in a plain loop)")
    print(f"extraction.ours_patients_per_s: {n / ours_s:.2f}  "
          f"(client.extraction with {args.workers} workers, empty cache)")
    print(f"extraction.speedup: {loop_s / len(patients) * n / ours_s:.2f}  "
          f"(ours ÷ plain loop, patients per second; target ≥ 1.8 on 2 cores)")
    print(f"extraction.cached_rerun_s: {cached_s:.3f}  (the same patients again, all cache hits)")


if __name__ == "__main__":
    main()
