"""The AUC cost of `dp=…` on the CNN weight rounds (issue 16, part 4): DL-MRI on the bench
cohort, trained in process without DP and under `dp=client-fixed` at two noise levels.

For each seed s: the bench cohort of bench/training.py (`simulate_cohort(n_sites=3,
n_patients=40, seed=s, effect_size=1.0, image_size=96)`), the `deep` stage alone with
`deep-models=dl_mri` (scratch recipe: ResNet18-3D width 0.125, 32³, 8 rounds × 10 local
steps, FedAvg; `deep-cv-folds` = `--folds`, 4 by default), through
`simulation.in_process.InProcessTransport` (the same site and server code as a Flower
run). The run without DP is done first; the median L2
norm of the sites' updates in it (every site, fold and round) is the clipping norm C of
the DP runs (the target of adaptive clipping, Andrew et al.). AUC: scikit-learn's
`roc_auc_score` over the training sites' out-of-fold rows of their own prediction files;
ε at δ = 1/n from the run's `dp` block (Opacus' RDP accountant).

    .venv/bin/python bench/dp.py                       # seeds 1,2,3, σ 0.01 and 1
    .venv/bin/python bench/dp.py --seeds 1,2 --folds 2  # what docs/BENCHMARKS.md reports

Prints one line per run (also to OUT/dp.log) and writes OUT/dp.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.training import _run_label, prediction_scores, site_labels, training_sites
from server.workflow import run_study
from shared import dp, fedavg
from shared.config import StudyConfig, stage_settings
from shared.schema import nest
from simulation.cohort import simulate_cohort
from simulation.in_process import InProcessTransport

MODEL = "dl_mri"
FOLDS = 4  # --folds


class NormTransport(InProcessTransport):
    """The in-process transport, noting the L2 norm of every update it carries."""

    norms: list[float]

    def ask(self, action: str, query: Any, sites: Any) -> Any:
        replies = super().ask(action, query, sites)
        if action == f"train.{MODEL}":
            for reply in replies.values():
                for unit in query["units"]:
                    raw = nest(reply.payload, f"{unit}.delta")
                    if raw:
                        self.norms.append(dp.update_norm(fedavg.decode(raw, "float32")))
        return replies


def say(root: Path, line: str) -> None:
    """Print a line and append it to OUT/dp.log."""
    print(line)
    with open(root / "dp.log", "a", encoding="utf-8") as log:
        log.write(line + "\n")


def one_run(sites: Path, out: Path, seed: int, extra: dict[str, str]) -> dict[str, Any]:
    settings = {"deep-models": MODEL, "seed": str(seed), "gradcam-patients": "0",
                "deep-cv-folds": str(FOLDS), **extra}
    config = StudyConfig(sites_dir=str(sites), out_dir=str(out), stages=("deep",),
                         settings=stage_settings(settings))
    transport = NormTransport(sorted(p for p in sites.iterdir() if (p / "site.yaml").is_file()))
    transport.norms = []
    run_id = f"dp-{seed}-{extra.get('dp', 'off')}-{extra.get('dp-noise-multiplier', '')}"
    started = time.perf_counter()
    results = run_study(transport, config, run_id=run_id)
    seconds = time.perf_counter() - started
    if results["run"]["stages"]["deep"].get("status") != "ok":
        raise SystemExit(f"seed {seed} {extra}: deep stage {results['run']['stages']['deep']}")
    return {"auc": oof_auc(sites, _run_label(run_id)), "seconds": seconds,
            "norms": transport.norms, "dp": results["deep"]["models"][MODEL].get("dp")}


def oof_auc(sites: Path, run: str) -> float:
    from sklearn.metrics import roc_auc_score

    folders = training_sites(sites)
    labels = {site: site_labels(folder, site) for site, folder in folders.items()}
    scores = prediction_scores(folders, MODEL, run, ("out-of-fold",))
    y = __import__("pandas").concat(labels.values()).reindex(scores.index)
    keep = y.notna()
    if scores[keep].isna().any():  # the noise made the network's outputs NaN
        return float("nan")
    return float(roc_auc_score(y[keep].astype(int), scores[keep]))


def one_seed(root: Path, seed: int, sigmas: list[float], mode: str) -> dict[str, Any]:
    sites = root / f"seed-{seed}"
    simulate_cohort(sites, n_sites=3, n_patients=40, seed=seed, effect_size=1.0,
                    image_size=96)
    plain = one_run(sites, root / f"out-{seed}-off", seed, {})
    clip = float(np.median(plain["norms"]))
    say(root, f"seed {seed}: dp off AUC {plain['auc']:.3f} ({plain['seconds']:.0f} s); "
              f"update norms median {clip:.4g} (min {min(plain['norms']):.4g}, max "
              f"{max(plain['norms']):.4g}) -> C")
    rows = {"off": {"auc": plain["auc"], "seconds": plain["seconds"]}}
    for sigma in sigmas:
        run = one_run(sites, root / f"out-{seed}-{sigma}", seed,
                      {"dp": mode, "dp-noise-multiplier": str(sigma),
                       "dp-clipping-norm": repr(clip)})
        eps = run["dp"]["epsilon"]
        rows[str(sigma)] = {"auc": run["auc"], "seconds": run["seconds"], "epsilon": eps,
                            "steps": run["dp"]["steps"]["overall"]}
        say(root, f"seed {seed}: dp={mode} sigma {sigma} C {clip:.4g}: AUC {run['auc']:.3f} "
              f"({run['seconds']:.0f} s); epsilon overall {eps['overall']:.4g}, per site "
              + ", ".join(f"{s} {e:.4g}" for s, e in eps.items() if s != "overall"))
    return {"clipping_norm": clip, "norms": plain["norms"], "runs": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--sigmas", default="0.01,1")
    parser.add_argument("--mode", default="client-fixed", choices=dp.MODES)
    parser.add_argument("--folds", type=int, default=4, help="deep-cv-folds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    global FOLDS
    FOLDS = args.folds
    seeds = [int(s) for s in args.seeds.split(",")]
    sigmas = [float(s) for s in args.sigmas.split(",")]
    root = args.out or Path(tempfile.mkdtemp(prefix="feddlr-bench-dp-"))
    root.mkdir(parents=True, exist_ok=True)
    measured = {seed: one_seed(root, seed, sigmas, args.mode) for seed in seeds}
    for key in ["off", *map(str, sigmas)]:
        aucs = [m["runs"][key]["auc"] for m in measured.values()]
        say(root, f"AUC {key}: mean {np.mean(aucs):.3f} over seeds {seeds}: "
              + ", ".join(f"{a:.3f}" for a in aucs))
    (root / "dp.json").write_text(json.dumps({"args": vars(args) | {"out": str(root)},
                                              "seeds": measured}, indent=1, default=str))
    print(f"written: {root / 'dp.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
