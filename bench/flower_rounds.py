"""Statistics rounds, scale and Cox quality, in Flower's Simulation Engine.

One study per site count (cohort, radiomics from features.csv, survival) run by the same
launcher as `feddlr run`, with `bench/timed_app.py` as the ServerApp: every round is timed
at the server (push the queries, wait for every reply) and, after the handshake, a few
empty rounds (the handshake query again; the sites compute nothing) give the transport's
own cost.

- **Statistics rounds** (the first site count, 3 by default): Newton rounds to converge of
  the pooled standardization, LASSO, L2 logistic regression (`radiomics.rounds`) and Cox
  (`survival.cox.iterations`), and the median time of one such round ÷ that of an empty
  round.
- **Quality** (same run): the federated Cox coefficients against lifelines' CoxPHFitter on
  the pooled rows, read from the simulated site folders' clinical.csv (times binned as the
  sites bin them), max |difference|.
- **Scale** (every site count): median seconds per round of each stage and of an empty
  round, against the number of sites; the growth is the log-log slope.

Sites are `simulate_cohort(images=False)` folders plus a features.csv (`--features`
columns, the first two shifted by the HER2 label): radiomics runs without pyradiomics.

    .venv/bin/python bench/flower_rounds.py                 # 3, 10, 30 and 100 sites
    .venv/bin/python bench/flower_rounds.py --sites 3,10 --quick
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import Figures, PeakMemory, machine
from shared.kaplan_meier import bin_times
from simulation import launcher
from simulation.cohort import her2_labels, simulate_cohort

REPO = Path(__file__).resolve().parent.parent
STAGE_OF = {"cohort_": "cohort", "radiomics_": "radiomics", "survival_": "survival"}
COX_COLUMNS = ["her2_class=low", "her2_class=positive", "age", "tumour_size_mm",
               "hr_status=positive", "ki67", "lesion_type=non-mass"]


# --------------------------------------------------------------------------- site folders


def feature_sites(root: Path, n_sites: int, n_patients: int, n_features: int,
                  seed: int) -> list[Path]:
    """Clinical-only synthetic sites, each with a features.csv (patient_id + numbers)."""
    simulate_cohort(root, n_sites=n_sites, n_patients=n_patients, seed=seed, images=False)
    rng = np.random.default_rng(seed)
    folders = sorted(p for p in root.iterdir() if (p / "site.yaml").is_file())
    for folder in folders:
        clinical = pd.read_csv(folder / "clinical.csv", dtype={"her2_ish": str})
        positive = (her2_labels(clinical) == "positive").to_numpy(float)
        values = rng.normal(size=(len(clinical), n_features))
        values[:, :2] += positive[:, None] * np.array([1.0, 0.7])[: min(2, n_features)]
        table = pd.DataFrame(values, columns=[f"original_firstorder_F{j}"
                                              for j in range(n_features)])
        table.insert(0, "patient_id", clinical["patient_id"])
        table.to_csv(folder / "features.csv", index=False)
    return folders


# --------------------------------------------------------------------------- one run


def timed_app(root: Path) -> Path:
    """A copy of the app whose pyproject names bench/timed_app.py as its ServerApp."""
    app = root / "app"
    for name in ("client", "server", "shared", "simulation"):
        shutil.copytree(REPO / name, app / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (app / "bench").mkdir(parents=True)
    for name in ("timed_app.py", "figures.py"):
        shutil.copy2(REPO / "bench" / name, app / "bench" / name)
    shutil.copy2(REPO / "README.md", app / "README.md")
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    old = 'serverapp = "server.app:app"'
    if old not in text:
        raise SystemExit("pyproject.toml does not name server.app:app as its ServerApp")
    text = text.replace(old, 'serverapp = "bench.timed_app:app"')
    section = "[tool.flwr.app.config]\n"
    if section not in text:
        raise SystemExit("pyproject.toml has no [tool.flwr.app.config]")
    text = text.replace(section, section + 'bench-empty-rounds = 5\n')
    (app / "pyproject.toml").write_text(text, encoding="utf-8")
    return app


def run_once(app: Path, sites: Path, out: Path, stages: str, cpus: float,
             empty_rounds: int, extra: dict[str, str]) -> dict:
    saved = launcher.APP_DIR
    launcher.APP_DIR = app
    started = time.perf_counter()
    try:
        with PeakMemory({"site_actor": "ClientAppActor", "serverapp": "flwr-serverapp"}) as mem:
            rc = launcher.run_simulation(
                sites, out, {**({"stages": stages} if stages else {}),
                             "bench-empty-rounds": str(empty_rounds), **extra},
                num_cpus_per_site=int(cpus) if float(cpus).is_integer() else cpus,
                echo=False)
    finally:
        launcher.APP_DIR = saved
    wall = time.perf_counter() - started
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    timing = json.loads((out / "bench_rounds.json").read_text(encoding="utf-8"))
    return {"rc": rc, "wall": wall, "results": results, "timing": timing,
            "memory_mib": mem.max_by_label()}


def per_stage(timing: dict) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for entry in timing["rounds"]:
        stage = next((s for p, s in STAGE_OF.items() if entry["action"].startswith(p)), None)
        if stage:
            out.setdefault(stage, []).append(entry["seconds"])
    return out


def by_action(timing: dict, action: str) -> list[float]:
    return [e["seconds"] for e in timing["rounds"] if e["action"] == action]


# --------------------------------------------------------------------------- Cox vs lifelines


def pooled_cox(folders: list[Path], time_bin: float) -> pd.Series:
    from lifelines import CoxPHFitter

    frames = [pd.read_csv(f / "clinical.csv", dtype={"her2_ish": str}) for f in folders]
    rows = pd.concat(frames, ignore_index=True)
    her2 = her2_labels(rows)
    keep = her2.notna()
    rows, her2 = rows[keep].reset_index(drop=True), her2[keep].reset_index(drop=True)
    data = pd.DataFrame({
        "T": bin_times(rows.dfs_time.to_numpy(float), time_bin), "E": rows.dfs_event,
        "her2_class=low": (her2 == "low").astype(float),
        "her2_class=positive": (her2 == "positive").astype(float),
        "age": rows.age.astype(float), "tumour_size_mm": rows.tumour_size_mm.astype(float),
        "hr_status=positive": (rows.hr_status == "positive").astype(float),
        "ki67": rows.ki67.astype(float),
        "lesion_type=non-mass": (rows.lesion_type == "non-mass").astype(float)})
    fit = CoxPHFitter().fit(data, "T", "E", fit_options={
        "precision": 1e-12, "r_precision": 1e-16, "step_size": 1.0})
    return fit.params_


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="3,10,30,100",
                        help="site counts, comma-separated; the first also gives the "
                             "statistics-rounds and Cox figures")
    parser.add_argument("--patients", type=int, default=40,
                        help="patients per site for the first site count")
    parser.add_argument("--scale-patients", type=int, default=20,
                        help="patients per site for the scale runs (the generator's minimum)")
    parser.add_argument("--features", type=int, default=4,
                        help="features.csv columns (kept under max_feature_ratio x n so the "
                             "sites allow p x p matrices: Newton rounds)")
    parser.add_argument("--cpus-per-site", type=float, default=1.0,
                        help="client-resources-num-cpus (2 cores: 2 sites at a time)")
    parser.add_argument("--empty-rounds", type=int, default=5)
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="site counts 3,10 only")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    counts = [3, 10] if args.quick else [int(v) for v in args.sites.split(",")]
    root = args.out or Path(tempfile.mkdtemp(prefix="feddlr-bench-rounds-"))
    root.mkdir(parents=True, exist_ok=True)
    app = timed_app(root / "timed")
    figures, runs = Figures(), {}
    extra = {"cv-folds": str(args.cv_folds), "stepwise": "none"}
    print(f"sizes: {counts} sites; {args.patients} patients per site at {counts[0]} sites, "
          f"{args.scale_patients} at the others; {args.features} features.csv columns; "
          f"{args.cpus_per_site:g} CPU per simulated site", flush=True)
    for i, n in enumerate(counts):
        patients = args.patients if i == 0 else args.scale_patients
        sites = root / f"sites-{n}"
        folders = feature_sites(sites, n, patients, args.features, args.seed)
        run = run_once(app, sites, root / f"out-{n}", "cohort,radiomics,survival",
                       args.cpus_per_site, args.empty_rounds, extra)
        run["folders"] = folders
        runs[n] = run
        stages = run["results"]["run"]["stages"]
        status = {s: v["status"] for s, v in stages.items() if v["status"] != "skipped"}
        print(f"# {n} sites: {len(folders)} site folders, "
              f"run {run['wall']:.0f} s, stages {status}", flush=True)
        if i == 0:
            statistics_figures(figures, run, n, folders)
    scale_figures(figures, runs, counts)
    summary = {n: {"wall_s": r["wall"], "stages": r["results"]["run"]["stages"],
                   "empty": r["timing"]["empty"], "per_stage": per_stage(r["timing"]),
                   "radiomics_rounds": r["results"].get("radiomics", {}).get("rounds"),
                   "memory_mib": r["memory_mib"], "patients": [
                       s.get("n_patients") for s in r["results"]["run"]["sites"]]}
               for n, r in runs.items()}
    figures.dump(args.json, runs=summary, machine=machine(), args=vars(args))
    (root / "bench.json").write_text(json.dumps({"figures": figures.items, "runs": summary},
                                                indent=1, default=str))
    print(f"written: {root / 'bench.json'}")
    return 0


def statistics_figures(figures: Figures, run: dict, n: int, folders: list[Path]) -> None:
    results, timing = run["results"], run["timing"]
    empty = float(np.median([e["seconds"] for e in timing["empty"]]))
    figures.add(f"rounds.{n}sites.empty_round_s", empty,
                "median seconds of an empty Flower round: the handshake query again, "
                "server push -> every reply pulled")
    rounds = results.get("radiomics", {}).get("rounds") or {}
    for what in ("standardize", "lasso", "logistic"):
        if what in rounds:
            figures.add(f"rounds.{n}sites.{what}_rounds", int(rounds[what]),
                        f"rounds to converge, all {what} fits (whole cohort + CV folds) "
                        "advancing together")
    cox = results.get("survival", {}).get("cox", {})
    if "iterations" in cox:
        figures.add(f"rounds.{n}sites.cox_newton_iterations", int(cox["iterations"]),
                    "Newton iterations of the federated Cox fit")
    for action, label in (("radiomics_step", "radiomics statistics"),
                          ("survival_cox", "Cox")):
        seconds = by_action(timing, action)
        if seconds:
            median = float(np.median(seconds))
            figures.add(f"rounds.{n}sites.{action}_round_s", median,
                        f"median seconds of a {label} round ({len(seconds)} rounds)")
            figures.add(f"rounds.{n}sites.{action}_vs_empty", median / empty,
                        f"{label} round / empty round")
    survival = results.get("survival", {})
    if "coef" in cox:
        reference = pooled_cox(folders, float(survival.get("time_bin", 0) or 0))
        columns = [c for c in COX_COLUMNS if c in cox["coef"]]
        diff = max(abs(cox["coef"][c] - reference[c]) for c in columns)
        scale = max(abs(reference[c]) for c in columns)
        figures.add(f"quality.cox.{n}sites.max_abs_coef_diff", float(diff),
                    f"federated Cox vs lifelines CoxPHFitter on the pooled binned rows, "
                    f"max |coef difference| over {len(columns)} coefficients "
                    f"(largest |coef| {scale:.3f})", shown=f"{diff:.2e}")


def scale_figures(figures: Figures, runs: dict[int, dict], counts: list[int]) -> None:
    for n in counts:
        run = runs[n]
        empty = float(np.median([e["seconds"] for e in run["timing"]["empty"]]))
        figures.add(f"scale.{n}sites.empty_round_s", empty, "median empty round")
        for stage, seconds in per_stage(run["timing"]).items():
            figures.add(f"scale.{n}sites.{stage}_round_s", float(np.median(seconds)),
                        f"median seconds per {stage} round ({len(seconds)} rounds)")
        figures.add(f"scale.{n}sites.run_s", run["wall"], "whole Simulation Engine run")
        mem = run["memory_mib"]
        if "site_actor" in mem:
            figures.add(f"scale.{n}sites.site_actor_peak_rss_mib", mem["site_actor"],
                        "peak RSS of a Simulation Engine worker (serves several sites)")
    pairs = [(counts[0], counts[-1])] + ([(counts[-2], counts[-1])] if len(counts) > 2 else [])
    for lo, hi in pairs if len(counts) >= 2 else []:
        for stage in ("cohort", "radiomics", "survival", "empty"):
            a, b = _median(runs[lo], stage), _median(runs[hi], stage)
            if a and b:
                slope = math.log(b / a) / math.log(hi / lo)
                figures.add(f"scale.growth.{lo}-{hi}.{stage}", slope,
                            f"log-log slope of seconds per round vs sites, {lo} -> {hi} sites "
                            "(1 = linear)")


def _median(run: dict, stage: str) -> float | None:
    if stage == "empty":
        return float(np.median([e["seconds"] for e in run["timing"]["empty"]]))
    seconds = per_stage(run["timing"]).get(stage)
    return float(np.median(seconds)) if seconds else None


if __name__ == "__main__":
    raise SystemExit(main())
