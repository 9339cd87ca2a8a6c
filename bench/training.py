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

Prints `name: value  (what it means)` lines and writes OUT/bench.json (and `--json FILE`,
the figures for `bench/run.py`). The federated run also records the peak RSS of the
Simulation Engine's worker processes (the sites) and of the ServerApp process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import Figures, PeakMemory, machine
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
    # Simulation Engine workers (Ray actors running the ClientApp: the sites) and the
    # ServerApp process (which also trains the pooled reference)
    with PeakMemory({"site_actor": "ClientAppActor", "serverapp": "flwr-serverapp"}) as mem:
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
            "n_patients": [s["n_patients"] for s in results["run"]["sites"]],
            "memory": {"peak_mib": mem.max_by_label(), "processes": list(mem.peaks.values())},
            "rounds": _round_breakdown(results)}


def _round_breakdown(results: dict) -> dict:
    """Per model and round: the server's round seconds and each site's own seconds (the
    site's `device.seconds`: validate + train + encode), to see where the time goes."""
    runs = {}
    dsfr = results.get("dsfr", {})
    if "training" in dsfr:
        runs["dsfr"] = dsfr["training"]
        if "pooled" in dsfr:
            runs["dsfr_pooled"] = dsfr["pooled"]["training"]
    for name, result in results.get("deep", {}).get("models", {}).items():
        runs[name] = result
    for name, result in results.get("deep", {}).get("pooled", {}).items():
        runs[f"{name}_pooled"] = result
    return {name: [{"round": e["round"], "seconds": e["seconds"],
                    "sites": {s: i.get("seconds") for s, i in e["sites"].items()}}
                   for e in result.get("rounds", [])] for name, result in runs.items()}


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
                "parameters": result["network"]["parameters"],
                "parameter_bytes_float32": len(result["units"]) * parameter_bytes(
                    model, args.width, "float32")}
    return out


def parameter_bytes(model: str, width: float, dtype: str) -> int:
    """float32 bytes of one unit's state (what FedAvg averages), computed from the network."""
    state = {k: v.numpy() for k, v in NetworkSpec(model, width).build(0).state_dict().items()}
    return fedavg.parameter_bytes(state, dtype)


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
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds, 24 patients per site, 32-px phantoms")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.patients, args.image_size = 2, 24, 32
    root = args.out or Path(tempfile.mkdtemp(prefix="feddlr-bench-training-"))
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine()}
    figures = Figures()
    print(f"size: {args.sites} sites x ~{args.patients} patients, {args.image_size}-px phantoms, "
          f"width {args.width}, MRI {args.mri_size}^3, US {args.us_size}^2, DSFR 64^2, "
          f"{args.rounds} rounds, 4-fold CV (deep)", flush=True)
    if not args.skip_fed:
        fed = fed_vs_pooled(args, root)
        report["fed_vs_pooled"] = fed
        fed_figures(figures, fed)
    if not args.skip_wire:
        measured = wire(args, root)
        report["wire"] = measured
        wire_figures(figures, measured)
        report["paper_sizes"] = paper_sizes()
        for model, sizes in report["paper_sizes"].items():
            figures.add(f"wire.{model}.full_size_mib", round(sizes["float32"] / 2**20, 1),
                        "one full-size (width 1) model in float32, computed; "
                        + ", ".join(f"{d} {b / 2**20:.1f} MiB" for d, b in sizes.items()))
    (root / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    figures.dump(args.json, details=report)
    print(f"written: {root / 'bench.json'}")
    return 0


def fed_figures(figures: Figures, fed: dict) -> None:
    total_f = total_p = 0.0
    for model, row in fed["models"].items():
        figures.add(f"quality.{model}.auc_federated", row["auc_federated"],
                    "pooled out-of-fold AUC from the sites' histograms")
        figures.add(f"quality.{model}.auc_pooled", row["auc_pooled"],
                    "same, centralized training")
        figures.add(f"quality.{model}.delta_auc", row["delta_auc"], "federated - pooled")
        if "dice_federated" in row:
            figures.add(f"quality.{model}.dice_federated", row["dice_federated"],
                        f"validation Dice, chosen round (pooled {_fmt(row['dice_pooled'])})")
        figures.add(f"overhead.{model}.wall_time_ratio", row["wall_time_ratio"],
                    f"federated / pooled training seconds: {row['seconds_federated']:.1f} / "
                    f"{row['seconds_pooled']:.1f}; target <= 1.15")
        figures.add(f"overhead.{model}.round_time_ratio", row["round_time_ratio"],
                    f"median round after the first: {row['round_seconds_federated']:.2f} / "
                    f"{row['round_seconds_pooled']:.2f} s")
        total_f += row["seconds_federated"]
        total_p += row["seconds_pooled"]
    if total_p:
        figures.add("overhead.all_models.wall_time_ratio", total_f / total_p,
                    f"federated / pooled training seconds, all CNNs: {total_f:.1f} / "
                    f"{total_p:.1f}; target <= 1.15")
    figures.add("overhead.run_seconds", fed["run_seconds"],
                "the whole Simulation Engine run (both modes)")
    peaks = fed["memory"]["peak_mib"]
    if "site_actor" in peaks:
        n = sum(p["label"] == "site_actor" for p in fed["memory"]["processes"])
        figures.add("memory.site_process_peak_rss_mib", round(peaks["site_actor"], 1),
                    f"peak RSS (VmHWM) of a Simulation Engine worker during CNN training, max "
                    f"over {n} workers (each serves one or more sites)")
    if "serverapp" in peaks:
        figures.add("memory.serverapp_peak_rss_mib", round(peaks["serverapp"], 1),
                    "peak RSS of the ServerApp process (it also trains the pooled reference)")


def wire_figures(figures: Figures, measured: dict) -> None:
    for model, by_dtype in measured.items():
        params = by_dtype["float32"]["parameter_bytes_float32"]
        for dtype, row in by_dtype.items():
            target = {"float32": "; target <= 1.02", "float16": "; target <= 0.52"}.get(dtype, "")
            figures.add(f"wire.{model}.{dtype}.reply_vs_parameters",
                        row["reply_message"] / params,
                        f"whole reply message a site sends per round ({row['reply_message']} B)"
                        f" / float32 parameter bytes of its {row['units']} unit(s) "
                        f"({params} B){target}")
            figures.add(f"wire.{model}.{dtype}.update_vs_parameters", row["up"] / params,
                        f"the weight update alone ({row['up']} B) / float32 parameter bytes; "
                        f"down (global weights) {row['down']} B")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
