"""Progress lines a person can follow: stage, round, and which sites replied how."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar

log = logging.getLogger("feddlr")
FIT: ContextVar[str] = ContextVar("feddlr_fit", default="")  # the fit, when several run in step


def configure_logging() -> None:
    """Log `feddlr` progress to stdout (streamed by `flwr run --stream`)."""
    if not any(getattr(h, "_feddlr", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("feddlr %(asctime)s %(message)s", "%H:%M:%S"))
        handler._feddlr = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def report_round(stage: str, round_no: int, rounds: int, replies: Mapping[str, object]) -> None:
    parts = []
    for site, reply in sorted(replies.items()):
        status = getattr(reply, "status", "?")
        reason = getattr(reply, "reason", None)
        parts.append(f"{site} {status}" + (f" ({reason})" if reason and status != "ok" else ""))
    of = f"/{rounds}" if rounds else ""
    if FIT.get():
        stage = f"{stage} {FIT.get()}"
    log.info("[%s] round %d%s: %d sites replied: %s", stage, round_no, of,
             len(replies), ", ".join(parts) or "none")
