"""Every query a site answers, declared once: `QUERIES[action]` (see `params`).

`serve` (client.handlers) checks each query against its declaration before a handler runs;
`not_value_keys` are the declared keys no statistic depends on, which a ledger family
(`shared.disclosure.query_family`) leaves out.
"""

from __future__ import annotations

from shared.queries import cohort, fusion, radiomics, survival, training, validation
from shared.queries.params import Param, QueryRejected, QueryType

QUERIES: dict[str, QueryType] = {
    q.action: q for module in (cohort, radiomics, survival, fusion, validation, training)
    for q in module.QUERY_TYPES}


def check(action: str, query: dict) -> None:
    """Raise QueryRejected when `query` is not what `action`'s declaration allows."""
    declaration = QUERIES.get(action)
    if declaration is None:
        raise QueryRejected(f"no declaration for action {action!r}")
    declaration.check(query)


# Keys no statistic depends on, as a site half sees them: a nested solver query's keys
# (`q.<key>.rows`) reach it without their prefix, so a pattern counts by its last part.
NOT_VALUE_KEYS = frozenset(k.rsplit(".", 1)[-1] if "*" in k else k
                           for q in QUERIES.values() for k in q.not_value_keys())

__all__ = ["NOT_VALUE_KEYS", "QUERIES", "Param", "QueryRejected", "QueryType", "check"]
