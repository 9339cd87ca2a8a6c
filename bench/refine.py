"""Issue 17: rounds and bytes that score-grid refinement adds to the validation stage, for
3, 10 and 30 sites.

Each site holds `predictions.csv` with two outside models (`grid01`: scores to two decimals;
`float`: continuous float64), `--patients` patients per site with a site-specific prevalence
and score shift. The validation stage runs in process (`simulation.in_process`, the real
site handlers and egress guard) with `min_cell_count` 1 and 5; the lines give the first
histogram round's reply bytes, the refinement rounds and reply bytes, their ratio, and
whether the pooled statistics came out exact on the raw scores.

    .venv/bin/python bench/refine.py [--sites 3,10,30] [--patients 100] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import roc_auc_score

from server.workflow import run_study
from shared import schema
from shared.config import StudyConfig, stage_settings
from simulation.in_process import InProcessTransport

MODELS = ("grid01", "float")


def write_sites(root: Path, n_sites: int, patients: int, min_cell: int,
                seed: int = 17) -> tuple[list[Path], pd.DataFrame]:
    rng = np.random.default_rng(seed)
    folders, frames = [], []
    for i in range(n_sites):
        y = (rng.random(patients) < rng.uniform(0.25, 0.6)).astype(int)
        z = 1.1 * y + rng.normal(0, 0.4) + rng.normal(0, 1, patients)
        frame = pd.DataFrame({"patient_id": [f"p{i}-{k:04d}" for k in range(patients)],
                              "label": y, "grid01": np.round(1 / (1 + np.exp(-z)), 2),
                              "float": 1 / (1 + np.exp(-(0.8 * z + rng.normal(0, .7, patients))))})
        frame["float"] = pd.to_numeric(frame["float"].map(repr))  # as the site reads it
        folder = root / f"site-{i + 1}"
        folder.mkdir(parents=True)
        (folder / "site.yaml").write_text(yaml.safe_dump({
            "site_id": f"site-{i + 1}", "roles": ["train"], "time_unit": "days",
            "privacy": {"min_patients": 10, "min_cell_count": min_cell}}))
        frame[["patient_id", "label"]].to_csv(folder / "clinical.csv", index=False)
        pd.concat([pd.DataFrame({"patient_id": frame.patient_id, "model": m,
                                 "score": frame[m]}) for m in MODELS]).to_csv(
            folder / "predictions.csv", index=False)
        folders.append(folder)
        frames.append(frame)
    return folders, pd.concat(frames, ignore_index=True)


def measure(n_sites: int, patients: int, min_cell: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folders, pooled = write_sites(Path(tmp) / "sites", n_sites, patients, min_cell)
        config = StudyConfig(out_dir=str(Path(tmp) / "out"), task="label",
                             stages=("validation",), settings=stage_settings({}))
        started = time.perf_counter()
        results = run_study(InProcessTransport(folders), config)
        seconds = time.perf_counter() - started
    v = results["validation"]
    wire = [e for entries in results["run"]["wire"].values() for e in entries]
    first = sum(e["bytes"] for e in wire
                if e["message_type"] == f"query.{schema.VALIDATION_SCORES}")
    refined = v["refinement"]
    errors = {m: abs(v[m]["pooled"]["auc"] - roc_auc_score(pooled.label, pooled[m]))
              for m in MODELS}
    return {"sites": n_sites, "patients": n_sites * patients, "min_cell_count": min_cell,
            "first_round_bytes": first, "refine_rounds": refined["rounds"],
            "refine_bytes": refined["bytes"], "refine_per_round": refined["per_round"],
            "ratio": refined["bytes"] / first if first else None,
            "exact": {m: v[m]["pooled"]["exact"] for m in MODELS},
            "auc_error_vs_sklearn": errors, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", default="3,10,30")
    parser.add_argument("--patients", type=int, default=100, help="per site")
    parser.add_argument("--quick", action="store_true", help="3 and 10 sites, 50 patients")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sites = [3, 10] if args.quick else [int(s) for s in args.sites.split(",")]
    patients = 50 if args.quick else args.patients
    rows = []
    for n in sites:
        for min_cell in (1, 5):
            row = measure(n, patients, min_cell)
            rows.append(row)
            print(f"refine_{n}sites_mincell{min_cell}: rounds {row['refine_rounds']}, "
                  f"{row['refine_bytes']} B ÷ first round {row['first_round_bytes']} B = "
                  f"{row['ratio']:.2f}  (exact {row['exact']}, |AUC − sklearn| "
                  f"{max(row['auc_error_vs_sklearn'].values()):.1e}, {row['seconds']:.1f} s)",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
