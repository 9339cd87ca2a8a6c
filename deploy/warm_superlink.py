"""The coordinator's SuperLink: Flower's own `flower-superlink`, with message objects kept in
memory while its link state stays in the database.

Started with `--database superlink.db`, Flower 1.41/1.42 keeps two things in that SQLite
file: its link state (registered SuperNode keys, node ids, runs), which a restarted
SuperLink needs, and every message's objects (records, arrays), each written and read again
as a row through SQLAlchemy. On loopback the objects are about a third of a round (0.3 s of
1.0 s, docs/BENCHMARKS.md §9), yet they live only until their message is delivered, and a
restarted SuperLink has no run left to deliver them to. This launcher hands Flower's
`ObjectStoreFactory` the in-memory store; everything else — TLS, SuperNode authentication,
the link state in the database, the arguments — is Flower's.

It also sweeps expired task tokens at most once a second (`SWEEP_SECONDS`). Flower runs
that sweep — two UPDATEs and a commit — inside every run-status read, which it does for
every object a SuperNode pushes or pulls: a fifth of the SuperLink's CPU in a statistics
round (py-spy, docs/BENCHMARKS.md §9). A token lives for a 30 s heartbeat, so a task whose
heartbeats stopped is now marked failed up to a second later than Flower would.

    python deploy/warm_superlink.py <flower-superlink arguments>

Both changes are declared in `wire.flower_patches`, which applies each only where the
installed Flower still has the names it changes (else Flower's own, with a warning).

`deploy/superlink.sh` uses it unless `FEDDLR_FAST=0`, which runs plain `flower-superlink`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the FedDLR checkout
from wire import flower_patches

SWEEP_SECONDS = 1.0  # least time between two sweeps of expired task tokens


def objects_in_memory() -> bool:
    """Make the SuperLink's object store Flower's in-memory one, whatever `--database`
    ("superlink.objects-in-memory" in `wire.flower_patches`); True when applied."""
    return flower_patches.apply("superlink.objects-in-memory")


def in_memory_objects(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's `ObjectStoreFactory`, given Flower's in-memory name whatever the database."""
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    return lambda *_a, **_kw: factory(FLWR_IN_MEMORY_DB_NAME)


def at_most_every(sweep: Callable[[Any], None], seconds: float) -> Callable[[Any], None]:
    """`sweep(state)`, skipped when it last ran for that state less than `seconds` ago."""
    last: dict[int, float] = {}
    lock = threading.Lock()

    def throttled(state: Any) -> None:
        now = time.monotonic()
        with lock:
            if now - last.get(id(state), -seconds) < seconds:
                return
            last[id(state)] = now
        sweep(state)

    return throttled


def sweep_tokens_less_often(seconds: float = SWEEP_SECONDS) -> bool:
    """Flower's expired-task-token sweep at most once per `seconds` (see the module's doc;
    "superlink.sweep-tokens-less-often" in `wire.flower_patches`); True when applied."""
    return flower_patches.apply("superlink.sweep-tokens-less-often", seconds)


if __name__ == "__main__":
    objects_in_memory()
    sweep_tokens_less_often()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()
