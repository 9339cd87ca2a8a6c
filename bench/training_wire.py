"""The wire part of bench/training.py: the bytes a site sends per CNN round, per model and
wire dtype, against the float32 parameter bytes of the units it trains."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.figures import Figures
from neural.networks import NetworkSpec
from server.workflow import run_study
from shared import fedavg
from shared.config import StudyConfig, stage_settings
from simulation.cohort import simulate_cohort
from simulation.in_process import InProcessTransport


def wire_config(seed: int, dtype: str) -> dict[str, str]:
    """One round of one local step per model (the bytes do not depend on the training)."""
    return {"rounds": "1", "local-steps": "1", "wire-dtype": dtype, "cv-folds": "3",
            "gradcam-patients": "0", "seed": str(seed)}


def wire(args: argparse.Namespace, root: Path) -> dict:
    sites = root / "wire-sites"
    seed = args.seeds[0]
    simulate_cohort(sites, n_sites=2, n_patients=24, seed=seed, image_size=24)
    folders = sorted(p for p in sites.iterdir() if (p / "site.yaml").is_file())
    out: dict[str, dict] = {}
    for dtype in fedavg.WIRE_DTYPES:
        config = StudyConfig(sites_dir=str(sites), out_dir=str(root / f"wire-{dtype}"),
                             stages=("dsfr", "deep"),
                             settings=stage_settings(wire_config(seed, dtype)))
        transport = InProcessTransport(folders)
        results = run_study(transport, config, run_id=f"wire-{dtype}")
        models = {"dsfr": results["dsfr"]["training"], **results["deep"]["models"]}
        for model, result in models.items():
            site = result["sites"][0]
            message = next(m for m in transport.wire[site]
                           if m["message_type"] == f"train.{model}")
            width = float(result["plan"]["width"])
            out.setdefault(model, {})[dtype] = {
                "down": result["wire"]["per_round"][site]["down"][0],
                "up": result["wire"]["per_round"][site]["up"][0],
                "reply_message": message["bytes"],
                "units": len(result["units"]),
                "width": width,
                "parameters": result["network"]["parameters"],
                "parameter_bytes_float32": len(result["units"]) * parameter_bytes(
                    model, width, "float32")}
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
