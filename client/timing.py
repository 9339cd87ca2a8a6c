"""Where a ClientApp's time goes, for `bench/deployment.py`: inert unless the SuperNode's
own environment sets `FEDDLR_TIMING=<file>`.

Each message appends one JSON line: the process's start (its fork, or from /proc), when the
app's modules were imported, when the message reached the app and when the reply was
ready, as wall-clock seconds, and the CPU seconds the process had used by then. Nothing of
the query or the site is written; the site's operator chooses the file.
"""

from __future__ import annotations

import json
import os
import time

TIMING_ENV = "FEDDLR_TIMING"
FORKED_AT_ENV = "FEDDLR_FORKED_AT"  # set by deploy/warm_supernode.py in a forked ClientApp
IMPORTED = time.time()  # this module is imported with client.app


def process_started() -> float | None:
    """Wall-clock start of this process (Linux: /proc/self/stat field 22, in clock ticks
    since boot, placed on the wall clock through /proc/uptime)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as uptime:
            up = float(uptime.read().split()[0])
        return time.time() - up + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def record(action: str, entered: float) -> None:
    """Append this message's timestamps to $FEDDLR_TIMING (no-op when unset)."""
    path = os.environ.get(TIMING_ENV)
    if not path:
        return
    forked = os.environ.get(FORKED_AT_ENV)
    line = {"pid": os.getpid(), "action": action,
            "process": float(forked) if forked else process_started(),
            "imported": IMPORTED, "entered": entered, "replied": time.time(),
            "cpu": time.process_time()}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")
