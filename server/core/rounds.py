"""Drive `shared` solvers over the transport: one message per site per round carries the
queries of every unfinished solver (e.g. the same fit for each of ten CV folds), the
replies are summed element-wise per solver, and each solver advances.

A solver only ever sees the sum over the sites that answered; so that one fit never mixes
site sets, a site that drops out or fails raises the transport's `SiteSetChanged` (the
caller restarts the fit on the survivors with `on_stable_sites`), and a site whose policy
refuses a solver's query raises `RoundRefused` (the caller may switch that solver to
gradient-only rounds; otherwise the stage fails with the reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from server.core.progress import report_round
from server.core.transport import Reply, StageError, Transport, ask_all_ok
from shared.federated import Solver, sum_replies
from shared.schema import Payload, nest

log = logging.getLogger("feddlr")
SOLVERS = "solvers"  # query key: the solver keys this round carries


class RoundRefused(StageError):
    """Sites' policies refused solvers' queries: `refused` maps key → site → reason;
    `rounds` is how many rounds the drive had taken, the refused one included."""

    def __init__(self, refused: Mapping[str, dict[str, str]], rounds: int = 0) -> None:
        self.refused = {key: dict(by_site) for key, by_site in refused.items()}
        self.rounds = rounds
        super().__init__("; ".join(f"{s} refused {key}: {why}"
                                   for key, by_site in self.refused.items()
                                   for s, why in by_site.items()))


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
        replies = ask_all_ok(
            transport, action, pack(context, {k: s.query() for k, s in active.items()}), sites)
        report_round(stage, rounds, 0, replies)
        refused = _refusals(replies, active)
        if refused:
            raise RoundRefused(refused, rounds)
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
