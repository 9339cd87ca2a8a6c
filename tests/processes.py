"""The machine's processes by command line, for tests that check what they left running."""

from __future__ import annotations

import os
import subprocess


def processes(*markers: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line holds all `markers`
    (this test process and the `ps` call itself excepted)."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True,
                             text=True).stdout.splitlines()[1:]
    found = []
    for line in listing:
        pid, _, args = line.strip().partition(" ")
        if all(m in args for m in markers) and int(pid) != os.getpid() \
                and "ps -ww" not in args:
            found.append((int(pid), args))
    return found
