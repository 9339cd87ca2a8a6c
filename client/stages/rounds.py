"""Site side of solver rounds (see `server/core/rounds.py`): for each solver key in the query,
build that solver's design (which rows and columns, standardized how) and run the matching
site half from `shared/`. Each result is one `Statistic` for the guard, with `n` the
patients it sums over; a site half that the policy forbids (`Refused`, e.g. a p×p matrix
above `max_feature_ratio`) becomes a refusal of that statistic only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from client.egress.guard import Statistic
from client.site.session import SiteSession
from shared import disclosure, glm, icc, standardize
from shared.federated import Query, Refused, Reply
from shared.queries import QueryRejected
from shared.schema import Payload, nest

# A design builds (x, y, patients) for one solver query: x (n × p) — or (2 readers × n × p)
# for ICC —, the 0/1 labels y of the same rows and those rows' patient ids.
Design = Callable[[SiteSession, Query], tuple[np.ndarray, np.ndarray, Sequence[str]]]
SiteHalf = Callable[[np.ndarray, np.ndarray, Query, SiteSession], Reply]


def _standardize(x: np.ndarray, y: np.ndarray, q: Query, s: SiteSession) -> Reply:
    return standardize.site_reply(x, q)


def _glm(x: np.ndarray, y: np.ndarray, q: Query, s: SiteSession) -> Reply:
    policy = s.site.config.privacy
    return glm.local_terms(x, y, q, policy.max_feature_ratio,
                           glm.PointBounds(policy.max_coefficient, policy.min_patients))


def _icc(x: np.ndarray, y: np.ndarray, q: Query, s: SiteSession) -> Reply:
    return icc.site_reply(x, q)


SITE_HALVES: dict[str, SiteHalf] = {
    "standardize": _standardize,
    "glm": _glm,
    "icc": _icc,
}
# Reply entries that are count tables (the guard's min_cell_count rule applies).
COUNT_TABLES: dict[str, tuple[str, ...]] = {}


def solver_step(session: SiteSession, query: Payload, design: Design,
                inputs: Mapping[str, Any]) -> list[Statistic]:
    """Answer every solver query in `query` with its site half on its design. `inputs` are
    the query's keys that say which values the designs read (e.g. the feature source).

    A statistic's ledger family is the solver kind (standardize, glm, icc) and `inputs`:
    what is summed and over which rows, never the point, centre, loss or any other value the
    server picks. Every sum of one kind over the same rows is one family, so two of them
    over patient sets a few patients apart are refused whatever points they were asked at
    (a gradient over all rows next to one over all rows but a small fold, at another point,
    is the fold's sum)."""
    out = []
    for key in query.get("solvers", []):
        q = dict(nest(query, f"q.{key}"), run_id=query.get("run_id", ""))
        kind = str(q.get("step", "")).split(".", 1)[0]
        half = SITE_HALVES.get(kind)
        if half is None:
            raise ValueError(f"unknown solver step {q.get('step')!r}")
        try:
            x, y, patients = design(session, q)
        except QueryRejected as err:  # a centre or scale the site's data refuses
            out.append(Statistic(key, {}, n=None, refused=str(err)))
            continue
        family = disclosure.query_family(f"solver.{kind}", inputs)
        ledger = {"patients": patients, "family": family,
                  "columns": None if "columns" not in q else list(map(int, q["columns"]))}
        try:
            reply = half(x, y, q, session)
        except (Refused, QueryRejected) as err:
            out.append(Statistic(key, {}, n=len(y), refused=str(err)))
            continue
        out.append(Statistic(key, dict(reply), n=len(y), counts=COUNT_TABLES.get(kind, ()),
                             **ledger))
    return out
