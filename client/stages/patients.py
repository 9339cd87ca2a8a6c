"""What a stage tells of its patients beyond its statistics: the patients it left out,
counted by reason (the `excluded` statistic of a reply, coarsened by the site's policy), and
its progress while it works through them (extraction, image preparation).

- **Excluded.** `excluded.reasons` (the categories of `client.site.image_pair`, never a patient
  detail) and `excluded.counts` (a count per reason; 1 … min_cell_count−1 sent as −1,
  shown "<k"). The server collects them into `run.stages.<stage>.excluded`.
- **Progress.** One line per patient done: the full line (patient id, reason) into the
  site's own log, `audit/site.log`; a line without the patient's id to the process's
  stdout (`feddlr HH:MM:SS [stage] site: …`), which the site's console shows — and in a
  simulation, where every site runs beside the coordinator, the run's console and run.log.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping

import numpy as np

from client.egress.guard import Statistic, suppress_small
from client.site.session import AUDIT_DIR, SITE_LOG, SiteSession, _site_log

EXCLUDED = "excluded"
_console = logging.getLogger("feddlr.site.progress")


def excluded_statistic(by_reason: Mapping[str, int], session: SiteSession) -> list[Statistic]:
    """The `excluded` statistic of a reply (none when no patient was left out)."""
    reasons = sorted(r for r, n in by_reason.items() if n > 0)
    if not reasons:
        return []
    policy = session.site.config.privacy
    counts = np.array([suppress_small(int(by_reason[r]), policy) for r in reasons],
                      dtype=np.int64)
    return [Statistic(EXCLUDED, {"reasons": reasons, "counts": counts}, n=None,
                      counts=("counts",))]


def progress(session: SiteSession, stage: str) -> Callable[[str], None]:
    """A progress callback: each line into the site's log in full, and to stdout with the
    site's patient ids replaced (`<patient>`) and file paths cut."""
    _configure()
    guard = session.guard

    def say(line: str) -> None:
        _site_log(session.site, session.site.root / AUDIT_DIR / SITE_LOG, [line])
        public = guard.scrub(line)
        public = re.sub(r"\s*\(<patient>\)", "", public)
        public = re.sub(r"\S*images/<patient>/", "", public)  # the patient's folder
        _console.info("[%s] %s", stage, public)

    return say


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (a test's capture too)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stdout

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _configure() -> None:
    if not any(getattr(h, "_feddlr", False) for h in _console.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("feddlr %(asctime)s %(message)s", "%H:%M:%S"))
        handler._feddlr = True  # type: ignore[attr-defined]
        _console.addHandler(handler)
    _console.setLevel(logging.INFO)
    _console.propagate = False
