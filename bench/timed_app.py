"""A ServerApp for the benchmarks: the study's own ServerApp (`server.app`), with every
round timed and a few empty rounds first.

`bench/flower_rounds.py` runs it in Flower's Simulation Engine exactly as `feddlr run` runs
the real one (same launcher, same SuperLink, same ClientApp), from a copy of the app whose
pyproject names this ServerApp. `GridTransport.ask` is wrapped to time each round (push
the queries, wait for every reply) and, after the handshake, `bench-empty-rounds` empty
rounds re-send the handshake query (the sites answer from their loaded session: no
statistic is computed) so a round's cost can be divided by the transport's own.
Writes OUT/bench_rounds.json beside results.json.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.core.progress import configure_logging
from server.core.transport import GridTransport, Reply
from server.workflow import StudyError, run_study
from shared import schema
from shared.config import ConfigError, StudyConfig
from shared.schema import Payload

app = ServerApp()
log = logging.getLogger("feddlr")
EMPTY_ROUNDS_KEY = "bench-empty-rounds"


class TimedTransport(GridTransport):
    def __init__(self, *args: object, empty_rounds: int = 5, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.empty_rounds = empty_rounds
        self.rounds: list[dict] = []
        self.empty: list[dict] = []

    def handshake(self, query: Payload) -> dict[str, Reply]:
        started = time.perf_counter()
        named = super().handshake(query)
        self.handshake_seconds = time.perf_counter() - started
        nodes = {self.nodes[s]: dict(query) for s, r in named.items() if r.ok}
        for _ in range(self.empty_rounds):
            t0, wall = time.perf_counter(), time.time()
            replies = self._send(schema.HANDSHAKE, nodes)
            self.empty.append({"sites": len(nodes), "seconds": time.perf_counter() - t0,
                               "ok": sum(r.ok for r in replies.values()), "sent": wall})
        return named

    def ask(self, action: str, query: Payload | Mapping[str, Payload],
            sites: Iterable[str]) -> dict[str, Reply]:
        sites = list(sites)
        t0, wall = time.perf_counter(), time.time()
        replies = super().ask(action, query, sites)
        seconds = time.perf_counter() - t0
        fields = sorted({k.rsplit(".", 1)[-1] for k in _first(query) if k.startswith("q.")})
        self.rounds.append({"action": action, "sites": len(sites), "seconds": seconds,
                            "ok": sum(r.ok for r in replies.values()), "fields": fields,
                            "sent": wall})
        return replies


def _first(query: Payload | Mapping[str, Payload]) -> Payload:
    if query and all(isinstance(v, dict) for v in query.values()):
        return next(iter(query.values()))  # type: ignore[return-value]
    return query  # type: ignore[return-value]


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    run_config = dict(context.run_config)
    empty_rounds = int(run_config.pop(EMPTY_ROUNDS_KEY, 5))
    try:
        config = StudyConfig.from_run_config(run_config)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(2) from None
    transport = TimedTransport(grid, round_timeout=config.round_timeout,
                               connect_timeout=config.connect_timeout,
                               min_sites=config.min_sites, empty_rounds=empty_rounds)
    started = time.perf_counter()
    try:
        run_study(transport, config, run_id=str(grid.run.run_id))
    except StudyError as err:
        log.error("study stopped: %s", err)
        raise SystemExit(1) from None
    finally:
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_rounds.json").write_text(json.dumps({
            "study_seconds": time.perf_counter() - started,
            "handshake_seconds": getattr(transport, "handshake_seconds", None),
            "empty": transport.empty, "rounds": transport.rounds}, indent=1))
