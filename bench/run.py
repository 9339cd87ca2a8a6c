"""`make bench`: run every benchmark script, one after the other, and collect the figures.

Each script prints `name: value  (what it means)` lines (streamed here as they come) and
writes its figures with `--json`; this driver gathers them, with the machine, the commands
and each script's wall time, into bench/results.json. Long: the learning part alone is
3 seeds x a 4-stage Simulation Engine run (see docs/BENCHMARKS.md for its measured time);
`--quick` is a smoke test (1 seed, smaller sizes, numbers not comparable).

    .venv/bin/python bench/run.py [--quick] [--only learning,wire,rounds,extraction]
    .venv/bin/python bench/run.py --only learning     # issue 12: CNN quality, 3 seeds

`training` in `--only` stands for `learning,wire` (both parts of bench/training.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import machine

BENCH = Path(__file__).resolve().parent
# name -> (script, extra args, what it measures: issue 8's figures)
SCRIPTS = {
    "learning": ("training.py", ["--skip-wire"],
                 "CNN quality federated vs pooled over 3 seeds (issue 12), 1 federation "
                 "overhead, 7 memory"),
    "wire": ("training.py", ["--skip-learning"], "3 wire bytes"),
    "rounds": ("flower_rounds.py", [], "2 Cox quality, 4 statistics rounds, 5 scale"),
    "extraction": ("extraction.py", [], "6 extraction throughput"),
    "deployment": ("deployment.py", [], "9 deployment rounds: empty, statistics, CNN; where "
                   "a round's time goes; a statistics study deployment ÷ simulation"),
    "deployment-demo": ("deployment.py", ["--no-cnn", "--demo"],
                        "9 as `deployment`, plus make demo's whole study deployment ÷ "
                        "simulation (about 15 minutes more)"),
    "harmonization": ("harmonization.py", [], "issue 15: features that differ by site before "
                      "and after ComBat; radiomics LOSO and external AUC with and without "
                      "(3 seeds)"),
    "coverage": ("survival_coverage.py", ["--seeds", "5", "--sizes", "40"],
                 "Cox CI coverage of the simulated truth (not an issue-8 figure)"),
}
DEFAULT = ("learning", "wire", "rounds", "extraction", "deployment", "harmonization")
ALIASES = {"training": ("learning", "wire")}  # the whole of bench/training.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--only", default=",".join(DEFAULT),
                        help=f"scripts to run, comma-separated, of {', '.join(SCRIPTS)} "
                             "(training = learning,wire)")
    parser.add_argument("--out", type=Path, default=BENCH / "results.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other scripts' entries already in --out")
    args = parser.parse_args(argv)
    names = []
    for name in (n.strip() for n in args.only.split(",") if n.strip()):
        names += [n for n in ALIASES.get(name, (name,)) if n not in names]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        parser.error(f"unknown script(s) {unknown}; known: {', '.join(SCRIPTS)}")
    report: dict = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
                    "quick": args.quick, "machine": machine(), "scripts": {}, "figures": {}}
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text(encoding="utf-8"))
        # entries of the old all-in-one `training` script are replaced by learning/wire
        replaced = set(names) | ({"training"} if set(names) & set(ALIASES["training"])
                                 else set())
        report["scripts"] = {k: v for k, v in previous.get("scripts", {}).items()
                             if k not in replaced}
        report["figures"] = {k: v for k, v in previous.get("figures", {}).items()
                             if v.get("script") not in replaced}
        report["merged_from"] = {k: previous.get(k) for k in ("started", "machine")}
    failed = []
    with tempfile.TemporaryDirectory(prefix="feddlr-bench-") as tmp:
        for name in names:
            script, extra, what = SCRIPTS[name]
            figures_file = Path(tmp) / f"{name}.json"
            flags = ["--quick"] if args.quick and name != "coverage" else []
            shown = " ".join([".venv/bin/python", f"bench/{script}", *extra, *flags])
            command = [sys.executable, str(BENCH / script), *extra, *flags]
            if name != "coverage":  # survival_coverage.py prints only
                command += ["--json", str(figures_file)]
            print(f"== {name}: {what}\n$ {shown}", flush=True)
            started = time.perf_counter()
            rc = subprocess.call(command, cwd=BENCH.parent)
            seconds = time.perf_counter() - started
            entry = {"command": shown, "rc": rc, "seconds": round(seconds, 1), "measures": what}
            if figures_file.is_file():
                data = json.loads(figures_file.read_text(encoding="utf-8"))
                for key, figure in data.pop("figures", {}).items():
                    report["figures"][key] = {**figure, "script": name}
                entry["details"] = data
            if rc != 0:
                failed.append(name)
            report["scripts"][name] = entry
            print(f"== {name}: exit {rc} in {seconds:.0f} s", flush=True)
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["machine_after"] = {"load_average_1_5_15": machine().get("load_average_1_5_15")}
    args.out.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    print(f"written: {args.out} ({len(report['figures'])} figures"
          + (f"; failed: {', '.join(failed)}" if failed else "") + ")")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
