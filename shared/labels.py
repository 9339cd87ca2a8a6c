"""HER2 label rules (ASCO/CAP 2018) and the study tasks built on them. Pure: no I/O.

- HER2-positive: IHC3+, or IHC2+ with ISH positive.
- HER2-negative: IHC0, IHC1+, or IHC2+ with ISH negative.
  Among negatives, HER2-low = IHC1+ or IHC2+/ISH-negative; HER2-zero = IHC0.
- IHC2+ without ISH is equivocal: excluded from every HER2 task, with a reason.

ISH only decides IHC2+ cases; for IHC 0, 1+ and 3+ the IHC score decides (an ISH value
there must still be valid). Accepted values, case-insensitive, surrounding spaces ignored:

- IHC: 0, 1, 2, 3 (int, integral float, or text "0".."3", "2.0", "1+", "2+", "3+", with
  or without a leading "IHC": "IHC 0", "IHC 2+", "ihc3+"; spaces inside ignored).
- ISH: "positive"/"pos"/"+" and "negative"/"neg"/"-"; missing = None, NaN, "" or
  "na"/"n/a"/"#n/a"/"nan"/"none"/"null".
- label (task "label"): 0 or 1 (int, integral float, bool, or text "0"/"1"/"0.0"/"1.0").
"""

from __future__ import annotations

import math
import re
from numbers import Real

TASKS = ("her2-positive", "her2-low", "label")

# The clinical.csv columns each task reads its label from.
TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "her2-positive": ("her2_ihc", "her2_ish"),
    "her2-low": ("her2_ihc", "her2_ish"),
    "label": ("label",),
}

IHC2_WITHOUT_ISH = "IHC2+ without ISH: excluded from HER2 tasks"
POSITIVE_NOT_IN_LOW = "HER2-positive: not in the her2-low task"

# "#n/a": Excel's not-available, as an export writes an empty formula result
_MISSING_TEXT = frozenset({"", "na", "n/a", "#n/a", "nan", "none", "null"})
_ISH_TEXT = {
    "positive": "positive", "pos": "positive", "+": "positive",
    "negative": "negative", "neg": "negative", "-": "negative",
}
# IHC as pathology reports write it: "IHC 2+", "2+", "IHC 0" ("0+" is no score)
_IHC_TEXT = re.compile(r"^(?:ihc)?\s*(?:([0-3])|([1-3])\s*\+)$", re.IGNORECASE)


class LabelError(ValueError):
    """A value that cannot be labelled, or a patient who is not part of a task."""


def is_missing(value: object) -> bool:
    """True for None, NaN, pandas NA/NaT, and empty or NA-like text."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):  # pandas NA, NaT
        return True
    if isinstance(value, str):
        return value.strip().lower() in _MISSING_TEXT
    if isinstance(value, Real) and not isinstance(value, bool):
        return math.isnan(float(value))
    return False


def parse_ihc(value: object) -> int:
    """The IHC score 0..3; LabelError naming the value otherwise."""
    if is_missing(value):
        raise LabelError("her2_ihc is missing")
    score = _integral(value)
    if score is None and isinstance(value, str):
        match = _IHC_TEXT.match(value.strip())
        score = int(match.group(1) or match.group(2)) if match else None
    if score not in (0, 1, 2, 3):
        raise LabelError(f"her2_ihc {_show(value)} is not one of 0, 1, 2, 3")
    return score


def parse_ish(value: object) -> str | None:
    """"positive", "negative", or None when missing; LabelError for anything else."""
    if is_missing(value):
        return None
    result = _ISH_TEXT.get(value.strip().lower()) if isinstance(value, str) else None
    if result is None:
        raise LabelError(f"her2_ish {_show(value)} is not positive, negative or empty")
    return result


def parse_binary_label(value: object) -> int:
    """The generic task label, 0 or 1."""
    if is_missing(value):
        raise LabelError("label is missing")
    result = int(value) if isinstance(value, bool) else _integral(value)
    if result not in (0, 1):
        raise LabelError(f"label {_show(value)} is not 0 or 1")
    return result


def her2_status(ihc: object, ish: object = None) -> str:
    """"positive" or "negative"; LabelError for invalid values or IHC2+ without ISH."""
    score, ish_result = parse_ihc(ihc), parse_ish(ish)
    if score == 3:
        return "positive"
    if score in (0, 1):
        return "negative"
    if ish_result is None:
        raise LabelError(IHC2_WITHOUT_ISH)
    return ish_result


def her2_low_status(ihc: object, ish: object = None) -> str:
    """"positive", "low" (IHC1+ or IHC2+/ISH-negative) or "zero" (IHC0)."""
    if her2_status(ihc, ish) == "positive":
        return "positive"
    return "zero" if parse_ihc(ihc) == 0 else "low"


def task_label(task: str, ihc: object = None, ish: object = None, label: object = None) -> int:
    """The 0/1 target of one patient for `task`; LabelError(reason) if not in the task.

    her2-positive: 1 = positive, 0 = negative. her2-low: HER2-negative patients only,
    1 = low, 0 = zero. label: the 0/1 `label` column (IHC/ISH are ignored).
    """
    check_task(task)
    if task == "label":
        return parse_binary_label(label)
    if task == "her2-positive":
        return int(her2_status(ihc, ish) == "positive")
    status = her2_low_status(ihc, ish)
    if status == "positive":
        raise LabelError(POSITIVE_NOT_IN_LOW)
    return int(status == "low")


def check_task(task: str) -> None:
    """ValueError (not LabelError: a configuration mistake) for an unknown task name."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def _integral(value: object) -> int | None:
    """An integer-valued number or numeric text as int; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, Real):
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            return int(number)
    return None


def _show(value: object) -> str:
    """A value as it appears in the data: text stripped, integral floats without '.0'."""
    if isinstance(value, str):
        text = value.strip()
        plain = text.isprintable() and not any(ch.isspace() for ch in text)
        return text if plain else repr(text)
    return str(value)
