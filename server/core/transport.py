"""One transport for every stage: send a query to chosen sites, get replies by site id.

`GridTransport` is the real one, on Flower's `Grid` (Simulation and Deployment Engines).
`simulation.in_process.InProcessTransport` calls the site code directly and exists only so
unit tests can split a pooled data set into sites without starting Flower.

Dropouts: a site that does not answer within `round-timeout`, or whose SuperNode is gone,
gets a `dropped` reply and is dropped for the rest of the run (a late answer is never used).
Exact multi-round statistics must not mix site sets, so a fit asks with `ask_same_sites`,
which raises `SiteSetChanged` when a site it started with drops, and runs inside
`on_stable_sites`, which restarts the whole fit on the survivors and returns what happened
for the results. Below `min-replies` ok replies (`answered`, `on_stable_sites`) a stage
fails and the study goes on; below `min-sites` after a site dropped the study stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from shared import schema
from shared.schema import Payload
from wire import read_payload, to_records
from wire.flower_patches import quick_object_pulls

log = logging.getLogger("feddlr")
T = TypeVar("T")

# Flower error replies that mean the message never reached a live ClientApp (the SuperNode
# is gone or the message expired): the site is dropped, not failed.
_UNREACHABLE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
                ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
POLL_INTERVAL = 0.5  # seconds between pulls for replies (Flower's send_and_receive uses 3)
# Shortest wait between pulls: in the Simulation Engine a pull is a function call; on a
# deployment each is a SuperLink request and database query, and a round takes ~1 s.
POLL_FLOOR = {"simulation": 0.01, "deployment": 0.05}


class StudyError(RuntimeError):
    """The study cannot go on (e.g. fewer usable sites than `min-sites`)."""


class StageError(RuntimeError):
    """One stage cannot give results (e.g. fewer `ok` replies than `min-replies`); the study
    records the stage as failed with this reason and goes on with the next stage."""


class TooFewReplies(StageError):
    """Fewer sites answered `ok` (or are left to fit on) than `min-replies`."""


class StageSkipped(RuntimeError):
    """A stage has nothing to work on (e.g. no site has the images it needs); the study
    records it as skipped with this reason and goes on with the next stage."""


class SiteSetChanged(RuntimeError):
    """A site a multi-round fit started with left it; `dropped` maps it to the reason.
    `failed`: those that answered with an error (still usable later), the others are gone
    (no reply in time, SuperNode gone)."""

    def __init__(self, action: str, dropped: Mapping[str, str],
                 failed: Iterable[str] = ()) -> None:
        self.action = action
        self.dropped = dict(dropped)
        self.failed = frozenset(failed)
        super().__init__(f"{', '.join(sorted(self.dropped))} dropped during {action}")

    @property
    def gone(self) -> list[str]:
        return [s for s in self.dropped if s not in self.failed]


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
    comparable line by line with the site's audit log. A batch reply is logged part by
    part, as the site audited it."""
    if action == schema.BATCH and reply.ok:
        for name, (part_action, payload) in _batch_parts(reply).items():
            record_wire(wire, site_id, part_action,
                        reply_from_payload(f"{site_id}:{name}", payload))
        return
    if reply.payload:
        size, sha256 = schema.digest(reply.payload)
        entry: dict[str, Any] = {"message_type": schema.message_type(action), "bytes": size,
                                 "sha256": sha256}
        refused = sorted(k.removeprefix("refused.") for k in reply.payload
                         if k.startswith("refused."))
        if refused:  # statistics the site's policy withheld from this reply, and why
            entry["refused"] = refused
            entry["why"] = {k: str(reply.payload[f"refused.{k}"])[:300] for k in refused}
        if schema.LEDGER_CHECKED in reply.payload:  # releases the site's ledger compared
            entry["ledger"] = int(reply.payload[schema.LEDGER_CHECKED])
        wire.setdefault(site_id, []).append(entry)


def _batch_parts(reply: Reply) -> dict[str, tuple[str, Payload]]:
    try:
        return schema.batch_parts(reply.payload)
    except schema.SchemaError:
        return {}


def site_query(query: Payload | Mapping[str, Payload], site_id: str) -> Payload:
    if query and all(isinstance(v, dict) for v in query.values()):
        return dict(query[site_id])  # type: ignore[index]
    return dict(query)  # type: ignore[arg-type]


def ask_same_sites(transport: Transport, action: str, query: Payload | Mapping[str, Payload],
                   sites: Iterable[str]) -> dict[str, Reply]:
    """`transport.ask`, for one round of a fit that must keep its site set: raises
    `SiteSetChanged` when any of `sites` dropped (no reply in time, SuperNode gone)."""
    sites = list(sites)
    replies = transport.ask(action, query, sites)
    lost = {s: (replies[s].reason or "dropped") if s in replies else "no reply"
            for s in sites if s not in replies or replies[s].status == schema.STATUS_DROPPED}
    if lost:
        raise SiteSetChanged(action, lost)
    return replies


def ask_all_ok(transport: Transport, action: str, query: Payload | Mapping[str, Payload],
               sites: Iterable[str]) -> dict[str, Reply]:
    """`ask_same_sites`, and a site that answers but fails (an error at the site) leaves the
    fit too: `SiteSetChanged`, so the fit restarts on the others."""
    replies = ask_same_sites(transport, action, query, sites)
    bad = {s: f"{r.status}: {r.reason}" for s, r in replies.items() if not r.ok}
    if bad:
        raise SiteSetChanged(action, bad, failed=bad)
    return replies


def answered(replies: Mapping[str, Reply], sites: Iterable[str], *, min_replies: int,
             what: str) -> list[str]:
    """The sites of `sites` whose reply to `what` is `ok`. `min-replies` (one meaning in
    every stage): when fewer answer ok, the stage fails (TooFewReplies) and the study goes
    on."""
    sites = list(sites)
    ok = [s for s in sites if s in replies and replies[s].ok]
    if len(ok) < min_replies:
        raise TooFewReplies(f"{len(ok)} site(s) answered {what} of {len(sites)} asked, "
                         f"min-replies is {min_replies}" + "".join(
                             f"; {s}: {replies[s].status} ({replies[s].reason})"
                             for s in sites if s in replies and not replies[s].ok))
    return ok


def on_stable_sites(fit: Callable[[list[str]], T], sites: Iterable[str], *, min_sites: int,
                    stage: str, min_replies: int = 1) -> tuple[T, list[dict]]:
    """Run `fit(sites)`; when it raises `SiteSetChanged`, start it again from scratch on the
    sites that are left, so every number of one fit comes from one site set.

    Returns the fit's result and the restarts (`sites` each attempt ran on, `dropped` with
    reasons, the `action` where it happened, `failed`: those of them that answered with an
    error rather than going away). Fewer than `min_replies` sites to fit on (at
    the start or after a restart): TooFewReplies, the stage fails; else fewer than
    `min_sites` left after a site dropped (gone, not failed): StudyError, the study stops.
    """
    sites = list(sites)
    _enough(sites, min_replies, stage, "to fit on")
    restarts: list[dict] = []
    while True:
        try:
            return fit(sites), restarts
        except SiteSetChanged as change:
            restarts.append({"sites": sites, "dropped": change.dropped, "action": change.action,
                             **({"failed": sorted(change.failed)} if change.failed else {})})
            sites = [s for s in sites if s not in change.dropped]
            log.warning("[%s] %s; restarting on %d site(s): %s", stage, change, len(sites),
                        ", ".join(sites) or "none")
            left = "left after " + "; ".join(f"{s} dropped ({r})"
                                             for s, r in change.dropped.items())
            _enough(sites, min_replies, stage, left)
            if change.gone and len(sites) < min_sites:
                raise StudyError(f"{stage}: only {len(sites)} site(s) {left}, min-sites is "
                                 f"{min_sites}") from None


def _enough(sites: list[str], min_replies: int, stage: str, left: str) -> None:
    if len(sites) < min_replies:
        raise TooFewReplies(f"{stage}: only {len(sites)} site(s) {left}, min-replies is "
                         f"{min_replies}")


class GridTransport:
    """Queries as Flower messages of type `query.<action>` over a `Grid`; on a deployment
    the Grid retries a reply's missing objects after 50 ms, not Flower's 1 s
    (`wire.flower_patches`)."""

    def __init__(self, grid: Grid, *, round_timeout: float, connect_timeout: float,
                 min_sites: int, poll_interval: float = POLL_INTERVAL) -> None:
        quick_object_pulls()
        self.grid = grid
        self.round_timeout = round_timeout
        self.connect_timeout = connect_timeout
        self.min_sites = min_sites
        self.poll_interval = poll_interval
        self.poll_floor = POLL_FLOOR["simulation" if isinstance(grid, InMemoryGrid)
                                     else "deployment"]
        self.nodes: dict[str, int] = {}
        self.wire: dict[str, list[dict]] = {}
        self.dropped: dict[str, str] = {}  # site -> why; never asked again in this run

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
        out = {s: Reply(s, schema.STATUS_DROPPED, reason=f"dropped earlier: {self.dropped[s]}")
               for s in sites if s in self.dropped}
        by_node = {self.nodes[s]: site_query(query, s) for s in sites if s not in self.dropped}
        replies = self._send(action, by_node) if by_node else {}
        names = {node: site for site, node in self.nodes.items()}
        for node_id, reply in replies.items():
            reply.site_id = names[node_id]
            out[reply.site_id] = reply
            record_wire(self.wire, reply.site_id, action, reply)
            if reply.status == schema.STATUS_DROPPED:
                self.dropped[reply.site_id] = f"{action}: {reply.reason}"
        return {s: out[s] for s in sites}

    def _send(self, action: str, queries: dict[int, Payload]) -> dict[int, Reply]:
        """Push one message per node, then pull replies until all are in or the round times
        out. Replies are matched by the id of the message they answer, so an error reply the
        SuperLink writes for an unreachable node lands on the right site."""
        messages = [Message(to_records(q), node, schema.message_type(action))
                    for node, q in queries.items()]
        pushed = list(self.grid.push_messages(messages))
        pushed += [None] * (len(queries) - len(pushed))  # e.g. [] for a request too large
        pending = {mid: node for mid, node in zip(pushed, queries, strict=True) if mid}
        out: dict[int, Reply] = {
            node: Reply(f"node-{node}", schema.STATUS_DROPPED, reason="message not accepted "
                        "by the SuperLink") for mid, node in zip(pushed, queries, strict=True)
            if not mid}
        started = time.monotonic()
        deadline = started + self.round_timeout
        while pending:
            for msg in self.grid.pull_messages(list(pending)):
                node = pending.pop(msg.metadata.reply_to_message_id, None)
                if node is not None:
                    out[node] = _reply_of(node, msg)
            now = time.monotonic()
            if not pending or now >= deadline:
                break
            # back off with the round's age: a reply is seen at most ~10 % after it lands
            # (statistics rounds answer in milliseconds, a CNN round in seconds)
            wait = min(max(self.poll_floor, 0.1 * (now - started)), self.poll_interval)
            time.sleep(min(wait, deadline - now))
        for node in pending.values():
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


def _reply_of(node: int, msg: Message) -> Reply:
    if msg.has_error():
        status = (schema.STATUS_DROPPED if msg.error.code in _UNREACHABLE
                  else schema.STATUS_FAILED)
        return Reply(f"node-{node}", status, reason=f"site error: {msg.error.reason}")
    try:
        return reply_from_payload(f"node-{node}", read_payload(msg.content))
    except (KeyError, TypeError, ValueError) as err:
        return Reply(f"node-{node}", schema.STATUS_FAILED, reason=f"malformed reply: {err}")
