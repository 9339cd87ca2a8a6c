"""Test and bench hooks around a SuperNode's ClientApps, kept out of the production app.

Python imports `sitecustomize` as it starts, from the first folder on its path that holds
one. tests/test_deployment.py and bench/deployment.py put this folder first on the
PYTHONPATH of the SuperNodes they start with `deploy/supernode.sh` (nothing else does), so
each Python process of such a SuperNode — the SuperNode, its SuperExec, every ClientApp
process or fork, warm launcher or stock Flower alike — runs this file before its own code.
The FedDLR app it serves is the checkout's, unchanged (the FAB the site approved).

Inert unless that SuperNode's own environment sets
- FEDDLR_TEST_DELAY="<action>=<seconds>[,...]": the ClientApp holds its reply to those
  actions that long after the egress guard released it (and says so on stderr), so the
  deployment test can kill a SuperNode in the middle of a round;
- FEDDLR_TIMING=<file>: each message the ClientApp answers appends one JSON line — the
  process's start (its fork, or from /proc), when the app's code was imported (its
  ClientApp made), when the message reached the app and when the reply was ready, as
  wall-clock seconds, and the CPU seconds the process had used — for bench/deployment.py.
Both wrap Flower's `ClientApp` class (`__init__`, `__call__`); nothing of a query or of the
site is read or written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

DELAY_ENV = "FEDDLR_TEST_DELAY"
TIMING_ENV = "FEDDLR_TIMING"
HOLDING = "site hook: holding the reply to"
_marks: dict[str, float] = {}  # "forked": this process's fork; "imported": its ClientApp


def delays(spec: str) -> dict[str, float]:
    """{action: seconds} of "<action>=<seconds>[,...]"; malformed items are left out."""
    out = {}
    for item in spec.split(","):
        name, _, seconds = item.partition("=")
        try:
            out[name.strip()] = float(seconds)
        except ValueError:
            continue
    return out


def action_of(message_type: str) -> str:
    """"cohort_sums" of "query.cohort_sums"; a training message's type as it is."""
    category, _, action = message_type.partition(".")
    return action if category == "query" else message_type


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


def hold(action: str) -> None:
    seconds = delays(os.environ.get(DELAY_ENV, "")).get(action)
    if seconds:
        print(f"{HOLDING} {action} for {seconds:g} s", file=sys.stderr, flush=True)
        time.sleep(seconds)


def record(action: str, entered: float) -> None:
    path = os.environ.get(TIMING_ENV)
    if not path:
        return
    line = {"pid": os.getpid(), "action": action,
            "process": _marks.get("forked") or process_started(),
            "imported": _marks.get("imported"), "entered": entered, "replied": time.time(),
            "cpu": time.process_time()}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


def install() -> None:
    """Wrap Flower's ClientApp: mark its making, time and hold each message it answers."""
    from flwr.clientapp import ClientApp

    os.register_at_fork(after_in_child=lambda: _marks.update(forked=time.time()))
    make, answer = ClientApp.__init__, ClientApp.__call__

    def made(self: ClientApp, *args: Any, **kwargs: Any) -> None:
        _marks["imported"] = time.time()  # client/app.py makes its app once imported
        make(self, *args, **kwargs)

    def answered(self: ClientApp, message: Any, context: Any) -> Any:
        entered = time.time()
        reply = answer(self, message, context)
        action = action_of(str(message.metadata.message_type))
        hold(action)
        record(action, entered)
        return reply

    ClientApp.__init__ = made  # type: ignore[method-assign]
    ClientApp.__call__ = answered  # type: ignore[method-assign]


if os.environ.get(DELAY_ENV) or os.environ.get(TIMING_ENV):
    install()
