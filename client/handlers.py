"""One handler per query action; `serve` is the path every query takes at a site:
load the folder → run the handler → egress guard (policy + audit) → payload."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from client import cohort, handshake
from client.guard import EgressGuard, Statistic
from client.session import AUDIT_DIR, EGRESS_LOG, SiteSession, open_session
from client.site import SiteError
from shared import schema
from shared.labels import TASKS
from shared.policy import PrivacyPolicy
from shared.schema import Payload

Handler = Callable[[SiteSession, Payload], list[Statistic]]

HANDLERS: dict[str, Handler] = {
    schema.HANDSHAKE: handshake.handshake,
    schema.COHORT_SUMS: cohort.cohort_sums,
    schema.COHORT_SQUARES: cohort.cohort_squares,
}


def serve(site_root: Path, action: str, query: Payload, run_id: str = "") -> Payload:
    """Answer one query. Always returns a payload with `status`; never raises for data."""
    task = str(query.get("task", "her2-positive"))
    needs = tuple(sorted({"clinical", *_names(query.get("needs", ""))}))
    try:
        session = open_session(str(site_root), task if task in TASKS else "her2-positive", needs)
    except (SiteError, ValueError) as err:
        fallback = EgressGuard(site_root.name, PrivacyPolicy(), frozenset(),
                               site_root / AUDIT_DIR / EGRESS_LOG)
        return fallback.fail(action, run_id, _site_error_text(site_root, err))
    guard = session.guard
    if task not in TASKS:
        return guard.fail(action, run_id, f"unknown task {task!r}; known: {list(TASKS)}")
    handler = HANDLERS.get(action)
    if handler is None:
        return guard.fail(action, run_id, f"unknown action {action!r}")
    try:
        statistics = handler(session, query)
    except Exception as err:
        return guard.fail(action, run_id, f"{action} failed at {session.site_id}: "
                                          f"{type(err).__name__}: {err}")
    return guard.release(action, run_id, statistics)


def _names(value: object) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value] if isinstance(value, list) else []


def _site_error_text(site_root: Path, err: Exception) -> str:
    problems = getattr(err, "problems", None) or []
    detail = "; ".join(str(p) for p in problems[:5]) or str(err)
    return f"site folder {site_root.name} cannot serve: {detail}"
