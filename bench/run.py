"""`make bench`: run every benchmark script, one after the other, and collect the figures.

Each script prints `name: value  (what it means)` lines (streamed here as they come) and
writes its figures with `--json`; this driver gathers them, with the machine, the commands
and each script's wall time, into bench/results.json. Long: about 10-20 minutes on 2 cores
(`--quick`: a few minutes, smaller sizes, numbers not comparable with docs/BENCHMARKS.md).

    .venv/bin/python bench/run.py [--quick] [--only training,rounds,extraction]
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
    "training": ("training.py", [], "1 federation overhead, 2 CNN quality, 3 wire, 7 memory"),
    "rounds": ("flower_rounds.py", [], "2 Cox quality, 4 statistics rounds, 5 scale"),
    "extraction": ("extraction.py", [], "6 extraction throughput"),
    "coverage": ("survival_coverage.py", ["--seeds", "5", "--sizes", "40"],
                 "Cox CI coverage of the simulated truth (not an issue-8 figure)"),
}
DEFAULT = ("training", "rounds", "extraction")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--only", default=",".join(DEFAULT),
                        help=f"scripts to run, comma-separated, of {', '.join(SCRIPTS)}")
    parser.add_argument("--out", type=Path, default=BENCH / "results.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other scripts' entries already in --out")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        parser.error(f"unknown script(s) {unknown}; known: {', '.join(SCRIPTS)}")
    report: dict = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
                    "quick": args.quick, "machine": machine(), "scripts": {}, "figures": {}}
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text(encoding="utf-8"))
        report["scripts"] = {k: v for k, v in previous.get("scripts", {}).items()
                             if k not in names}
        report["figures"] = {k: v for k, v in previous.get("figures", {}).items()
                             if v.get("script") not in names}
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
