"""Truth coverage of the federated Cox model on the synthetic cohort.

For each seed, `simulation.cohort.simulate_cohort` writes site folders whose DFS comes from
a known Cox model (truth.json); the survival stage runs on them (in process: the same site
and server code as a Flower run, without the Simulation Engine) and we count how often
each true coefficient lies inside the reported 95% CI of the full model.

    .venv/bin/python bench/survival_coverage.py            # 20 seeds, 3 sites × 40 and × 400
    .venv/bin/python bench/survival_coverage.py --seeds 5 --sizes 40

Prints `name: value  (what it means)` lines. truth.json codes age and Ki-67 per 10 units;
the model is fitted per unit, so the true per-unit coefficient is coefficient / scale.
lesion_type is in the model with true coefficient 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.workflow import run_study
from shared.config import StudyConfig
from simulation.cohort import simulate_cohort
from simulation.in_process import InProcessTransport

# design column of the fitted model -> (truth.json coefficient, scale)
TRUTH_COLUMNS = {
    "her2_class=low": ("her2_low", 1.0),
    "her2_class=positive": ("her2_positive", 1.0),
    "age": ("age_per10", 10.0),
    "tumour_size_mm": ("tumour_size_mm", 1.0),
    "hr_status=positive": ("hr_positive", 1.0),
    "ki67": ("ki67_per10", 10.0),
    "lesion_type=non-mass": (None, 1.0),
}


def true_coefficients(truth: dict) -> dict[str, float]:
    coefficients = truth["survival"]["coefficients"]
    coding = truth["survival"]["covariate_coding"]
    out = {}
    for column, (name, _) in TRUTH_COLUMNS.items():
        out[column] = 0.0 if name is None else coefficients[name] / coding[name]["scale"]
    return out


def one_run(seed: int, patients: int, n_sites: int, root: Path) -> dict[str, bool]:
    sites = root / f"sites-{patients}-{seed}"
    truth = simulate_cohort(sites, n_sites=n_sites, n_patients=patients, seed=seed,
                            images=False)
    folders = sorted(p for p in sites.iterdir() if p.is_dir())
    config = StudyConfig(out_dir=str(root / f"out-{patients}-{seed}"), stages=("survival",),
                         stepwise="none")
    results = run_study(InProcessTransport(folders), config)
    model = results["survival"]["cox"]
    covered = {}
    for column, beta in true_coefficients(truth).items():
        low, high = np.log(model["ci_lower"][column]), np.log(model["ci_upper"][column])
        covered[column] = bool(low <= beta <= high)
    return covered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sizes", default="40,400", help="patients per site, comma-separated")
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("feddlr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="feddlr-coverage-") as tmp:
        for patients in (int(v) for v in args.sizes.split(",")):
            started = time.monotonic()
            runs = [one_run(seed, patients, args.sites, Path(tmp))
                    for seed in range(1, args.seeds + 1)]
            label = f"{args.sites}x{patients}"
            for column in TRUTH_COLUMNS:
                hits = sum(r[column] for r in runs)
                print(f"coverage.{label}.{column}: {hits}/{len(runs)}  (seeds whose 95% CI "
                      "holds the true coefficient)")
            total = sum(sum(r.values()) for r in runs)
            cells = sum(len(r) for r in runs)
            print(f"coverage.{label}.all_coefficients: {total}/{cells} = {total / cells:.3f}  "
                  "(pooled over coefficients; nominal 0.95)")
            every = sum(all(r.values()) for r in runs)
            print(f"coverage.{label}.seeds_all_covered: {every}/{len(runs)}  (seeds where "
                  f"every CI holds its truth; 0.95^{len(TRUTH_COLUMNS)} = "
                  f"{0.95 ** len(TRUTH_COLUMNS):.2f} expected)")
            print(f"coverage.{label}.seconds: {time.monotonic() - started:.1f}  "
                  "(wall time for the seeds)")
            print(json.dumps({"sites": args.sites, "patients_per_site": patients,
                              "seeds": args.seeds, "per_seed": runs}), file=sys.stderr)


if __name__ == "__main__":
    main()
