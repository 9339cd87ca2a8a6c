"""The HTML pieces every report section uses: escaping, tables and p-values."""

from __future__ import annotations

import html
import math
from typing import Any

DASH = "—"


def escape(value: Any) -> str:
    """Text for HTML; None as empty."""
    return html.escape("" if value is None else str(value))


def table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """A table with escaped headers; the cells are HTML already."""
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    attr = f" class='{cls}'" if cls else ""
    return f"<table{attr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def p_value(value: Any) -> str:
    """`<0.001` or three decimals; "—" for a missing or non-finite value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return DASH
    if isinstance(value, bool) or not math.isfinite(number):
        return DASH
    return "&lt;0.001" if number < 0.001 else f"{number:.3f}"
