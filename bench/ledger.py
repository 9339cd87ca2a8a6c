"""What the sites' disclosure ledgers cost and did in a study (issue 16): per stage, the
time each site's guard spent in its ledger (from the site's own audit log, `ledger.ms` of
each reply) divided by the stage's wall time (results.json `run.stages`), the releases
compared and refused, and each refusal's reason (`run.ledger`).

Run after `make demo` (the defaults are its folders), or on any study's sites and results:

    .venv/bin/python bench/ledger.py [--sites data/demo] [--results runs/demo/results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import machine

# message type → the stage that sends it (the CNN rounds: the model's stage)
PREFIXES = {"query.cohort_": "cohort", "query.radiomics_": "radiomics",
            "query.survival_": "survival", "query.validation_": "validation",
            "query.fusion_": "fusion", "query.dsfr_features": "dsfr",
            "train.dsfr": "dsfr", "evaluate.dsfr": "dsfr", "train.dl_": "deep",
            "evaluate.dl_": "deep"}


def stage_of(message_type: str, training_stage: str) -> str | None:
    for prefix, stage in PREFIXES.items():
        if message_type.startswith(prefix):
            return stage
    if message_type in ("query.train_setup", "query.train_score"):
        return training_stage  # dsfr and deep both send these: counted with the CNN stages
    return None


def audit_costs(sites: Path) -> dict[str, dict[str, float]]:
    """site → stage → ledger milliseconds, from each site's audit log."""
    out: dict[str, dict[str, float]] = {}
    for log in sorted(sites.glob("*/audit/egress.jsonl")):
        per_stage: dict[str, float] = defaultdict(float)
        for line in log.read_text().splitlines():
            record = json.loads(line)
            stage = stage_of(str(record.get("message_type", "")), "dsfr+deep")
            if stage and "ledger" in record:
                per_stage[stage] += float(record["ledger"]["ms"])
        out[log.parent.parent.name] = dict(per_stage)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=Path, default=Path("data/demo"))
    parser.add_argument("--results", type=Path, default=Path("runs/demo/results.json"))
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    seconds = {s: float(v.get("seconds") or 0) for s, v in results["run"]["stages"].items()}
    seconds["dsfr+deep"] = seconds.get("dsfr", 0) + seconds.get("deep", 0)
    costs = audit_costs(args.sites)
    print(f"# disclosure ledger — {machine()}")
    print(f"sites {args.sites}, results {args.results}")
    print("| stage | stage s | ledger ms, slowest site | ÷ stage time |")
    print("| --- | --- | --- | --- |")
    for stage in [*results["run"]["stages"], "dsfr+deep"]:
        worst = max((c.get(stage, 0.0) for c in costs.values()), default=0.0)
        if worst and seconds.get(stage):
            print(f"| {stage} | {seconds[stage]:.1f} | {worst:.1f} | "
                  f"{worst / 1000 / seconds[stage]:.2%} |")
    ledger = results["run"]["ledger"]
    print(f"releases compared {ledger['checked']}, refused {ledger['refused']}")
    for site, entry in ledger["sites"].items():
        for refusal in entry["refusals"]:
            print(f"  {site} {refusal['type']} {refusal['statistic']}: {refusal['reason']}")


if __name__ == "__main__":
    main()
