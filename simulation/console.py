"""What a person sees of a run: every line goes to `run.log`; the console gets a live status
line in a terminal (rich), and sparse lines when it is not one (CI logs, pipes).

The study's progress reaches this process as the log lines `flwr run --stream` relays
(`feddlr HH:MM:SS [stage] round r/R: n sites replied: …`, from `server.core.progress`). A round
line is shown only when the stage changes, when a site did not reply `ok`, or as a
heartbeat every `HEARTBEAT_S` seconds within a stage; a line of the same shape as the one
shown before it (the same note for fold f1, f2, …) is shown once; stage starts and ends,
warnings, errors and everything else are shown as they come. Flower's per-actor chatter is
left to run.log.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

ROUND = re.compile(r"^feddlr \d\d:\d\d:\d\d \[(?P<label>[^\]]+)\] round (?P<round>\d+)"
                   r"(?:/(?P<of>\d+))?: (?P<n>\d+) sites replied: (?P<sites>.*)$")
STAGE = re.compile(r"^feddlr \d\d:\d\d:\d\d \[(?P<stage>[a-z]+)\] (started|done|failed|skipped)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SHAPE = re.compile(r"\b(?:all|f\d+)\.|\d+")  # fold names and numbers: a note's shape
QUIET = ("Manually terminating ClientAppActor", "Starting logstream", "To change federation",
         "flwr federation simulation-config", "Since flwr 1.32")
HEARTBEAT_S = 30.0


@dataclass
class RoundFilter:
    """Decides which relayed lines the console shows (all of them go to run.log)."""

    heartbeat_s: float = HEARTBEAT_S
    clock: Callable[[], float] = time.monotonic
    stage: str | None = None
    last_shown: float = field(default=-1e18)
    last_shape: str = ""

    def show(self, line: str) -> bool:
        text = ANSI.sub("", line).rstrip("\n")
        if any(q in text for q in QUIET) or not text.strip():
            return False
        match = ROUND.match(text)
        if match is None:
            started = STAGE.match(text)
            if started:
                self.stage = started["stage"]
            shape = SHAPE.sub("#", text.partition("] ")[2] or text)
            repeated = shape == self.last_shape and started is None
            self.last_shape = shape
            return not repeated
        stage = match["label"].split(":")[0].split(" ")[0]
        now = self.clock()
        trouble = any(f" {word}" in match["sites"] for word in ("failed", "refused",
                                                                  "dropped"))
        if stage != self.stage or trouble or now - self.last_shown >= self.heartbeat_s:
            self.stage, self.last_shown = stage, now
            return True
        return False


class Console:
    """The console side of a run: `write(line)` for each relayed line, `close()` at the end.
    In a terminal a rich status line shows the latest round (stage, round r/R, sites
    replied, elapsed); elsewhere only the lines `RoundFilter` keeps are printed."""

    def __init__(self, out: TextIO | None = None, live: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.filter = RoundFilter()
        self.started = time.monotonic()
        self._status = None
        if self.live:
            from rich.console import Console as RichConsole

            self._rich = RichConsole(file=self.out, highlight=False)
            self._status = self._rich.status("starting the study …")
            self._status.start()

    def write(self, line: str) -> None:
        shown = self.filter.show(line)
        if self._status is not None:
            match = ROUND.match(ANSI.sub("", line).rstrip("\n"))
            if match:
                of = f"/{match['of']}" if match["of"] else ""
                elapsed = time.monotonic() - self.started
                self._status.update(f"[{match['label']}] round {match['round']}{of} · "
                                    f"{match['n']} sites replied · {elapsed:.0f}s")
            if shown and not match:
                self._rich.print(ANSI.sub("", line).rstrip("\n"), markup=False)
            return
        if shown:
            self.out.write(line)
            self.out.flush()

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def patient_progress(out: TextIO | None = None, live: bool | None = None):
    """The `progress` callback of `simulate_cohort`: a bar per site in a terminal, and in a
    pipe only each site's closing line (`site-1: 40 patients written`)."""
    out = out or sys.stdout
    live = out.isatty() if live is None else live
    if not live:
        def sparse(text: str) -> None:
            if ": patient " not in text:
                print(text, file=out, flush=True)
        return sparse

    from rich.progress import Progress

    bars = Progress(transient=True)
    bars.start()
    tasks: dict[str, int] = {}

    def live_bar(text: str) -> None:
        site, _, rest = text.partition(": ")
        match = re.match(r"patient (\d+)/(\d+)", rest)
        if match is None:
            if site in tasks:
                bars.remove_task(tasks.pop(site))
            bars.console.print(text, markup=False, highlight=False)
            if not tasks:
                bars.stop()
            return
        done, total = int(match[1]), int(match[2])
        if site not in tasks:
            if not bars.live.is_started:
                bars.start()
            tasks[site] = bars.add_task(f"{site} patients", total=total)
        bars.update(tasks[site], completed=done)

    return live_bar
