"""Drive `shared` solvers over the transport: one message per site per round carries the
queries of every unfinished solver (e.g. the same fit for each of ten CV folds), the
replies are summed element-wise per solver, and each solver advances.

A solver only ever sees the sum over the sites that answered; so that one fit never mixes
site sets, a site that drops out raises the transport's `SiteSetChanged` (the caller
restarts the fit on the survivors with `on_stable_sites`), and a site that fails or refuses
a round raises `SitesChanged`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from server.progress import report_round
from server.transport import Reply, Transport, ask_same_sites
from shared.federated import Solver, sum_replies
from shared.schema import Payload, nest

log = logging.getLogger("feddlr")
SOLVERS = "solvers"  # query key: the solver keys this round carries


class SitesChanged(RuntimeError):
    """Some sites did not answer a round (or refused a solver's query)."""

    def __init__(self, replies: Mapping[str, Reply],
                 refused: Mapping[str, dict[str, str]]) -> None:
        self.failed = {s: r for s, r in replies.items() if not r.ok}
        self.refused = {key: dict(by_site) for key, by_site in refused.items()}  # key → site → why
        parts = [f"{s}: {r.status} ({r.reason})" for s, r in self.failed.items()]
        parts += [f"{s} refused {key}: {why}" for key, by_site in self.refused.items()
                  for s, why in by_site.items()]
        super().__init__("; ".join(parts))


def pack(context: Payload, queries: Mapping[str, Payload]) -> Payload:
    """One site query: the shared context plus `q.<key>.<field>` for each solver."""
    payload: Payload = dict(context)
    payload[SOLVERS] = list(queries)
    for key, query in queries.items():
        payload.update({f"q.{key}.{field}": value for field, value in query.items()})
    return payload


def drive(transport: Transport, action: str, solvers: Mapping[str, Solver], sites: list[str],
          context: Payload, stage: str, *, max_rounds: int = 1000,
          on_round: Callable[[int], None] | None = None) -> int:
    """Advance every solver to `done`; return the number of rounds it took."""
    rounds = 0
    while active := {key: s for key, s in solvers.items() if not s.done}:
        if rounds >= max_rounds:
            raise RuntimeError(f"{stage}: solvers not done after {max_rounds} rounds: "
                               f"{sorted(active)}")
        rounds += 1
        replies = ask_same_sites(
            transport, action, pack(context, {k: s.query() for k, s in active.items()}), sites)
        report_round(stage, rounds, 0, replies)
        refused = _refusals(replies, active)
        if refused or any(not r.ok for r in replies.values()):
            raise SitesChanged(replies, refused)
        for key, solver in active.items():
            solver.update(sum_replies([nest(replies[s].payload, key) for s in sites]))
        if on_round:
            on_round(rounds)
    return rounds


def _refusals(replies: Mapping[str, Reply],
              keys: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for site, reply in replies.items():
        for key in keys:
            reason = reply.payload.get(f"refused.{key}")
            if reason is not None:
                out.setdefault(key, {})[site] = str(reason)
    return out
