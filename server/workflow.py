"""The study workflow: connect the sites, run the selected stages in order, write outputs."""

from __future__ import annotations

import logging
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from server.core import checkpoint
from server.core.disclosures import ledger_summary
from server.core.progress import report_round
from server.core.results import write_results
from server.core.transport import (
    Reply,
    SiteSetChanged,
    StageError,
    StageSkipped,
    StudyError,
    Transport,
)
from server.report.page import write_report
from server.stages.survival import needs_label as survival_needs_label
from server.stages.validation import thresholds
from server.training.engine import site_failures
from shared import schema, settings, stages
from shared.config import STAGE_NEEDS, STAGES, ConfigError, Earlier, StudyConfig

log = logging.getLogger("feddlr")



def _runner(reference: str) -> Any:
    """A stage's server half (its declaration's `runner`), imported when the stage runs."""

    def run(*args: Any) -> dict[str, Any]:
        return stages.load(reference)(*args)

    run.__name__ = reference.rsplit(":", 1)[-1]
    return run


# Each stage's runner, roles and whether it reads what earlier stages left (`Earlier`: the
# probabilities at the sites — when those stages were taken from a checkpoint, their files
# carry the earlier run's id — and the validation stage's thresholds), from shared.stages.
# A stage with roles gets only the sites that declared one of them in their site.yaml (from
# the handshake: results["run"]["sites"]): the model stages fit on `train` sites and score
# `external` ones; a survival-only cohort (paper 1's Dataset 3) is in the cohort table and
# the survival stage alone.
STAGE_RUNNERS = {s.name: _runner(s.runner) for s in stages.STAGES}
READS_EARLIER = tuple(s.name for s in stages.STAGES if s.reads_earlier)
STAGE_ROLES: dict[str, tuple[str, ...]] = {s.name: s.roles for s in stages.STAGES
                                           if s.roles is not None}
__all__ = ["StudyError", "run_study"]


def run_study(transport: Transport, config: StudyConfig, run_id: str = "") -> dict[str, Any]:
    """Run every selected stage and write results.json and report.html to `config.out_dir`."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"run": {"run_id": run_id, "started": _now(),
                                       "schema_version": schema.SCHEMA_VERSION,
                                       "config": config.as_dict(), "stages": {}}}
    done: dict[str, dict] = {}  # completed stages, as checkpointed after each one
    try:
        check_settings(config)
        sites = connect(transport, config, results)
        hashes = checkpoint.site_hashes(results)
        if config.resume:
            done.update(checkpoint.load(out, config, hashes, results))
        for stage in [s for s in STAGES if s in config.stages]:
            if stage in done:
                results[stage] = done[stage]["result"]
                results["run"]["stages"][stage] = {**done[stage]["status"],
                                                   "resumed_from": done[stage]["run_id"]}
                log.info("[%s] taken from the checkpoint (run %s)", stage, done[stage]["run_id"])
                continue
            status = _run_stage(stage, transport, config, sites, results)
            results["run"]["stages"][stage] = status
            if status["status"] == "ok":
                done[stage] = {"status": status, "result": results[stage], "run_id": run_id}
                checkpoint.save(out, config, hashes, done, run_id)
            sites = _still_usable(transport, config, sites, results, stage)
    except (StudyError, ConfigError) as err:
        what = "configuration: " if isinstance(err, ConfigError) else ""
        results["run"].update(status="stopped", reason=f"{what}{err}")
        raise
    else:
        results["run"].update(run_status(results["run"]["stages"], config.stages))
    finally:
        if "status" not in results["run"]:
            results["run"].update(status="stopped", reason="the server stopped unexpectedly")
        results["run"]["finished"] = _now()
        results["run"]["wire"] = getattr(transport, "wire", {})
        results["run"]["ledger"] = ledger_summary(results["run"]["wire"])
        results["provenance"] = provenance(config, results)
        write_results(results, out / "results.json")
        write_report(results, out)
        log.info("wrote %s and %s", out / "results.json", out / "report.html")
    return results


def check_settings(config: StudyConfig) -> None:
    """Parse every setting the requested stages will read, with the stages' own parsers, so
    a bad value (`cv-folds=1`, `rounds=-1`, `lr=dlmri=0.1`) stops the study before any site
    is contacted (ConfigError) instead of failing its stage later."""
    for stage in config.stages:
        parse = stages.stage(stage).settings
        if parse is not None:
            stages.load(parse)(config.settings)


def earlier_results(results: dict[str, Any]) -> Earlier:
    """What the stages so far leave for the next one, from `results` alone (so a resumed
    study, whose checkpointed stages are back in `results`, passes the same)."""
    runs = tuple(s["resumed_from"] for s in results["run"]["stages"].values()
                 if s.get("resumed_from"))
    found = thresholds(results["validation"]) if "validation" in results else {}
    return Earlier(prediction_runs=runs, thresholds=found)


def run_status(stages: dict[str, dict[str, Any]], requested: tuple[str, ...]
               ) -> dict[str, Any]:
    """`run.status` and `run.reason`: `ok` only when every requested stage is ok (or taken
    from a checkpoint); otherwise `incomplete`, naming each stage that failed or was skipped.
    (A study that stopped — too few sites — is `stopped`.)"""
    bad = {s: stages.get(s, {"status": "not run"}) for s in requested
           if stages.get(s, {}).get("status") != "ok"}
    if not bad:
        return {"status": "ok", "reason": None}
    return {"status": "incomplete", "reason": "; ".join(
        f"{s} {v['status']}" + (f": {v['reason']}" if v.get("reason") else "")
        for s, v in bad.items())}


def connect(transport: Transport, config: StudyConfig, results: dict[str, Any]) -> list[str]:
    """Handshake; refuse sites on another schema major version; enforce min-sites."""
    replies = transport.handshake({"task": config.task if study_needs_label(config) else ""})
    report_round("handshake", 1, 1, replies)
    rows = [_site_row(site_id, reply) for site_id, reply in sorted(replies.items())]
    results["run"]["sites"] = rows
    found = ExclusionTap(transport)  # rows of clinical.csv the sites left out, by reason
    for site_id, reply in replies.items():
        found.note(site_id, reply.payload)
    if found.excluded:
        results["run"]["excluded"] = found.excluded
    usable = [row["site_id"] for row in rows if row["status"] == schema.STATUS_OK]
    if len(usable) < config.min_sites:
        raise StudyError(f"only {len(usable)} usable site(s), min-sites is {config.min_sites}: "
                         + "; ".join(f"{r['site_id']}: {r['reason']}" for r in rows
                                     if r["status"] != schema.STATUS_OK))
    return usable


def study_needs_label(config: StudyConfig) -> bool:
    """Whether any requested stage reads the task label (`STAGE_NEEDS`, and a survival stage
    that groups or adjusts by it): if none does, sites need no label columns."""
    return any("label" in STAGE_NEEDS[stage] or (stage == "survival"
                                                 and survival_needs_label(config))
               for stage in config.stages)


def _site_row(site_id: str, reply: Reply) -> dict[str, Any]:
    p = reply.payload
    row: dict[str, Any] = {
        "site_id": site_id,
        "roles": list(p.get("site.roles", [])),
        "n_patients": _count(p.get("counts.n_patients")),
        "n_excluded": _count(p.get("counts.n_excluded")),
        "label_counts": [_count(c) for c in p.get("counts.label_counts", [])],
        "status": reply.status,
        "reason": reply.reason,
        "schema_version": p.get("site.schema_version"),
        "feddlr_version": p.get("site.feddlr_version"),
        "data_sha256": p.get("site.data_sha256"),
    }
    version = row["schema_version"]
    if reply.ok and (version is None or not schema.compatible(str(version))):
        row["status"] = schema.STATUS_REFUSED
        row["reason"] = (f"message schema {version} is incompatible with the server's "
                         f"{schema.SCHEMA_VERSION} (major versions differ); upgrade the site")
    if row["n_excluded"] is not None and row["n_excluded"] > 0:
        log.info("%s: %d patient(s) excluded (reasons in the site's audit/site.log)",
                 site_id, row["n_excluded"])
    return row


def _count(value: Any) -> int | None:
    """A released count; None where it was suppressed (−1) or not sent."""
    if value is None:
        return None
    count = int(np.asarray(value).reshape(-1)[0])
    return None if count < 0 else count


def _run_stage(stage: str, transport: Transport, config: StudyConfig, sites: list[str],
               results: dict[str, Any]) -> dict[str, Any]:
    sites, left_out = sites_for_stage(stage, sites, results["run"]["sites"])
    if not sites:
        wanted = " or ".join(repr(r) for r in STAGE_ROLES[stage])
        log.info("[%s] skipped: no usable site has role %s", stage, wanted)
        return {"status": "skipped", "reason": f"no usable site has role {wanted}"}
    status = _stage_status(stage, transport, config, sites, results)
    if left_out:
        status["sites_left_out"] = left_out
    return status


def sites_for_stage(stage: str, sites: list[str], rows: list[dict[str, Any]]
                    ) -> tuple[list[str], dict[str, str]]:
    """The usable sites the stage asks (`STAGE_ROLES`), and why each other one is not asked."""
    wanted = STAGE_ROLES.get(stage)
    if wanted is None:
        return sites, {}
    roles = {row["site_id"]: list(row.get("roles", [])) for row in rows}
    asked = [s for s in sites if set(wanted) & set(roles.get(s, []))]
    left_out = {s: f"roles [{', '.join(roles.get(s, []))}]: the {stage} stage asks only "
                   f"sites with role {' or '.join(wanted)}" for s in sites if s not in asked}
    return asked, left_out


def _stage_status(stage: str, transport: Transport, config: StudyConfig, sites: list[str],
                  results: dict[str, Any]) -> dict[str, Any]:
    log.info("[%s] started with %d sites", stage, len(sites))
    started = time.monotonic()
    transport = tap = ExclusionTap(transport)
    try:
        if stage in READS_EARLIER:
            results[stage] = STAGE_RUNNERS[stage](transport, config, sites,
                                                  earlier_results(results))
        else:
            results[stage] = STAGE_RUNNERS[stage](transport, config, sites)
        # the block's `sites`: {site: {"status", "reason"}} (a malformed one is a bug below)
        failures = site_failures(results[stage])
        _mark_sites(results, stage, failures)
    except (StageError, SiteSetChanged) as err:
        # a site set change the stage did not restart on is the stage's failure, not the study's
        log.error("[%s] failed: %s", stage, err)
        return {"status": "failed", "reason": str(err),
                "seconds": round(time.monotonic() - started, 3)}
    except StageSkipped as err:
        log.info("[%s] skipped: %s", stage, err)
        return {"status": "skipped", "reason": str(err)}
    except StudyError:
        raise
    except Exception as err:  # a server bug must end this stage, not the study's record of it
        log.exception("[%s] failed with an internal error", stage)
        results.pop(stage, None)
        return {"status": "failed", "reason": f"internal error: {type(err).__name__}: {err}",
                "seconds": round(time.monotonic() - started, 3)}
    seconds = round(time.monotonic() - started, 3)
    excluded = {"excluded": tap.excluded} if tap.excluded else {}
    for reason, counts in tap.excluded.items():
        log.info("[%s] patients left out (%s): %s", stage, reason, ", ".join(
            f"{site} {'<k' if n is None else n}" for site, n in counts.items()))
    if failures:  # the stage went on without them: its result is not what was asked for
        reason = "; ".join(f"{site} failed: {why}" for site, why in failures.items())
        log.error("[%s] done in %.1fs without %d site(s): %s", stage, seconds,
                  len(failures), reason)
        return {"status": "partial", "reason": reason, "sites_failed": failures,
                "seconds": seconds, **excluded}
    log.info("[%s] done in %.1fs", stage, seconds)
    return {"status": "ok", "seconds": seconds, **excluded}


# A site's reply tells which of its patients a stage left out, by reason: its `excluded`
# statistic, `excluded.reasons` (list of str) and `excluded.counts` (int per reason, −1 for
# a count its policy suppressed: 1 … min_cell_count−1). A site that sends only
# `counts.n_failed` (images it could not read or extract) is counted under FAILED_IMAGES.
FAILED_IMAGES = "images could not be read or extracted (reasons in audit/site.log at the site)"


class ExclusionTap:
    """A stage's transport, noting from every reply the patients the site left out of the
    stage, by reason: `excluded[reason][site]` = count (None: suppressed at the site). A
    site that reports the same reason in several replies counts once (its largest)."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner
        self.excluded: dict[str, dict[str, int | None]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def handshake(self, query: schema.Payload) -> dict[str, Reply]:
        return self._inner.handshake(query)

    def ask(self, action: str, query: Any, sites: Any) -> dict[str, Reply]:
        replies = self._inner.ask(action, query, sites)
        for site, reply in replies.items():
            payloads = [reply.payload]
            if action == schema.BATCH and reply.ok:
                try:
                    payloads = [p for _, p in schema.batch_parts(reply.payload).values()]
                except schema.SchemaError:
                    payloads = []
            for payload in payloads:
                self.note(site, payload)
        return replies

    def note(self, site: str, payload: schema.Payload) -> None:
        """Note the reply's patients left out, by reason."""
        reasons = payload.get("excluded.reasons")
        if reasons is not None:
            reasons = [reasons] if isinstance(reasons, str) else [str(r) for r in reasons]
            counts = np.asarray(payload.get("excluded.counts", []), dtype=np.int64).reshape(-1)
            for reason, count in zip(reasons, counts, strict=False):
                self._add(reason, site, int(count))
        elif "counts.n_failed" in payload:
            count = int(np.asarray(payload["counts.n_failed"]).reshape(-1)[0])
            if count != 0:
                self._add(FAILED_IMAGES, site, count)

    def _add(self, reason: str, site: str, count: int) -> None:
        if count == 0:
            return
        per_site = self.excluded.setdefault(reason, {})
        value = None if count < 0 else count
        known = per_site.get(site)
        per_site[site] = value if known is None else max(known, value or 0)


def _mark_sites(results: dict[str, Any], stage: str,
                failures: dict[str, str] | None = None) -> None:
    """Carry a site's failure or refusal in a stage into `run.sites[]`; a site in
    `failures` (fallen out of the stage's training or scoring) is `failed` in the stage's
    own `sites` too."""
    stage_sites = results[stage].setdefault("sites", {}) if failures else \
        results[stage].get("sites", {})
    for site, why in (failures or {}).items():
        stage_sites[site] = {**stage_sites.get(site, {}), "status": schema.STATUS_FAILED,
                             "reason": why}
    for row in results["run"]["sites"]:
        info = stage_sites.get(row["site_id"])
        if info and info.get("status") not in (None, schema.STATUS_OK) and row["status"] == "ok":
            row["status"] = info["status"]
            row["reason"] = f"{stage}: {info.get('reason')}"


def _still_usable(transport: Transport, config: StudyConfig, sites: list[str],
                  results: dict[str, Any], stage: str) -> list[str]:
    """The sites later stages may ask: a site dropped in `stage` (no reply in time, SuperNode
    gone) is out for the rest of the run; below `min-sites` the study stops."""
    rows = {row["site_id"]: row for row in results["run"]["sites"]}
    for site, reason in getattr(transport, "dropped", {}).items():
        row = rows.get(site)
        if row is not None and row["status"] != schema.STATUS_DROPPED:
            row["status"], row["reason"] = schema.STATUS_DROPPED, f"{stage}: {reason}"
    left = [s for s in sites if rows[s]["status"] != schema.STATUS_DROPPED]
    if len(left) < config.min_sites:
        raise StudyError(
            f"only {len(left)} usable site(s) left after {stage}, min-sites is "
            f"{config.min_sites}: " + "; ".join(f"{s}: {rows[s]['reason']}" for s in sites
                                                if s not in left))
    return left


def provenance(config: StudyConfig, results: dict[str, Any]) -> dict[str, Any]:
    packages = ["feddlr", "flwr", "numpy", "scipy", "scikit-learn", "lifelines", "torch",
                "monai", "pyradiomics", "SimpleITK"]
    return {
        "config": config.as_dict(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in packages},
        "site_data_sha256": {r["site_id"]: r.get("data_sha256")
                             for r in results["run"].get("sites", [])},
    }


def record_bad_config(run_config: dict[str, Any], error: ConfigError, run_id: str) -> None:
    """A run config that does not parse still leaves a results.json saying why (where its
    `out-dir` is readable), so a consortium's scripts read the same status as for any stop."""
    try:
        out = Path(settings.value(run_config, "out-dir"))
        out.mkdir(parents=True, exist_ok=True)
    except (ConfigError, OSError):
        return
    now = _now()
    write_results({"run": {"run_id": run_id, "started": now, "finished": now,
                           "schema_version": schema.SCHEMA_VERSION, "stages": {},
                           "status": "stopped", "reason": f"configuration: {error}"}},
                  out / "results.json")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
