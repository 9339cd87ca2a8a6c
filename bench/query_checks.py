"""What checking the coordinator's queries costs in a study (issue 25), per stage:

- the time each site spent checking queries against their declarations (`check_ms` of each
  record in its audit log; the slowest site) ÷ the stage's wall time, in one run;
- messages per stage, and the queries and pieces the sites refused;
- with `--before` (results.json of the same study at an earlier commit, e.g. before issue 25),
  each stage's wall time and messages then and now.

Run after `make demo` (the defaults are its folders):

    .venv/bin/python bench/query_checks.py [--sites data/demo] [--results runs/demo/results.json]
        [--before OLD/results.json] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import machine
from bench.ledger import stage_of


def audit_checks(sites: Path, run_id: str) -> tuple[dict, Counter, Counter]:
    """(site → stage → Σ check_ms, stage → whole queries refused, stage → pieces refused)
    over the audit records of one run."""
    checks: dict[str, dict[str, float]] = {}
    refused, pieces = Counter(), Counter()
    for log in sorted(sites.glob("*/audit/egress.jsonl")):
        per_stage: dict[str, float] = defaultdict(float)
        for line in log.read_text().splitlines():
            record = json.loads(line)
            stage = stage_of(str(record.get("message_type", "")), "dsfr+deep")
            if str(record.get("run_id")) != run_id or stage is None:
                continue
            per_stage[stage] += float(record.get("check_ms") or 0.0)
            refused[stage] += record.get("status") == "refused"
            pieces[stage] += len(record.get("refused") or {})
        checks[log.parent.parent.name] = dict(per_stage)
    return checks, refused, pieces


def messages(results: dict) -> Counter:
    """stage → messages the server sent (run.wire)."""
    out: Counter = Counter()
    for entries in results["run"]["wire"].values():
        for entry in entries:
            stage = stage_of(str(entry.get("message_type", "")), "dsfr+deep")
            if stage:
                out[stage] += 1
    return out


def seconds(results: dict) -> dict[str, float]:
    out = {s: float(v.get("seconds") or 0) for s, v in results["run"]["stages"].items()}
    out["dsfr+deep"] = out.get("dsfr", 0) + out.get("deep", 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=Path, default=Path("data/demo"))
    parser.add_argument("--results", type=Path, default=Path("runs/demo/results.json"))
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    now = json.loads(args.results.read_text())
    then = json.loads(args.before.read_text()) if args.before else None
    checks, refused, pieces = audit_checks(args.sites, str(now["run"]["run_id"]))
    wall, sent = seconds(now), messages(now)
    wall0, sent0 = (seconds(then), messages(then)) if then else ({}, Counter())
    print(f"# query checks — {machine()}")
    print("| stage | s before | s now | messages before | now | declaration checks, slowest "
          "site ms | ÷ stage time | queries refused | pieces refused |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = {}
    for stage in [s for s in now["run"]["stages"] if s not in ("dsfr", "deep")] + ["dsfr+deep"]:
        worst = max((c.get(stage, 0.0) for c in checks.values()), default=0.0)
        share = worst / 1000 / wall[stage] if wall.get(stage) else 0.0
        rows[stage] = {"seconds_before": wall0.get(stage), "seconds": wall.get(stage),
                       "messages_before": sent0.get(stage), "messages": sent[stage],
                       "check_ms": round(worst, 2), "check_share": share,
                       "refused_queries": refused[stage], "refused_pieces": pieces[stage]}
        before = f"{wall0[stage]:.1f}" if stage in wall0 else "—"
        print(f"| {stage} | {before} | {wall.get(stage, 0):.1f} | {sent0.get(stage, '—')} | "
              f"{sent[stage]} | {worst:.1f} | {share:.3%} | {refused[stage]} | "
              f"{pieces[stage]} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "stages": rows}, indent=2))


if __name__ == "__main__":
    main()
