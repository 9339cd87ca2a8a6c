"""Independent fits in step: k fits of r rounds each in max(r) rounds, not k·r.

Each fit runs in a thread of its own against a `Lane`, a transport whose `ask` waits. A
round goes out only once every unfinished fit is waiting for one: each site then gets one
`batch` message holding the query of every fit it takes part in (`shared.schema`'s batch
layout), and each fit gets back exactly the replies it would have got alone. A part is
answered, guarded and audited at the site as a query of its own (`client.handlers`), so
what crosses the wire is what the fits would have sent one after the other, in fewer
messages. A round in which only one fit is waiting goes out as that fit's own query.

The fits must be independent (none waits for another's result) and deterministic given
their replies; then their results do not depend on how the rounds were grouped. The
leave-one-site-out refits of the validation stage are such fits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from server.core.progress import FIT
from server.core.transport import Reply, Transport, reply_from_payload, site_query
from shared import schema
from shared.schema import Payload

T = TypeVar("T")


@dataclass
class _Ask:
    action: str
    queries: dict[str, Payload]  # site -> query


class Lane:
    """One fit's transport: `ask` hands the round to the coordinator and waits."""

    def __init__(self, name: str, steps: _InStep) -> None:
        self.name, self.steps = name, steps

    def handshake(self, query: Payload) -> dict[str, Reply]:
        raise RuntimeError("a fit in step does not handshake; the study did")

    def ask(self, action: str, query: Payload | Mapping[str, Payload],
            sites: Iterable[str]) -> dict[str, Reply]:
        queries = {s: site_query(query, s) for s in sites}
        return self.steps.wait(self.name, _Ask(action, queries))


class _InStep:
    def __init__(self, transport: Transport, names: list[str]) -> None:
        self.transport, self.names = transport, names
        self.turn = threading.Condition()
        self.asks: dict[str, _Ask] = {}
        self.answers: dict[str, dict[str, Reply] | BaseException] = {}
        self.ended: set[str] = set()

    def wait(self, name: str, ask: _Ask) -> dict[str, Reply]:
        with self.turn:
            self.asks[name] = ask
            self.turn.notify_all()
            self.turn.wait_for(lambda: name in self.answers)
            answer = self.answers.pop(name)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def end(self, name: str) -> None:
        with self.turn:
            self.ended.add(name)
            self.turn.notify_all()

    def serve(self) -> None:
        """Send rounds from this (the study's) thread until every fit has ended."""
        while True:
            with self.turn:
                self.turn.wait_for(lambda: all(n in self.asks or n in self.ended
                                               for n in self.names))
                if not self.asks:
                    return
                asks, self.asks = self.asks, {}
            try:
                answers: dict[str, dict[str, Reply] | BaseException] = dict(self.send(asks))
            except Exception as err:  # the transport failed: every waiting fit learns it
                answers = {name: err for name in asks}
            with self.turn:
                self.answers.update(answers)
                self.turn.notify_all()

    def send(self, asks: dict[str, _Ask]) -> dict[str, dict[str, Reply]]:
        if len(asks) == 1:
            (name, ask), = asks.items()
            return {name: self.transport.ask(ask.action, ask.queries, list(ask.queries))}
        sites = sorted({s for ask in asks.values() for s in ask.queries})
        batches = {s: schema.batch_payload({n: (a.action, a.queries[s])
                                            for n, a in asks.items() if s in a.queries})
                   for s in sites}
        replies = self.transport.ask(schema.BATCH, batches, sites)
        return {name: {s: _part(replies[s], name) for s in ask.queries}
                for name, ask in asks.items()}


def _part(reply: Reply, name: str) -> Reply:
    """A fit's reply from a site's batch reply; the batch's own failure (dropped, failed,
    refused as a whole) is every part's."""
    if not reply.ok:
        return Reply(reply.site_id, reply.status, reason=reply.reason)
    parts = schema.batch_parts(reply.payload)
    if name not in parts:
        return Reply(reply.site_id, schema.STATUS_FAILED,
                     reason=f"the batch reply has no part {name!r}")
    return reply_from_payload(reply.site_id, parts[name][1])


def in_step(transport: Transport, fits: Mapping[str, Callable[[Transport], T]]) -> dict[str, T]:
    """Run `fits[name](lane)` for every name, each on its own lane, their rounds in step.
    Returns each fit's result; if fits raised, the first one's exception (in `fits` order)
    is raised once all have ended."""
    names = [f"l{i}" for i in range(len(fits))]
    steps = _InStep(transport, names)
    results: dict[str, T] = {}
    errors: dict[str, BaseException] = {}

    def run(lane: str, key: str, fit: Callable[[Transport], T]) -> None:
        FIT.set(key)
        try:
            results[key] = fit(Lane(lane, steps))
        except BaseException as err:  # handed to the caller below
            errors[key] = err
        finally:
            steps.end(lane)

    threads = [threading.Thread(target=run, args=(lane, key, fit), name=f"fit:{key}",
                                daemon=True)
               for lane, (key, fit) in zip(names, fits.items(), strict=True)]
    for thread in threads:
        thread.start()
    steps.serve()
    for thread in threads:
        thread.join()
    for key in fits:
        if key in errors:
            raise errors[key]
    return {key: results[key] for key in fits}
