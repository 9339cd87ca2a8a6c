"""What a query may say: each query parameter declared once, with its type, bound and meaning.

The coordinator is not trusted. Before a site computes anything for a query it checks the
query against its action's declaration (`QueryType.check`): every key must be declared
(unknown keys are refused, not ignored), every value must have the declared type, and
numbers, lists and arrays must lie within the declared static bounds. The bounds that depend
on the site's own data (a grid's resolution against its n, a point's spread against its
rows) are checked by the stage's site half with the helpers of `shared.queries.bounds`.

A key is a literal (`bins`) or a pattern in which `*` stands for one or more name
characters, dots included (`levels.*`, `q.*.columns`, `w.*`). Each parameter also says
whether the value of a statistic depends on it (`value`): a ledger family is the statistic
and the parameters it depends on after parsing (`family_parts`), so a key that changes
nothing (a run id, a worker count) cannot make a fresh family.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

TYPES = ("int", "float", "bool", "str", "names", "floats", "ints", "array")
NAME = r"[A-Za-z0-9_:+\-]+(?:\.[A-Za-z0-9_:+\-]+)*"  # what `*` matches in a key pattern
MAX_STR = 4096  # a string value longer than this is never a parameter


class QueryRejected(ValueError):
    """A query that does not follow its declaration; the site refuses it whole, before
    computing anything. The message names the key and the rule, never a patient."""


@dataclass(frozen=True)
class Param:
    """One query parameter.

    `type`: int | float | bool | str | names (a list of strings, or one comma-separated
    string) | floats / ints (a list or a 1-D array of numbers) | array (a numeric array of
    any shape). `lo`/`hi` bound every number in it (finite numbers only when either is set);
    `max_items` bounds a list's or array's length (elements); `choices` and `pattern` bound
    strings (and each name of a `names`). `value=False`: statistics do not depend on it (not
    part of a ledger family); `rows=True`: it chooses which patients a statistic covers,
    which the ledger compares as patient sets, not as a family.
    """

    key: str
    type: str
    meaning: str
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    max_items: int | None = None
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    value: bool = True
    rows: bool = False

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"parameter {self.key}: unknown type {self.type!r}")

    @property
    def regex(self) -> re.Pattern[str]:
        return _compiled(self.key)

    def check(self, key: str, value: Any) -> None:
        """Raise QueryRejected when `value` is not of this parameter's type and bounds."""
        checker = _CHECKS[self.type]
        problem = checker(self, value)
        if problem:
            raise QueryRejected(f"query key {key!r}: {problem}")


@dataclass(frozen=True)
class QueryType:
    """The declaration of one action's query: its parameters, literal keys first."""

    action: str
    params: tuple[Param, ...]
    meaning: str = ""

    def param(self, key: str) -> Param | None:
        for p in self.params:
            if p.key == key:
                return p
        for p in self.params:
            if "*" in p.key and p.regex.fullmatch(key):
                return p
        return None

    def check(self, query: Mapping[str, Any]) -> None:
        """Every key declared, every value of its declared type and within its bounds."""
        unknown = [k for k in query if self.param(str(k)) is None]
        if unknown:
            shown = ", ".join(repr(k)[:80] for k in sorted(map(str, unknown))[:5])
            raise QueryRejected(f"{self.action}: unknown query key(s) {shown}"
                                f"{' …' if len(unknown) > 5 else ''}; the site answers only "
                                "the parameters its declaration names")
        for key, value in query.items():
            self.param(str(key)).check(str(key), value)  # type: ignore[union-attr]

    def family_parts(self, query: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """The (key, value) pairs a statistic of this query depends on: declared, value
        parameters, not row choosers."""
        parts = []
        for key in sorted(query):
            p = self.param(key)
            if p is not None and p.value and not p.rows:
                parts.append((key, query[key]))
        return parts

    def not_value_keys(self) -> frozenset[str]:
        return frozenset(p.key for p in self.params if not p.value or p.rows)


def declared(action: str, *params: Param, meaning: str = "",
             common: Iterable[Param] = ()) -> QueryType:
    return QueryType(action, (*common, *params), meaning)


# --------------------------------------------------------------------------- type checks


def _number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_)


def _in_bounds(p: Param, values: np.ndarray) -> str | None:
    if p.lo is None and p.hi is None:
        return None
    if values.size and not np.all(np.isfinite(values)):
        return "holds a value that is not finite"
    if p.lo is not None and values.size and values.min() < p.lo:
        return f"below its bound {p.lo:g}"
    if p.hi is not None and values.size and values.max() > p.hi:
        return f"above its bound {p.hi:g}"
    return None


def _check_int(p: Param, v: Any) -> str | None:
    if not (_number(v) and float(v).is_integer()):
        return "must be an integer"
    return _in_bounds(p, np.asarray([float(v)])) or _choice(p, int(v))


def _check_float(p: Param, v: Any) -> str | None:
    if not _number(v):
        return "must be a number"
    return _in_bounds(p, np.asarray([float(v)])) or _choice(p, float(v))


def _check_bool(p: Param, v: Any) -> str | None:
    return None if isinstance(v, bool | np.bool_) else "must be true or false"


def _check_str(p: Param, v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    return _text(p, v)


def _text(p: Param, v: str) -> str | None:
    if len(v) > MAX_STR:
        return f"longer than {MAX_STR} characters"
    if p.choices is not None and v not in p.choices:
        return f"must be one of {list(p.choices)}"
    if p.pattern is not None and not re.fullmatch(p.pattern, v):
        return "is not of the declared form"
    return None


def _choice(p: Param, v: Any) -> str | None:
    if p.choices is not None and v not in p.choices:
        return f"must be one of {list(p.choices)}"
    return None


def _check_names(p: Param, v: Any) -> str | None:
    if isinstance(v, str):
        items = [s.strip() for s in v.split(",") if s.strip()]
    elif isinstance(v, list | tuple) and all(isinstance(s, str) for s in v):
        items = list(v)
    else:
        return "must be a list of names"
    if p.max_items is not None and len(items) > p.max_items:
        return f"more than {p.max_items} names"
    for item in items:
        problem = _text(p, item)
        if problem:
            return f"name {item[:40]!r} {problem}"
    return None


def _numbers(p: Param, v: Any, integers: bool, one_d: bool) -> str | None:
    if isinstance(v, list | tuple):
        if not all(_number(x) for x in v):
            return "must be numbers"
        arr = np.asarray(v, dtype=np.float64)
    elif isinstance(v, np.ndarray):
        if v.dtype.kind not in "iuf":
            return f"must be a numeric array, not {v.dtype}"
        arr = v
    elif _number(v) and not one_d:
        arr = np.asarray([v], dtype=np.float64)
    else:
        return "must be a list or array of numbers"
    if one_d and arr.ndim > 1:
        return f"must be one-dimensional, not of shape {arr.shape}"
    if p.max_items is not None and arr.size > p.max_items:
        return f"holds {arr.size} numbers, more than {p.max_items}"
    if integers and arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
        return "must hold integers"
    return _in_bounds(p, np.asarray(arr, dtype=np.float64))


_CHECKS = {
    "int": _check_int,
    "float": _check_float,
    "bool": _check_bool,
    "str": _check_str,
    "names": _check_names,
    "floats": lambda p, v: _numbers(p, v, integers=False, one_d=True),
    "ints": lambda p, v: _numbers(p, v, integers=True, one_d=True),
    "array": lambda p, v: _numbers(p, v, integers=False, one_d=False),
}


_REGEX_CACHE: dict[str, re.Pattern[str]] = {}


def _compiled(key: str) -> re.Pattern[str]:
    if key not in _REGEX_CACHE:
        _REGEX_CACHE[key] = re.compile("".join(
            NAME if part == "*" else re.escape(part) for part in re.split(r"(\*)", key)))
    return _REGEX_CACHE[key]
