"""Where the training engine's rounds go: the sites over the study's transport
(`FederatedBackend`), or the pooled reference in its own process (`PooledBackend`)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.core.transport import (
    Reply,
    StageError,
    Transport,
    reply_from_payload,
)
from server.training.plan import Plan
from shared import schema
from shared.config import StudyConfig
from wire import read_frame, write_frame


class FederatedBackend:
    """Training messages to the sites over the study's transport."""

    kind = "federated"

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def ask(self, action: str, query: dict[str, Any], sites: list[str]) -> dict[str, Reply]:
        return self.transport.ask(action, query, sites)


class PooledBackend:
    """The centralized reference: the training sites' data pooled in one "site" named
    `pooled`, trained by the site code in its own process (`python -m
    simulation.pooled_site`, which reads `sites-dir`: simulation only), reached through
    payload frames on a pipe, so this server imports no site code. No guard: nothing leaves
    the machine. Used as a context manager, which stops the process.

    On CPU it trains on one thread, as each simulated site does (Flower client resources
    `num-cpus=1`): the wall-time ratio then compares the same compute per worker, and
    intra-op threads on these small convolutions were 2–5× slower here anyway."""

    kind = "pooled"
    site = "pooled"

    def __init__(self, config: StudyConfig, sites: list[str], identity: Mapping[str, Any],
                 state_dir: Path, device: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "simulation.pooled_site"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        hello = {"sites_dir": str(Path(config.sites_dir).resolve()), "task": config.task,
                 "sites": list(sites), "state_dir": str(state_dir), "device": device,
                 **{f"identity.{s}": str(h) for s, h in identity.items() if h}}
        self.device = str(self._call(hello)["device"])

    def prepare(self, plan: Plan) -> dict[str, int]:
        """Prepare the pooled data for `plan`: its patients and label counts."""
        reply = self._call({**plan.params(pooled=True), "round": 0})
        return {k: int(reply[k]) for k in ("patients", "n0", "n1")}

    def ask(self, action: str, query: dict[str, Any], sites: list[str]) -> dict[str, Reply]:
        write_frame(self._stdin, {**query, "action": action})
        payload = self._read()
        return {self.site: reply_from_payload(self.site, payload)}

    def _call(self, payload: dict[str, Any]) -> dict[str, Any]:
        write_frame(self._stdin, payload)
        reply = self._read()
        if reply.get("status") != schema.STATUS_OK:
            raise StageError(f"mode=pooled: {reply.get('reason', 'the pooled process failed')}")
        return reply

    @property
    def _stdin(self) -> Any:
        if self.process.poll() is not None:
            raise StageError(f"mode=pooled: the pooled process ended (exit code "
                             f"{self.process.returncode})")
        return self.process.stdin

    def _read(self) -> dict[str, Any]:
        try:
            reply = read_frame(self.process.stdout)
        except (EOFError, ValueError) as err:
            reply, problem = None, str(err)
        else:
            problem = "it closed its output"
        if reply is None:
            self.close()
            raise StageError(f"mode=pooled: no reply from the pooled process ({problem}; "
                             f"exit code {self.process.returncode})")
        return reply

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()

    def __enter__(self) -> PooledBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
