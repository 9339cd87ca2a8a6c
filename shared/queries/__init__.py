"""Every query a site answers, declared once: `QUERIES[action]` (see `params`).

`serve` (client.handlers) checks each query against its declaration before a handler runs;
`not_value_keys` are the declared keys no statistic depends on, which a ledger family
(`shared.disclosure.query_family`) leaves out.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from shared import stages
from shared.queries.params import Param, QueryRejected, QueryType


@cache
def _declarations() -> dict[str, QueryType]:
    """`QUERIES`: each stage's declared query module (shared.stages: `queries`; the
    handshake's declaration is in the CNN stages' module, whose setup shares its shape),
    imported when first asked — a stage's module may be its site code too, which imports
    the guard, which imports this package."""
    modules = [importlib.import_module(name)
               for name in dict.fromkeys(s.queries for s in stages.STAGES if s.queries)]
    return {q.action: q for module in modules for q in module.QUERY_TYPES}


@cache
def _not_value_keys() -> frozenset[str]:
    """Keys no statistic depends on, as a site half sees them: a nested solver query's keys
    (`q.<key>.rows`) reach it without their prefix, so a pattern counts by its last part."""
    return frozenset(k.rsplit(".", 1)[-1] if "*" in k else k
                     for q in _declarations().values() for k in q.not_value_keys())


def __getattr__(name: str) -> Any:
    if name == "QUERIES":
        return _declarations()
    if name == "NOT_VALUE_KEYS":
        return _not_value_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check(action: str, query: dict) -> None:
    """Raise QueryRejected when `query` is not what `action`'s declaration allows."""
    declaration = _declarations().get(action)
    if declaration is None:
        raise QueryRejected(f"no declaration for action {action!r}")
    declaration.check(query)


__all__ = ["NOT_VALUE_KEYS", "QUERIES", "Param", "QueryRejected", "QueryType", "check"]
