"""deploy/warm_supernode.py's pieces that change Flower's waits and installs (the whole
launcher runs in tests/test_deployment.py): the backoff, the wake-up pipe, the FAB memo."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import warm_supernode as warm


def test_the_idle_wait_starts_short_grows_and_never_passes_flowers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    class Clock:
        sleep = staticmethod(slept.append)
        monotonic = staticmethod(time.monotonic)

    monkeypatch.setattr(warm, "time", Clock)
    clock = warm.Backoff()
    for _ in range(40):
        clock.sleep(3)  # Flower: the SuperLink had no message
    assert slept[0] == warm.FAST_POLL and slept[1] == pytest.approx(warm.FAST_POLL * 1.25)
    assert slept == sorted(slept) and max(slept) == 3 and slept[-1] == 3
    clock.reset()  # a message came
    clock.sleep(3)
    clock.sleep(0.5)  # Flower's look at its own state
    assert slept[-2:] == [warm.FAST_POLL, warm.LOCAL_POLL]
    assert clock.monotonic() == pytest.approx(time.monotonic(), abs=1.0)  # the rest: time's


WAKES = """
import os, time
from deploy import warm_supernode as warm
read, write = os.pipe()
clock = warm.Backoff(read)
os.write(write, b"!!")
started = time.monotonic()
clock.sleep(5.0)
clock.sleep(5.0)  # the second message's byte: no wait either
woken = time.monotonic() - started
started = time.monotonic()
clock.sleep(0.2)  # no byte: the whole fallback wait
print(woken, time.monotonic() - started)
"""


def test_the_superexec_wakes_on_a_byte_and_looks_once_per_message() -> None:
    """In a process of its own: a thread another test left reading a pipe whose descriptor
    number this pipe reuses would take its bytes (seen once in a full run, never alone)."""
    done = subprocess.run([sys.executable, "-c", WAKES], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    woken, fallback = map(float, done.stdout.split())
    assert woken < 0.5 and fallback >= 0.19


def test_a_fab_is_installed_once_per_distinct_content(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    installs: list[bytes] = []

    def install(content: bytes, **_kw: object) -> Path:
        installs.append(content)
        path = tmp_path / "apps" / f"app-{len(installs)}"
        path.mkdir(parents=True)
        return path

    once = warm.installed_once(install)
    first = once(b"fab one", skip_prompt=True)
    assert once(b"fab one", skip_prompt=True) == first
    second = once(b"fab two", skip_prompt=True)
    assert second != first and installs == [b"fab one", b"fab two"]
    first.rmdir()  # an app folder removed by hand is installed again
    assert once(b"fab one", skip_prompt=True) != first and len(installs) == 3


def test_the_superlink_sweeps_expired_tokens_at_most_once_a_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    from deploy import warm_superlink

    swept: list[object] = []
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", swept.append)
    warm_superlink.sweep_tokens_less_often(0.2)
    state = type("State", (SqlCoreState,), {})  # Flower's link states subclass it
    state.__abstractmethods__ = frozenset()  # no database: only the sweep is called
    one, other = object.__new__(state), object.__new__(state)
    for _ in range(5):
        SqlCoreState._cleanup_expired_task_tokens(one)
        other._cleanup_expired_task_tokens()
    assert swept == [one, other]  # once per state within the window
    time.sleep(0.25)
    one._cleanup_expired_task_tokens()
    assert swept == [one, other, one]  # and again once it has passed
