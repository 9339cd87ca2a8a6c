"""One transport for every stage: send a query to chosen sites, get replies by site id.

`GridTransport` is the real one, on Flower's `Grid` (Simulation and Deployment Engines).
`InProcessTransport` calls the site code directly and exists only so unit tests can split a
pooled data set into sites without starting Flower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flwr.app import Message
from flwr.serverapp import Grid

from client.wire import read_payload, to_records
from shared import schema
from shared.schema import Payload

log = logging.getLogger("feddlr")


@dataclass
class Reply:
    site_id: str
    status: str
    payload: Payload = field(default_factory=dict)
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == schema.STATUS_OK


class Transport(Protocol):
    def handshake(self, query: Payload) -> dict[str, Reply]:
        """Ask every connected site who it is; later calls address sites by these ids."""
        ...

    def ask(self, action: str, query: Payload | Mapping[str, Payload],
            sites: Iterable[str]) -> dict[str, Reply]:
        """Send `query` (one for all, or one per site id) and collect the replies."""
        ...


def reply_from_payload(site_id: str, payload: Payload) -> Reply:
    status = str(payload.get("status", schema.STATUS_FAILED))
    reason = payload.get("reason")
    return Reply(site_id, status, payload, None if reason is None else str(reason))


def record_wire(wire: dict[str, list[dict]], site_id: str, action: str,
                reply: Reply) -> None:
    """The server's own log of what each site sent: type, bytes and sha256 per message,
    comparable line by line with the site's audit log."""
    if reply.payload:
        size, sha256 = schema.digest(reply.payload)
        wire.setdefault(site_id, []).append(
            {"message_type": f"query.{action}", "bytes": size, "sha256": sha256})


def _per_site(query: Payload | Mapping[str, Payload], site_id: str) -> Payload:
    if query and all(isinstance(v, dict) for v in query.values()):
        return dict(query[site_id])  # type: ignore[index]
    return dict(query)  # type: ignore[arg-type]


class GridTransport:
    """Queries as Flower messages of type `query.<action>` over a `Grid`."""

    def __init__(self, grid: Grid, *, round_timeout: float, connect_timeout: float,
                 min_sites: int) -> None:
        self.grid = grid
        self.round_timeout = round_timeout
        self.connect_timeout = connect_timeout
        self.min_sites = min_sites
        self.nodes: dict[str, int] = {}
        self.wire: dict[str, list[dict]] = {}

    def handshake(self, query: Payload) -> dict[str, Reply]:
        node_ids = self._wait_for_nodes()
        replies = self._send(schema.HANDSHAKE, {n: query for n in node_ids})
        named: dict[str, Reply] = {}
        for node_id, reply in replies.items():
            site_id = str(reply.payload.get("site.site_id", f"node-{node_id}"))
            if site_id in named:
                reply = Reply(f"{site_id}@node-{node_id}", schema.STATUS_REFUSED,
                              reason=f"duplicate site_id {site_id!r}")
                site_id = reply.site_id
            reply.site_id = site_id
            named[site_id] = reply
            self.nodes[site_id] = node_id
            record_wire(self.wire, site_id, schema.HANDSHAKE, reply)
        return named

    def ask(self, action: str, query: Payload | Mapping[str, Payload],
            sites: Iterable[str]) -> dict[str, Reply]:
        sites = list(sites)
        by_node = {self.nodes[s]: _per_site(query, s) for s in sites}
        replies = self._send(action, by_node)
        names = {node: site for site, node in self.nodes.items()}
        out = {}
        for node_id, reply in replies.items():
            reply.site_id = names[node_id]
            out[reply.site_id] = reply
            record_wire(self.wire, reply.site_id, action, reply)
        return out

    def _send(self, action: str, queries: dict[int, Payload]) -> dict[int, Reply]:
        messages = [Message(to_records(q), node, f"query.{action}") for node, q in queries.items()]
        replies = self.grid.send_and_receive(messages, timeout=self.round_timeout)
        out: dict[int, Reply] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                out[node] = Reply(f"node-{node}", schema.STATUS_FAILED,
                                  reason=f"site error: {msg.error.reason}")
                continue
            try:
                out[node] = reply_from_payload(f"node-{node}", read_payload(msg.content))
            except (KeyError, TypeError, ValueError) as err:
                out[node] = Reply(f"node-{node}", schema.STATUS_FAILED,
                                  reason=f"malformed reply: {err}")
        for node in queries:
            if node not in out:
                out[node] = Reply(f"node-{node}", schema.STATUS_DROPPED,
                                  reason=f"no reply within round-timeout {self.round_timeout:g}s")
        return out

    def _wait_for_nodes(self) -> list[int]:
        """Wait for at least `min_sites` nodes, then until the set is stable for 3 s."""
        deadline = time.monotonic() + self.connect_timeout
        seen: list[int] = []
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            nodes = sorted(self.grid.get_node_ids())
            if nodes != seen:
                seen, stable_since = nodes, time.monotonic()
                log.info("connected sites: %d", len(seen))
            if len(seen) >= self.min_sites and time.monotonic() - stable_since >= 3.0:
                break
            time.sleep(0.5)
        return seen


class InProcessTransport:
    """Unit tests only: calls `client.handlers.serve` on local folders, no Flower."""

    def __init__(self, site_dirs: Iterable[Path]) -> None:
        self.dirs = [Path(d) for d in site_dirs]
        self.roots: dict[str, Path] = {}
        self.wire: dict[str, list[dict]] = {}

    def handshake(self, query: Payload) -> dict[str, Reply]:
        from client.handlers import serve

        out = {}
        for i, root in enumerate(self.dirs):
            payload = serve(root, schema.HANDSHAKE, dict(query), "in-process")
            site_id = str(payload.get("site.site_id", f"node-{i}"))
            self.roots[site_id] = root
            out[site_id] = reply_from_payload(site_id, payload)
            record_wire(self.wire, site_id, schema.HANDSHAKE, out[site_id])
        return out

    def ask(self, action: str, query: Payload | Mapping[str, Payload],
            sites: Iterable[str]) -> dict[str, Reply]:
        from client.handlers import serve

        out = {}
        for s in sites:
            payload = serve(self.roots[s], action, _per_site(query, s), "in-process")
            out[s] = reply_from_payload(s, payload)
            record_wire(self.wire, s, action, out[s])
        return out
