"""`feddlr`: simulate a cohort, check a site folder, run a study in the Simulation Engine,
audit what left a site."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="feddlr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="write a synthetic multi-site cohort")
    sim.add_argument("--sites", type=int, default=3)
    sim.add_argument("--patients", type=int, default=40, help="patients per site (about)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--effect-size", type=float, default=1.0, metavar="X",
                     help="strength of the HER2 signal in the images and tumour size (>= 0; "
                          "0 = images independent of HER2). The default 1 gives an attainable "
                          "her2-positive AUC of about 0.90 (0.5: 0.74, 1.5: 0.97, 2: 0.99; "
                          "her2-low 0.75 at 1); truth.json records it under 'ceiling'")
    sim.add_argument("--image-size", type=int, default=96, metavar="N",
                     help="MRI in-plane FOV of N x 0.8 mm, about N voxels across at 0.8 mm "
                          "(>= 16; sites differ in spacing, so in matrix); tumours scale "
                          "with it so the largest spans at most 1/2.5 of the FOV")
    sim.add_argument("--external-sites", type=int, default=0, metavar="K",
                     help="the last K sites get roles [external, survival]: held out of "
                          "training, for external validation (0 <= K < --sites)")
    sim.add_argument("--design", choices=("sites", "paper1"), default="sites",
                     help="sites (default): --sites folders site-<i>, the last "
                          "--external-sites external; paper1: paper 1's three datasets, "
                          "centre-1 (train), centre-2 (external validation) and centre-3 "
                          "(survival only: HER2-negative patients on a dedicated breast MRI "
                          "system), --patients x 1.25, 1, 0.75")
    sim.add_argument("--out", type=Path, required=True)

    check = sub.add_parser("check-site", help="report every problem in a site folder")
    check.add_argument("site_dir", type=Path, nargs="+",
                       help="a site folder, or a folder of site folders")
    check.add_argument("--task", default=None)
    check.add_argument("--stages", default=None, metavar="S,…",
                       help="check only what these stages need (default: everything)")

    run = sub.add_parser("run", help="run the study on site folders (Flower Simulation Engine)")
    run.add_argument("--sites-dir", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                     help="override a run-config key (repeatable)")
    run.add_argument("--num-cpus", type=int, default=1,
                     help="CPU cores per simulated site (Flower client resources)")
    run.add_argument("--num-gpus", type=float, default=0.0,
                     help="GPUs per simulated site, e.g. 0.5 to share one GPU by two sites")
    run.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                     help="run the simulated sites on this running Ray cluster (the head's "
                          "GCS address, as `ray start --head --port PORT` prints)")

    audit = sub.add_parser("audit", help="what left a site, per run: messages, statistics, "
                           "refusals with reasons, the disclosure ledger (from its own logs)")
    audit.add_argument("site_dir", type=Path)
    audit.add_argument("--html", type=Path, default=None, metavar="PATH",
                       help="also write the report as one HTML page")
    audit.add_argument("--run", default=None, metavar="RUN_ID", help="only this run")
    audit.add_argument("--json", action="store_true", help="print JSON instead of text")

    args = parser.parse_args(argv)
    if args.command == "audit":
        from client.egress.audit_report import main as audit_main

        return audit_main(args.site_dir, args.html, args.run, args.json)
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "check-site":
        from client.site.check import main as check_main

        task = ["--task", args.task] if args.task else []
        stages = ["--stages", args.stages] if args.stages else []
        return check_main([str(d) for d in args.site_dir] + task + stages)
    return _run(args)


def _simulate(args: argparse.Namespace) -> int:
    from simulation.cohort import PAPER1_SITES, simulate_cohort
    from simulation.console import patient_progress

    try:
        simulate_cohort(args.out, n_sites=args.sites, n_patients=args.patients, seed=args.seed,
                        effect_size=args.effect_size, image_size=args.image_size,
                        external_sites=args.external_sites, progress=patient_progress(),
                        design=args.design)
    except ValueError as err:
        print(f"feddlr simulate: {err}", file=sys.stderr)
        return 2
    n_sites = len(PAPER1_SITES) if args.design == "paper1" else args.sites
    print(f"wrote {n_sites} site folders to {args.out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """Exit 0 only when every requested stage is ok (`run.status` in results.json); 1 when
    a stage failed or was skipped, or the study stopped; 2 for usage or configuration."""
    from shared.config import ConfigError
    from simulation.launcher import LaunchError, check_run_config, run_simulation

    overrides = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"feddlr run: -c expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = value.strip()
    try:
        check_run_config(overrides)
    except ConfigError as err:
        print(f"feddlr run: {err}", file=sys.stderr)
        return 2
    try:
        run_simulation(args.sites_dir, args.out, overrides, num_cpus_per_site=args.num_cpus,
                       num_gpus_per_site=args.num_gpus, ray_address=args.ray_address)
    except LaunchError as err:
        print(f"feddlr run: {err}", file=sys.stderr)
        return 1
    run = json.loads((args.out / "results.json").read_text(encoding="utf-8")).get("run", {})
    print(summary(run))
    print(f"results: {args.out / 'results.json'}\nreport:  {args.out / 'report.html'}")
    return 0 if run.get("status") == "ok" else 1


def summary(run: dict) -> str:
    """The closing lines of a run: one per stage (status, seconds, reason), one per site
    that did not serve, and the run's status."""
    lines = ["stage        status      seconds  reason"]
    for stage, info in run.get("stages", {}).items():
        seconds = info.get("seconds")
        lines.append(f"{stage:<12} {info.get('status', '?'):<10} "
                     f"{'' if seconds is None else f'{seconds:8.1f}':>8}  "
                     f"{info.get('reason') or ''}".rstrip())
    for site in run.get("sites", []):
        if site.get("status") != "ok":
            lines.append(f"site {site.get('site_id')}: {site.get('status')}: "
                         f"{site.get('reason') or ''}".rstrip())
    lines.append(f"run status: {run.get('status', 'unknown')}"
                 + (f" ({run['reason']})" if run.get("reason") else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
