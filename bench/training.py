"""Federated vs pooled CNN training, and the weights' bytes on the wire.

1. `fed-vs-pooled`: one study in Flower's Simulation Engine (`feddlr run` machinery) with
   `mode=both` on a synthetic cohort: every CNN (DSFR U-Net, DL-MRI ResNet18-3D, DL-US
   ConvNeXt V2) is trained federated (FedAvg, sites in parallel as Simulation Engine
   actors) and pooled (all training sites' data in the ServerApp process, the centralized
   reference), then both are scored the same way at the sites. Prints per model the pooled
   out-of-fold AUC of each and federated − pooled, and the training wall-time ratio
   federated ÷ pooled — both measured in the same run.
2. `wire`: for each wire dtype (float32, float16, bfloat16), one federated round per model
   in process (the same site and server code as a Flower run) and the bytes of weights
   sent per site and round (down: global weights of every fold; up: the update), measured
   on the messages, with the ratio to the float32 parameter bytes; and the parameter bytes
   of the papers' full-size models (computed, not trained: too big for this CPU).

    .venv/bin/python bench/training.py                      # 3 sites × 40, 48-px phantoms
    .venv/bin/python bench/training.py --patients 60 --rounds 6 --skip-wire

Prints `name: value  (what it means)` lines and writes OUT/bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.transport import InProcessTransport
from server.workflow import run_study
from shared import fedavg
from shared.config import StudyConfig
from shared.networks import NetworkSpec
from simulation.cohort import simulate_cohort
from simulation.launcher import run_simulation

MODELS = ("dsfr", "dl_mri", "dl_us")


def bench_config(args: argparse.Namespace) -> dict[str, str]:
    return {"stages": "dsfr,deep", "rounds": str(args.rounds),
            "local-epochs": f"dsfr={args.dsfr_epochs},dl_mri=1,dl_us=1",
            "cnn-width": str(args.width), "mri-size": str(args.mri_size),
            "us-size": str(args.us_size), "dsfr-size": "64", "deep-cv-folds": "4",
            "cv-folds": "5", "lr": f"dl_us={args.us_lr}", "gradcam-patients": "0",
            "seed": str(args.seed)}


def fed_vs_pooled(args: argparse.Namespace, root: Path) -> dict:
    sites = root / "sites"
    simulate_cohort(sites, n_sites=args.sites, n_patients=args.patients, seed=args.seed,
                    effect_size=args.effect_size, image_size=args.image_size)
    out = root / "fed-vs-pooled"
    started = time.perf_counter()
    run_simulation(sites, out, {**bench_config(args), "mode": "both"},
                   num_cpus_per_site=1, echo=False)
    seconds = time.perf_counter() - started
    results = json.loads((out / "results.json").read_text())
    rows = {}
    dsfr = results.get("dsfr", {})
    if "comparison" in dsfr:
        rows["dsfr"] = dsfr["comparison"] | {
            "dice_federated": _dice(dsfr["training"]),
            "dice_pooled": _dice(dsfr["pooled"]["training"])}
    for model, comparison in results.get("deep", {}).get("comparison", {}).items():
        rows[model] = comparison
    return {"run_seconds": seconds, "stages": results["run"]["stages"], "models": rows,
            "n_patients": [s["n_patients"] for s in results["run"]["sites"]]}


def _dice(training: dict) -> float | None:
    last = training["validation"][str(training["chosen_round"])]
    return last["pooled"].get("dice")


def wire(args: argparse.Namespace, root: Path) -> dict:
    sites = root / "wire-sites"
    simulate_cohort(sites, n_sites=2, n_patients=24, seed=args.seed, image_size=24)
    folders = sorted(p for p in sites.iterdir() if (p / "site.yaml").is_file())
    out: dict[str, dict] = {}
    for dtype in fedavg.WIRE_DTYPES:
        extra = {**bench_config(args), "rounds": 1, "local-epochs": 1, "wire-dtype": dtype,
                 "cv-folds": 3}
        config = StudyConfig(sites_dir=str(sites), out_dir=str(root / f"wire-{dtype}"),
                             stages=("dsfr", "deep"), extra=extra)
        transport = InProcessTransport(folders)
        results = run_study(transport, config, run_id=f"wire-{dtype}")
        models = {"dsfr": results["dsfr"]["training"], **results["deep"]["models"]}
        for model, result in models.items():
            site = result["sites"][0]
            message = next(m for m in transport.wire[site]
                           if m["message_type"] == f"train.{model}")
            out.setdefault(model, {})[dtype] = {
                "down": result["wire"]["per_round"][site]["down"][0],
                "up": result["wire"]["per_round"][site]["up"][0],
                "reply_message": message["bytes"],
                "units": len(result["units"]),
                "parameters": result["network"]["parameters"]}
    return out


def paper_sizes() -> dict[str, dict[str, int]]:
    """Parameter bytes of one full-size model per wire dtype (computed)."""
    sizes = {}
    for model, spec in (("dsfr", NetworkSpec("dsfr", 1.0)), ("dl_mri", NetworkSpec("dl_mri", 1.0)),
                        ("dl_us", NetworkSpec("dl_us", 1.0, variant="atto"))):
        state = {k: v.numpy() for k, v in spec.build(0).state_dict().items()}
        sizes[model] = {d: fedavg.parameter_bytes(state, d) for d in fedavg.WIRE_DTYPES}
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--effect-size", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dsfr-epochs", type=int, default=2)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--mri-size", type=int, default=32)
    parser.add_argument("--us-size", type=int, default=64)
    parser.add_argument("--us-lr", type=float, default=1e-3,
                        help="DL-US lr (the paper's 2e-5 assumes ImageNet weights)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-wire", action="store_true")
    parser.add_argument("--skip-fed", action="store_true")
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="feddlr-bench-training-"))
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    print(f"size: {args.sites} sites x ~{args.patients} patients, {args.image_size}-px phantoms, "
          f"width {args.width}, MRI {args.mri_size}^3, US {args.us_size}^2, DSFR 64^2, "
          f"{args.rounds} rounds, 4-fold CV (deep)")
    if not args.skip_fed:
        fed = fed_vs_pooled(args, root)
        report["fed_vs_pooled"] = fed
        for model, row in fed["models"].items():
            print(f"{model}.auc_federated: {_fmt(row['auc_federated'])}  (pooled out-of-fold "
                  "AUC from histograms)")
            print(f"{model}.auc_pooled: {_fmt(row['auc_pooled'])}  (same, centralized training)")
            print(f"{model}.delta_auc: {_fmt(row['delta_auc'])}  (federated - pooled)")
            print(f"{model}.wall_time_ratio: {row['wall_time_ratio']:.2f}  (federated / pooled "
                  f"training seconds: {row['seconds_federated']:.1f} / "
                  f"{row['seconds_pooled']:.1f})")
            print(f"{model}.round_time_ratio: {row['round_time_ratio']:.2f}  (median round after "
                  f"the first: {row['round_seconds_federated']:.2f} / "
                  f"{row['round_seconds_pooled']:.2f} s)")
            if "dice_federated" in row:
                print(f"{model}.dice: {_fmt(row['dice_federated'])} federated, "
                      f"{_fmt(row['dice_pooled'])} pooled  (validation Dice, chosen round)")
        print(f"run_seconds: {fed['run_seconds']:.1f}  (the whole Simulation Engine run)")
    if not args.skip_wire:
        measured = wire(args, root)
        report["wire"] = measured
        for model, by_dtype in measured.items():
            base = by_dtype["float32"]["up"]
            for dtype, row in by_dtype.items():
                print(f"{model}.wire.{dtype}: down {row['down']} B, up {row['up']} B per site "
                      f"per round ({row['units']} unit(s)); up / float32 = "
                      f"{row['up'] / base:.3f}; reply message {row['reply_message']} B")
        report["paper_sizes"] = paper_sizes()
        for model, sizes in report["paper_sizes"].items():
            print(f"{model}.full_size_bytes: " + ", ".join(
                f"{d} {b / 2**20:.1f} MiB" for d, b in sizes.items()) + "  (one model, width 1)")
    (root / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"written: {root / 'bench.json'}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
