"""The values in a site's rows: survival and prediction-score problems, and clinical.csv's
usable rows as typed columns (labels parsed, numbers as numbers)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd

from shared.labels import LabelError, is_missing, parse_binary_label, parse_ihc, parse_ish


def survival_problems(row: pd.Series) -> list[str]:
    problems = []
    time = row.get("dfs_time")
    if is_missing(time):
        problems.append("dfs_time is missing")
    else:
        number = _number(time)
        if number is None:
            problems.append(f"dfs_time {time} is not a number")
        elif number < 0:
            problems.append(f"dfs_time {time} is negative")
    event = row.get("dfs_event")
    if is_missing(event):
        problems.append("dfs_event is missing")
    elif _number(event) not in (0.0, 1.0):
        problems.append(f"dfs_event {event} is not 0 or 1")
    return problems


def prediction_problem(row: pd.Series, score: float, duplicated: bool) -> str | None:
    if row.model == "":
        return "model is empty"
    if duplicated:
        return f"duplicate score for model {row.model!r}"
    if not math.isfinite(score):
        return f"score {row.score!r} for model {row.model!r} is not a number"
    if not 0.0 <= score <= 1.0:
        return f"score {row.score} for model {row.model!r} is not in [0, 1]"
    return None


def decimal_number(text: object) -> float:
    """The float a decimal text stands for, correctly rounded (as Python's float() and
    scikit-learn's readers get it; pandas' default parser is off by one unit in the last
    place for about a third of 17-digit decimals), or NaN."""
    try:
        return float(str(text).strip())
    except ValueError:
        return math.nan


def _number(text: object) -> float | None:
    """A finite float from text, or None."""
    try:
        number = float(str(text))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def typed_clinical(raw: pd.DataFrame, usable: list[str],
                   numeric: set[str] | None = None) -> pd.DataFrame:
    """The usable rows, indexed by patient_id, with typed columns: `numeric` (the columns
    numeric over the whole file, client/site/clinical.py) as floats, any other covariate
    as text, whatever the usable rows alone would look like."""
    rows = raw.drop_duplicates("patient_id").set_index("patient_id").loc[usable]
    frame = pd.DataFrame(index=pd.Index(usable, name="patient_id", dtype=object))
    for column in rows.columns:
        frame[column] = _typed_column(column, rows[column], numeric)
    return frame


def _typed_column(column: str, values: pd.Series, numeric: set[str] | None) -> pd.Series:
    if column == "her2_ihc":
        return values.map(lambda v: _lenient(parse_ihc, v)).astype("Int64")
    if column == "her2_ish":
        return values.map(lambda v: _lenient(parse_ish, v)).astype(object)
    if column in ("label", "dfs_event"):
        return values.map(lambda v: _lenient(parse_binary_label, v)).astype("Int64")
    if column == "dfs_time":
        return values.map(_number).astype(float)
    present = values[~values.map(is_missing)]
    numbers = pd.to_numeric(present, errors="coerce")
    if numeric is not None:
        if column in numeric:
            return values.map(decimal_number).astype(float)
        return values.where(~values.map(is_missing), None).astype(object)
    if len(present) and numbers.notna().all():
        return pd.to_numeric(values.where(~values.map(is_missing)), errors="coerce")
    return values.where(~values.map(is_missing), None).astype(object)


LABEL_PARSERS: dict[str, Callable[[object], object]] = {
    "her2_ihc": parse_ihc,
    "her2_ish": parse_ish,
    "label": parse_binary_label,
}


def _lenient(parse: Callable[[object], object], value: object) -> object:
    try:
        return parse(value)
    except LabelError:
        return None
