"""Flower's wait for a message object that is not there yet, shortened on a deployment.

A Flower 1.41/1.42 message is listed to its receiver (a SuperNode, or the ServerApp for a
reply) as soon as the message itself is stored, while its objects (records, arrays) are
still being pushed. A receiver that asks for an object too early is told to wait and
asks again after `PULL_INITIAL_BACKOFF` = 1 s, doubling up to 10 s: on loopback that second
was most of a statistics round (docs/BENCHMARKS.md §9). `quick_object_pulls` makes those
retries start at `RETRY` seconds and stop growing at `RETRY_CAP`, in this process, for the
Flower modules that pull objects; nothing else of Flower changes. The ServerApp calls it
for its Grid, `deploy/warm_supernode.py` for the SuperNode and its ClientApps.
"""

from __future__ import annotations

import importlib
from functools import partial

RETRY = 0.05  # seconds before the first retry of a missing object (Flower: 1)
RETRY_CAP = 1.0  # longest wait between retries (Flower: 10)
PULLERS = ("flwr.supercore.inflatable.inflatable_utils",  # a ClientApp's message
           "flwr.superlink.grid.http_grid",  # the ServerApp's replies
           "flwr.supernode.start_client_internal")  # the SuperNode's messages
_ORIGINAL = "_feddlr_original"


def quick_object_pulls() -> list[str]:
    """Rebind `pull_objects` with short retries in each of `PULLERS` that is importable;
    returns the modules changed (idempotent)."""
    from flwr.supercore.inflatable import inflatable_utils

    original = getattr(inflatable_utils.pull_objects, _ORIGINAL, inflatable_utils.pull_objects)
    quick = partial(original, initial_backoff=RETRY, backoff_cap=RETRY_CAP)
    setattr(quick, _ORIGINAL, original)
    changed = []
    for name in PULLERS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pull_objects"):
            module.pull_objects = quick
            changed.append(name)
    return changed
