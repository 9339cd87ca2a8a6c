"""Stage checkpoints in OUT/checkpoint.json, and resuming from them (`-c resume=true`).

After every completed stage the workflow writes the stage's results, with what they were
computed from: the study fingerprint (every run-config value that changes what is computed,
i.e. all but `shared.config.RUNTIME_FIELDS`) and each usable site's data hash from the
handshake. A run with `resume=true` and the same `out-dir` takes a checkpointed stage as
done when the fingerprint is the same and the same sites answer the handshake with the same
data hashes; otherwise it says why in `run.resume` and runs every stage again, since exact
statistics must come from one site set and one version of each site's data.

The file is replaced atomically (written beside, then renamed), so a server killed while
writing it leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from server.core.results import plain  # the results' own JSON conversion
from shared import schema
from shared.config import RUNTIME_FIELDS, StudyConfig

log = logging.getLogger("feddlr")

CHECKPOINT = "checkpoint.json"
FORMAT = 1


def fingerprint(config: StudyConfig) -> dict[str, Any]:
    """What the study computes: the config without the keys that only steer the run."""
    data = json.loads(json.dumps(asdict(config), default=list))
    return {k: v for k, v in data.items() if k not in RUNTIME_FIELDS}


def site_hashes(results: dict[str, Any]) -> dict[str, str | None]:
    """Data hash of every site that could serve after the handshake (call it right after
    the handshake: stages change the rows' status later)."""
    return {row["site_id"]: row.get("data_sha256") for row in results["run"].get("sites", [])
            if row.get("status") == schema.STATUS_OK}


def load(out: Path, config: StudyConfig, sites: dict[str, str | None],
         results: dict[str, Any]) -> dict[str, dict]:
    """The stages a resumed run may take from `out/checkpoint.json` (empty if none), given
    this run's handshake `sites` (site -> data hash), and `results["run"]["resume"]` saying
    what was used or why nothing was."""
    path = out / CHECKPOINT
    info: dict[str, Any] = {"checkpoint": str(path), "stages": []}
    results["run"]["resume"] = info
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        info["reason"] = "no checkpoint yet: every stage runs"
        return {}
    except (OSError, ValueError) as err:
        info["reason"] = f"checkpoint unreadable ({err}): every stage runs"
        return {}
    reason = _mismatch(saved, config, sites)
    if reason:
        info["reason"] = f"{reason}: every stage runs again"
        log.warning("resume: %s", info["reason"])
        return {}
    stages = dict(saved.get("stages", {}))  # all of them, so the next save keeps them all
    used = sorted(s for s in stages if s in config.stages)
    info.update(from_run_id=saved.get("run_id"), stages=used)
    log.info("resume: taking %s from the checkpoint of run %s", ", ".join(used) or "nothing",
             saved.get("run_id"))
    return stages


def save(out: Path, config: StudyConfig, sites: dict[str, str | None], stages: dict[str, dict],
         run_id: str) -> None:
    """Write every completed stage (`stages`: name -> {"status", "result", "run_id"})."""
    record = {"format": FORMAT, "run_id": run_id, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "fingerprint": fingerprint(config), "sites": sites,
              "stages": plain(stages)}
    path = out / CHECKPOINT
    tmp = path.with_name(f".{CHECKPOINT}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _mismatch(saved: dict[str, Any], config: StudyConfig,
              now_sites: dict[str, str | None]) -> str | None:
    if saved.get("format") != FORMAT:
        return f"checkpoint format {saved.get('format')!r} is not {FORMAT}"
    then, now = saved.get("fingerprint", {}), fingerprint(config)
    changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
    if changed:
        return f"run config changed since the checkpoint ({', '.join(changed)})"
    then_sites = saved.get("sites", {})
    problems = [f"{s} is missing" for s in sorted(set(then_sites) - set(now_sites))]
    problems += [f"{s} is new" for s in sorted(set(now_sites) - set(then_sites))]
    problems += [f"{s}'s data changed" for s in sorted(set(then_sites) & set(now_sites))
                 if then_sites[s] != now_sites[s]]
    if problems:
        return "the sites differ from the checkpoint's (" + "; ".join(problems) + ")"
    return None
