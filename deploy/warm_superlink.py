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

    python deploy/warm_superlink.py <flower-superlink arguments>

`deploy/superlink.sh` uses it unless `FEDDLR_FAST=0`, which runs plain `flower-superlink`.
"""

from __future__ import annotations

import sys


def objects_in_memory() -> None:
    """Make the SuperLink's object store Flower's in-memory one, whatever `--database`."""
    import flwr.superlink.config_loader as config_loader
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    factory = config_loader.ObjectStoreFactory
    config_loader.ObjectStoreFactory = lambda *_a, **_kw: factory(FLWR_IN_MEMORY_DB_NAME)


if __name__ == "__main__":
    objects_in_memory()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()
