"""A hospital's SuperNode kept warm: Flower's own `flower-supernode`, with its fixed waits
shortened and each message's ClientApp forked from a process that has its libraries loaded.

Stock Flower 1.41/1.42 spends 6–8 s of every deployment round outside the work
(docs/BENCHMARKS.md §9):
- the SuperNode sleeps a fixed 3 s whenever the SuperLink had no message for it, and 0.5 s
  between looks at a ClientApp's reply; neither is a setting;
- each message is a task for which the SuperExec starts a fresh `flwr-clientapp` process:
  it imports Flower, numpy, pandas and SciPy again (2–3 s on 2 busy cores), unpacks and
  re-verifies the whole FAB, and compiles the app's code;
- a message is listed before its objects have arrived, and a missing object is asked for
  again only after 1 s (2 s, 4 s …).

This launcher changes those, and serves only apps the site approved (`deploy/approval.py`:
a run's FAB is checked when the SuperNode fetches it, before any of its code is stored,
installed or imported; FEDDLR_FAST=0 applies the same check to plain Flower):
- `Backoff` stands in for the `time` module of `flwr.supernode.start_client_internal`:
  after a message the SuperNode looks at the SuperLink again within `FAST_POLL` s, each
  empty look `GROWTH` times later, up to Flower's 3 s (an idle node polls as Flower's
  does); its looks at its own state take `LOCAL_POLL`;
- the SuperNode runs with `--isolation process`; its SuperExec is Flower's own
  `run_superexec` loop (tasks, tokens, launch results) with `ForkExecutor` as executor,
  woken through a pipe when the SuperNode has stored a message with all its objects. Each
  ClientApp task runs Flower's `run_clientapp` unchanged in a child forked from that
  process, which imported the libraries once (`preload`, torch and MONAI included). Every
  message still runs in a process of its own, so one message's crash, memory or state
  cannot reach the next, and the app's own code (`client`, `shared`, `wire`) is imported
  by the child from the run's FAB — one the site approved — as `flwr-clientapp` does;
- a FAB whose exact bytes were installed before is not unpacked again (`installed_once`),
  its code is compiled once into its folder, and missing objects are retried after 50 ms
  (`wire.flower_patches`). Each change to Flower is declared there and applied only where
  the installed Flower still has the names it changes (else Flower's own, with a warning).

    python deploy/warm_supernode.py <flower-supernode arguments>

`deploy/supernode.sh` uses it unless `FEDDLR_FAST=0`, which runs plain `flower-supernode`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the FedDLR checkout
from deploy.approval import enforce as enforce_approved_apps
from wire import flower_patches
from wire.flower_patches import quick_object_pulls

FAST_POLL = 0.05  # seconds: the first look again after a message
GROWTH = 1.25  # each empty look waits this much longer, up to Flower's own wait
LOCAL_POLL = 0.01  # seconds between looks at the SuperNode's own state (Flower: 0.5)
READY = "warm_supernode: SuperExec ready"
SUPEREXEC_FALLBACK_POLL = 10.0  # seconds between looks for a task without a wake-up
SHUTDOWN_GRACE = 10.0  # seconds a SuperNode may take to stop by itself after its SuperExec
NO_WAKE = -1  # the SuperExec's wake-up descriptor when the SuperNode sends none
APP_PACKAGES = ("client", "shared", "wire", "server", "simulation")
# What the ClientApp imports besides its own code, numpy and Flower: a statistics query
# needs the first group, a CNN round the second (torch and MONAI: seconds to import).
PRELOAD = ("pandas", "yaml", "scipy.special", "SimpleITK", "flwr.clientapp",
           "flwr.supernode.runtime.run_clientapp")
PRELOAD_TRAINING = ("torch", "monai.networks.nets", "monai.transforms")


class Backoff(types.ModuleType):
    """Stands in for `time` inside one Flower module: `sleep(s)` for a wait on the SuperLink
    (Flower's s = 3) waits `FAST_POLL` after `reset()` and `GROWTH` times longer at each call
    after that, never more than s; Flower's sub-second waits, which look at the process's
    own state, become `LOCAL_POLL`. With `wake_fd`, `sleep(s)` waits up to s for a byte on
    that pipe (one per message the SuperNode stored)."""

    def __init__(self, wake_fd: int | None = None) -> None:
        super().__init__("time")
        self.wait = FAST_POLL
        self.wake_fd = wake_fd

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def reset(self) -> None:
        self.wait = FAST_POLL

    def sleep(self, seconds: float) -> None:
        if self.wake_fd is not None:  # the SuperNode says when there is work
            if select.select([self.wake_fd], [], [], seconds)[0]:
                os.read(self.wake_fd, 1)  # one byte per stored message: one look each
            return
        if seconds < 1:  # a look into this process's own state (a reply, an object)
            time.sleep(min(seconds, LOCAL_POLL))
            return
        wait = min(self.wait, seconds)
        self.wait = min(self.wait * GROWTH, max(seconds, FAST_POLL))
        time.sleep(wait)


def run_supernode(args: list[str]) -> None:
    """Flower's `flower-supernode` CLI with `--isolation process`, its waits on `Backoff`,
    the warm SuperExec started beside it on its runtime API, and only the apps the site's
    operator approved served (`deploy/approval.py`). Each change to Flower is a
    `wire.flower_patches` declaration: one whose Flower names are gone is left out, with a
    warning, and that part of the node runs as Flower ships it."""
    import flwr.supernode.start_client_internal as node
    from flwr.supernode.cli.flower_supernode import flower_supernode

    enforce_approved_apps(node)  # a run's FAB is checked before the node stores it
    clock = Backoff()
    if flower_patches.apply("supernode.poll-backoff", clock):
        flower_patches.apply("supernode.look-soon-after-a-reply", clock)
    wake_read, wake = os.pipe()
    os.set_blocking(wake, False)  # a SuperExec that does not read the pipe never blocks us
    if not flower_patches.apply("supernode.wake-superexec", wake):
        os.close(wake_read)  # no byte will come: the SuperExec polls as Flower's does
        wake_read = NO_WAKE
    quick_object_pulls()
    runtime = f"{_option(args, '--host', '127.0.0.1')}:{_option(args, '--port', '9094')}"
    superexec = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--superexec",
                                  runtime, str(os.getpid()), str(wake_read)],
                                 pass_fds=(wake_read,) if wake_read != NO_WAKE else ())
    if wake_read != NO_WAKE:
        os.close(wake_read)
    threading.Thread(target=_stop_without, args=(superexec,), daemon=True).start()
    try:
        sys.argv = ["flower-supernode", *_without(args, "--isolation"), "--isolation",
                    "process"]
        flower_supernode()
    finally:
        if superexec.poll() is None:
            superexec.terminate()


def poll_backoff(_time: types.ModuleType, clock: Backoff) -> Backoff:
    """The replacement of a Flower module's `time`: `clock`."""
    return clock


def reset_after_push(push: Callable[..., Any], clock: Backoff) -> Callable[..., Any]:
    """Flower's `_push_messages`, the SuperNode's next look at the SuperLink soon after."""
    def push_after_reset(*a: Any, **kw: Any) -> Any:  # a message came: look again soon
        clock.reset()
        push(*a, **kw)
        clock.reset()

    return push_after_reset


def wake_after_pull(pull: Callable[..., int | None], wake: int) -> Callable[..., int | None]:
    """Flower's `_pull_and_store_message`, writing a byte to `wake` for each stored message."""
    def pull_and_wake(*a: Any, **kw: Any) -> int | None:  # a task waits: tell the SuperExec
        run_id = pull(*a, **kw)
        if run_id is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(wake, b"!")
        return run_id

    return pull_and_wake


def _stop_without(superexec: subprocess.Popen) -> None:
    """A SuperNode whose SuperExec is gone would take messages it can never answer: stop
    it (exit 1) so that the SuperLink reports it unavailable and its service restarts it."""
    code = superexec.wait()
    time.sleep(SHUTDOWN_GRACE)  # both got the service's SIGTERM: let Flower's exit finish
    print(f"warm_supernode: the SuperExec exited with {code}; stopping the SuperNode",
          file=sys.stderr, flush=True)
    os._exit(1)


def run_warm_superexec(runtime_api_address: str, parent_pid: int, wake_fd: int) -> None:
    """Flower's SuperExec loop for this SuperNode, forking each ClientApp task; it looks for
    a task when the SuperNode has stored a message (`wake_fd`), and every 10 s anyway."""
    started = time.monotonic()
    preload()
    quick_object_pulls()  # the forked ClientApps pull their message with short retries
    flower_patches.apply("clientapp.install-once")
    sys.dont_write_bytecode = False  # the FAB's code compiles once, into its own folder
    if wake_fd != NO_WAKE and flower_patches.apply("superexec.woken", Backoff(wake_fd)):
        # Looking before the SuperNode holds the message's objects would start a ClientApp
        # that waits for them in Flower's 1 s backoff: look when woken, and every 10 s.
        os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(SUPEREXEC_FALLBACK_POLL)
    flower_patches.apply("superexec.fork-clientapps")
    import flwr.supercore.superexec.run_superexec as superexec

    print(f"{READY} (libraries loaded in {time.monotonic() - started:.1f} s)",
          file=sys.stderr, flush=True)
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=True,
                            parent_pid=parent_pid, runtime_dependency_install=False)


def preload() -> None:
    """Import what the app's code imports, then forget the app's own modules, so a child
    imports those from its FAB while every library is already in memory."""
    for name in PRELOAD + PRELOAD_TRAINING:
        # a site without the training stack still serves statistics
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]:
        del sys.modules[name]


def fork_executor(_get_executor: Callable[..., Any]) -> Callable[..., ForkExecutor]:
    """The replacement of the SuperExec's `get_executor`: a `ForkExecutor` whatever the
    arguments. The Flower names it uses are imported here, so that a missing one leaves
    Flower's executor in place (`wire.flower_patches`) instead of failing a task."""
    from flwr.supercore.constant import TaskType  # noqa: F401
    from flwr.supercore.superexec.executor import LaunchResult  # noqa: F401
    from flwr.supercore.superexec.executor.subprocess_executor import (  # noqa: F401
        SubprocessExecutor,
    )
    from flwr.supernode.runtime.run_clientapp import run_clientapp  # noqa: F401

    return lambda *_a, **_kw: ForkExecutor()


def installed_once(install: Any) -> Any:
    """Flower's `install_from_fab`, skipped for a FAB whose exact bytes this node installed
    before (by sha256; Flower unpacks and re-verifies every file for every message)."""
    import hashlib

    from flwr.supercore.utils import get_flwr_home

    def install_from_fab(content: bytes, *args: Any, **kwargs: Any) -> Any:
        marker = get_flwr_home() / "apps" / ".installed" / hashlib.sha256(content).hexdigest()
        if marker.is_file() and Path(marker.read_text(encoding="utf-8")).is_dir():
            return Path(marker.read_text(encoding="utf-8"))
        path = install(content, *args, **kwargs)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(path), encoding="utf-8")
        return path

    return install_from_fab


class ForkExecutor:
    """A Flower SuperExec `Executor` that runs each ClientApp task in a forked child
    (Flower's `run_clientapp`, with the task's token); other task types are started as
    Flower's `SubprocessExecutor` starts them."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: set, **kw: Any) -> tuple[set, set]:
        return self.fallback.get_eligible_capacity(supported_task_types, **kw)

    def wait_for_capacity(self, task_type: Any = None, **kw: Any) -> None:
        self.fallback.wait_for_capacity(task_type, **kw)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP or not spec.insecure:
            return self.fallback.launch(spec)
        # the child's garbage collector would touch (and so copy) every page of what was
        # loaded: 0.3 s of CPU a message with torch loaded; frozen objects it leaves alone
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the child: one message, then exit (Flower's run_clientapp exits)
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                from flwr.supernode.runtime.run_clientapp import run_clientapp

                run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token,
                              insecure=True, parent_pid=spec.parent_pid,
                              runtime_dependency_install=False)
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 1
            finally:
                os._exit(code)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _option(args: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def _without(args: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--superexec"]:
        run_warm_superexec(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        run_supernode(sys.argv[1:])
