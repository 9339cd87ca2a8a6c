"""Extraction throughput: the project's parallel extraction ÷ pyradiomics in a plain loop.

Both sides extract the paper's 1130 features from the same synthetic patients (reader-1
masks, empty cache for ours) in one run; prints `name: value  (what it means)` lines.

    .venv/bin/python bench/extraction.py [--patients 24] [--workers 2] [--image-size 64]

Sizes: 24 and 40 patients at 64 and 96 px by default (`--sizes`); `--quick`: 24 at 64 px.
The script's heavy imports are inside main(): the pool's spawned workers re-import the
parent's __main__ module, and this script's imports are no part of the extraction.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import Figures, machine


def plain_loop(site_dir: Path, patients: list[str]) -> float:
    """pyradiomics as a user would call it: one extractor, one patient after another."""
    import radiomics
    import SimpleITK as sitk
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    from client.local.extraction import DEFAULT_PARAMS

    radiomics.setVerbosity(logging.ERROR)
    extractor = RadiomicsFeatureExtractor(str(DEFAULT_PARAMS))
    first = site_dir / "images" / patients[0]  # warm-up, untimed: lazy imports, file cache
    extractor.execute(sitk.ReadImage(str(first / "mri.nii.gz")),
                      sitk.ReadImage(str(first / "mri_mask.nii.gz")))
    started = time.perf_counter()
    for patient in patients:
        folder = site_dir / "images" / patient
        extractor.execute(sitk.ReadImage(str(folder / "mri.nii.gz")),
                          sitk.ReadImage(str(folder / "mri_mask.nii.gz")))
    return time.perf_counter() - started


def _timed_loop(site_dir: str, patients: list[str]) -> float:
    return plain_loop(Path(site_dir), patients)


def machine_ceiling(site_dir: Path, patients: list[str], workers: int) -> float:
    """How much faster `workers` plain loops run side by side than one alone: the most any
    parallel extraction can gain on this machine for this workload (shared caches, memory
    bandwidth and the hypervisor take their share), with no pool or start-up cost counted
    (each process builds its extractor before its clock starts)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        alone = pool.apply(_timed_loop, (str(site_dir), patients))
        together = pool.starmap(_timed_loop, [(str(site_dir), patients)] * workers)
    return workers * alone / max(together)


def ours(site_dir: Path, workers: int) -> tuple[float, int]:
    from client.local.extraction import extract_features
    from client.site.folder import load_site

    shutil.rmtree(site_dir / "cache", ignore_errors=True)
    site = load_site(site_dir, task="her2-positive", needs=("clinical", "mri"))
    started = time.perf_counter()
    frame, _ = extract_features(site, workers=workers)
    return time.perf_counter() - started, len(frame)


def one_size(figures: Figures, patients: int, image_size: int, workers: int) -> None:
    from client.local.extraction import extract_features
    from client.site.folder import load_site
    from simulation.cohort import simulate_cohort

    root = Path(tempfile.mkdtemp(prefix="feddlr-bench-"))
    try:
        simulate_cohort(root / "c", n_sites=1, n_patients=patients, seed=3,
                        image_size=image_size)
        site_dir = next(p for p in (root / "c").iterdir() if p.is_dir())
        ids = list(load_site(site_dir, task="her2-positive",
                             needs=("clinical", "mri")).clinical.index)
        loop_s = plain_loop(site_dir, ids)
        ours_s, n = ours(site_dir, workers)
        ceiling = machine_ceiling(site_dir, ids, workers)
        site = load_site(site_dir, task="her2-positive", needs=("clinical", "mri"))
        cached_start = time.perf_counter()
        extract_features(site, workers=workers)
        cached_s = time.perf_counter() - cached_start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    key = f"extraction.{image_size}px_{n}patients"
    figures.add(f"{key}.plain_loop_patients_per_s", len(ids) / loop_s,
                f"pyradiomics called in a plain loop, {len(ids)} patients, paper parameters "
                "(1130 features)")
    figures.add(f"{key}.ours_patients_per_s", n / ours_s,
                f"client.local.extraction with {workers} workers, empty cache")
    figures.add(f"{key}.speedup", loop_s / len(ids) * n / ours_s,
                "ours / plain loop, patients per second; target >= 1.8 on 2 cores")
    figures.add(f"{key}.machine_ceiling", ceiling,
                f"{workers} plain loops side by side / one alone: the best any parallel "
                "extraction can do here")
    figures.add(f"{key}.speedup_of_ceiling", loop_s / len(ids) * n / ours_s / ceiling,
                "speedup / machine ceiling")
    figures.add(f"{key}.cached_rerun_s", cached_s, "the same patients again, all cache hits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="24x64,40x96",
                        help="patients x image size, comma-separated")
    parser.add_argument("--patients", type=int, default=None, help="one size: patients")
    parser.add_argument("--image-size", type=int, default=64, help="one size: pixels")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="24 patients at 64 px only")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if args.patients is not None:
        sizes = [(args.patients, args.image_size)]
    elif args.quick:
        sizes = [(24, 64)]
    else:
        sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    figures = Figures()
    for patients, image_size in sizes:
        one_size(figures, patients, image_size, args.workers)
    figures.dump(args.json, machine=machine())


if __name__ == "__main__":
    main()
