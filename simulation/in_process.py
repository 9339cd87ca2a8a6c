"""The in-process transport: the study's server code talking to local site folders through
`client.handlers.serve` directly, no Flower. For unit tests of the math and for benchmarks
that run many small studies; the real runs use server.core.transport.GridTransport on Flower's
Simulation or Deployment Engine. It lives in simulation/ because it holds both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from client.handlers import serve
from server.core.transport import Reply, record_wire, reply_from_payload, site_query
from shared import schema
from shared.schema import Payload


class InProcessTransport:
    """Unit tests only: calls `client.handlers.serve` on local folders, no Flower."""

    def __init__(self, site_dirs: Iterable[Path]) -> None:
        self.dirs = [Path(d) for d in site_dirs]
        self.roots: dict[str, Path] = {}
        self.wire: dict[str, list[dict]] = {}

    def handshake(self, query: Payload) -> dict[str, Reply]:
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
        out = {}
        for s in sites:
            payload = serve(self.roots[s], action, site_query(query, s), "in-process")
            out[s] = reply_from_payload(s, payload)
            record_wire(self.wire, s, action, out[s])
        return out
