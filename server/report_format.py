"""The small formatters of the fusion, validation and per-site report sections: numbers that may
be missing or None (shown as "—"), intervals, counts, sizes and a site's status in a stage."""

from __future__ import annotations

import math
from typing import Any

from server.report_html import DASH
from server.report_html import escape as _e


def num(value: Any) -> float | None:
    """A finite float, or None for None / NaN / inf / anything not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def fixed(value: Any, digits: int = 3) -> str:
    number = num(value)
    return DASH if number is None else f"{number:.{digits}f}"


def pair(value: Any) -> tuple[float | None, float | None]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return num(value[0]), num(value[1])
    return None, None


def interval(value: Any, digits: int = 3) -> str:
    low, high = pair(value)
    if low is None or high is None:
        return ""
    return f"{low:.{digits}f}–{high:.{digits}f}"


def with_ci(value: Any, ci: Any, digits: int = 3) -> str:
    """`0.740` with its interval below it in small print, or "—"."""
    text = fixed(value, digits)
    bounds = interval(ci, digits)
    if text == DASH or not bounds:
        return text
    return f"{text}<br><small class='muted'>{bounds}</small>"


def counts(value: Any) -> str:
    """(negatives, positives) as `40 / 25`; a suppressed count as <k."""
    if not isinstance(value, (list, tuple)) or not value:
        return DASH
    return " / ".join("&lt;k" if v is None else _e(v) for v in value)


def byte_size(size: Any) -> str:
    number = num(size)
    if number is None:
        return DASH
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if number >= scale:
            return f"{number / scale:.1f} {unit}"
    return f"{int(number)} B"


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def name_list(value: Any) -> str:
    items = as_list(value)
    return _e(", ".join(str(v) for v in items)) if items else DASH


def site_status(info: Any) -> str:
    """A site's status in a stage, red unless ok, its reason as a tooltip."""
    info = as_dict(info)
    status = info.get("status")
    if status is None:
        return DASH
    if status == "ok":
        return "✓"
    reason = info.get("reason")
    title = f" title='{_e(reason)}'" if reason else ""
    return f"<span class='bad'{title}>{_e(status)}</span>"


def site_problems(sites: Any) -> str:
    """The sites whose status in a stage is not ok, as a list with their reasons; "" if none."""
    bad = [(s, as_dict(info)) for s, info in as_dict(sites).items()
           if as_dict(info).get("status") not in (None, "ok")]
    if not bad:
        return ""
    return ("<p>Sites left out:</p><ul>"
            + "".join(f"<li>{_e(s)}: <span class='bad'>{_e(info.get('status'))}</span> "
                      f"{_e(info.get('reason') or '')}</li>" for s, info in bad) + "</ul>")
