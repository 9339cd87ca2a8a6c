"""The contract between the federated statistics in `shared/` and whatever carries them.

Every multi-round statistic is a server-side *solver*: a small state machine that never
calls a site itself. A transport drives it one round at a time:

    while not solver.done:
        query = solver.query()            # same query for every site
        replies = [site_reply(query) ...] # each site's half, run at the site
        solver.update(sum_replies(replies))

A query is a flat mapping: `"step"` names the site-side function (e.g. `"glm.terms"`), the
other entries are numpy arrays or scalars/strings (schema.split_payload puts them in the
ArrayRecord/ConfigRecord). A reply is a mapping of numpy arrays that *add up* across sites:
counts, sums and sums of products only. The server therefore only ever sees the element-wise
sum over sites, and a solver needs nothing else.

`run_rounds` below is the in-process test harness; in a study the stage wiring plays its part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

Query = dict[str, Any]
Reply = dict[str, np.ndarray]
SiteFn = Callable[[Query], Reply]


class Refused(RuntimeError):
    """A site's policy refuses to compute what the query asks (e.g. a p×p matrix)."""


class Solver(Protocol):
    """A server-side loop driven from outside, one round per `update`."""

    done: bool
    rounds: int

    def query(self) -> Query:
        """The query to send to every site this round."""
        ...

    def update(self, reply: Reply) -> None:
        """Advance with the element-wise sum of the sites' replies to `query()`."""
        ...


def sum_replies(replies: Sequence[Mapping[str, np.ndarray]]) -> Reply:
    """Element-wise sum of the sites' replies; every site must send the same keys/shapes."""
    if not replies:
        raise ValueError("no replies to add")
    keys = set(replies[0])
    for reply in replies[1:]:
        if set(reply) != keys:
            raise ValueError(f"replies disagree on keys: {sorted(keys ^ set(reply))}")
    return {key: np.sum([np.asarray(r[key]) for r in replies], axis=0) for key in keys}


def hessian_allowed(n_features: int, n_patients: int, max_feature_ratio: float) -> bool:
    """A site's `max_feature_ratio` rule: p×p matrices only when p <= ratio × n."""
    return n_features <= max_feature_ratio * n_patients


def run_rounds(solver: Solver, sites: Sequence[SiteFn], max_rounds: int = 100_000) -> Solver:
    """Test harness: drive `solver` to the end, summing the in-process site halves."""
    while not solver.done:
        if solver.rounds >= max_rounds:
            raise RuntimeError(f"solver not done after {max_rounds} rounds")
        query = solver.query()
        solver.update(sum_replies([site(query) for site in sites]))
    return solver
