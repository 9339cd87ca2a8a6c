"""One handler per query action; `serve` is the path every query takes at a site:
load the folder → run the handler → egress guard (policy + audit) → payload."""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from client.egress.guard import EgressGuard, PolicyRefusal, Statistic
from client.site.folder import CLINICAL_CSV, SITE_ID_PATTERN, SITE_YAML, SiteError, present_needs
from client.site.session import AUDIT_DIR, EGRESS_LOG, SiteSession, open_session
from shared import queries, schema, stages
from shared.labels import TASKS
from shared.policy import PrivacyPolicy
from shared.queries import QueryRejected
from shared.schema import Payload

Handler = Callable[[SiteSession, Payload], list[Statistic]]
VARIANT = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
RUN_VARIANT = "run-variant"  # query key: one of several fits of a run (e.g. a LOSO fit)


def _lazy(reference: str) -> Handler:
    """The site function a stage declares for an action (shared.stages), imported on first
    use. In a deployment every message runs in a fresh ClientApp process, so importing only
    the stage a query needs (not pyradiomics for a cohort query) takes seconds off each
    round."""

    def handler(session: SiteSession, query: Payload) -> list[Statistic]:
        return stages.load(reference)(session, query)

    handler.__qualname__ = handler.__name__ = reference.replace("client.", "").replace(":", ".")
    return handler


# The study's handshake, and every stage's actions as its declaration names them
HANDLERS: dict[str, Handler] = {
    schema.HANDSHAKE: _lazy("client.stages.handshake:handshake"),
    **{action: _lazy(reference) for action, reference in stages.handlers().items()},
}


def serve(site_root: Path, action: str, query: Payload, run_id: str = "") -> Payload:
    """Answer one query. Always returns a payload with `status`; never raises."""
    try:
        if action == schema.BATCH:
            return _serve_batch(Path(site_root), query, run_id)
        return _serve(Path(site_root), action, query, run_id)
    except Exception as err:  # whatever a query or a folder does, the node keeps serving
        return error_reply(Path(site_root), action, run_id,
                           f"{action} failed: {type(err).__name__}: {err}")


def _serve_batch(site_root: Path, query: Payload, run_id: str) -> Payload:
    """A batch (`server.core.in_step`): each part answered by `serve`, so each passes this site's
    egress guard and is a line of its audit log on its own. The batch reply is those
    replies side by side; it adds only the parts' names and actions, which came with the
    query."""
    replies = {name: (action, serve(site_root, action, part, run_id))
               for name, (action, part) in schema.batch_parts(query).items()}
    return {"status": schema.STATUS_OK, **schema.batch_payload(replies)}


def error_reply(site_root: Path, action: str, run_id: str, reason: str) -> Payload:
    """A `failed` reply through a guard that knows no policy beyond scrubbing: the site's
    patient ids (read best-effort from clinical.csv) are replaced in `reason`, and the reply
    is audited. If even the audit log cannot be written, the reply says only that."""
    try:
        return _fallback_guard(site_root).fail(action, run_id, reason)
    except Exception as err:
        return {"status": schema.STATUS_FAILED,
                "reason": f"site cannot write its audit log ({type(err).__name__})"}


def _fallback_guard(site_root: Path) -> EgressGuard:
    ids: frozenset[str] = frozenset()
    try:
        with (site_root / CLINICAL_CSV).open(encoding="utf-8-sig", errors="replace") as fh:
            rows = list(csv.reader(fh))
        column = [c.strip() for c in rows[0]].index("patient_id") if rows else -1
        ids = frozenset(r[column].strip() for r in rows[1:]
                        if len(r) > column >= 0 and r[column].strip())
    except (OSError, ValueError, csv.Error):
        pass
    return EgressGuard(_site_name(site_root), PrivacyPolicy(), ids,
                       site_root / AUDIT_DIR / EGRESS_LOG)


def _site_name(site_root: Path) -> str:
    """site.yaml's site_id where it can be read and is valid, else the folder's name."""
    try:
        raw = yaml.safe_load((site_root / SITE_YAML).read_text(encoding="utf-8"))
        name = str(raw.get("site_id", "")) if isinstance(raw, dict) else ""
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        name = ""
    return name if SITE_ID_PATTERN.match(name) else site_root.name


def _serve(site_root: Path, action: str, query: Payload, run_id: str) -> Payload:
    started = time.perf_counter()
    if action in queries.QUERIES:  # the query as its declaration allows it, before anything
        try:  # is read or computed (an unknown action is answered below)
            queries.check(action, query)
        except QueryRejected as err:
            guard = _fallback_guard(site_root)
            guard.check_ms = (time.perf_counter() - started) * 1000
            return guard.refuse(action, run_id, f"{_site_name(site_root)}: {err}")
    check_ms = (time.perf_counter() - started) * 1000
    task = str(query.get("task", "her2-positive"))  # "": the query needs no task label
    needs = _needs(site_root, _names(query.get("needs", "")))
    try:
        session = open_session(str(site_root), (task if task in TASKS else "her2-positive")
                               if task else None, needs)
    except (SiteError, ValueError) as err:
        return error_reply(site_root, action, run_id, _site_error_text(site_root, err))
    guard = session.guard
    guard.check_ms = check_ms  # in the audit record: what the declaration check cost
    if task and task not in TASKS:
        return guard.fail(action, run_id, f"unknown task {task!r}; known: {list(TASKS)}")
    handler = HANDLERS.get(action)
    if handler is None:
        return guard.fail(action, run_id, f"unknown action {action!r}")
    try:
        statistics = handler(session, dict(query, run_id=run_key(run_id, query)))
    except (PolicyRefusal, QueryRejected) as err:  # the site's bounds on its own data
        return guard.refuse(action, run_id, f"{session.site_id}: {err}")
    except Exception as err:
        return guard.fail(action, run_id, f"{action} failed at {session.site_id}: "
                                          f"{type(err).__name__}: {err}")
    return guard.release(action, run_id, statistics)


def run_key(run_id: str, query: Payload) -> str:
    """The key of the files a stage keeps at the site for this run (rows, predictions): the
    run id, or `<run id>-<run-variant>` for one of several fits in a run (a LOSO fit)."""
    variant = str(query.get(RUN_VARIANT, "") or "")
    if not variant:
        return run_id
    if not VARIANT.match(variant):
        raise ValueError(f"bad variant {variant!r}")
    return f"{run_id}-{variant}"


def _needs(site_root: Path, asked: list[str]) -> tuple[str, ...]:
    """The inputs to load: `clinical` and those asked (`client.site.folder.present_needs`)."""
    return tuple(sorted({"clinical", *present_needs(site_root, asked)}))


def _names(value: object) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value] if isinstance(value, list) else []


def _site_error_text(site_root: Path, err: Exception) -> str:
    problems = getattr(err, "problems", None) or []
    detail = "; ".join(str(p) for p in problems[:5]) or str(err)
    return f"site folder {site_root.name} cannot serve: {detail}"
