"""The small formatters of the fusion, validation and per-site report sections: numbers that may
be missing or None (shown as "—"), intervals, counts, sizes and a site's status in a stage."""

from __future__ import annotations

import math
from typing import Any

from server.report.html import DASH
from server.report.html import escape as _e


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


# Where a stage block lists the sites left out of one of its parts (a curve, a model, a
# covariate, an AUC), and the message types each stage's sites answer.
MISSING_KEYS = ("sites_missing", "concordance_sites_missing", "auc_sites_missing",
                "histograms_missing")
STAGE_MESSAGES = {"cohort": ("cohort_",), "radiomics": ("radiomics_",),
                  "survival": ("survival_",), "validation": ("validation_",),
                  "fusion": ("fusion_",), "dsfr": ("dsfr_", "train"), "deep": ("train",)}


def left_out(block: Any, path: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Per site, the parts of a stage's result it is missing from (`sites_missing` lists
    and the like anywhere in `block`, a design's `sites_without`), by their path."""
    out: dict[str, list[str]] = {}

    def add(site: Any, part: tuple[str, ...]) -> None:
        name = " ".join(part) or "the stage"
        parts = out.setdefault(str(site), [])
        if name not in parts:
            parts.append(name)

    for key, value in as_dict(block).items():
        if key in MISSING_KEYS:
            for site in as_list(value):
                add(site, path)
        elif key == "sites_without":
            for site in as_dict(value):
                add(site, path)
        elif isinstance(value, dict):
            for site, parts in left_out(value, (*path, str(key))).items():
                for part in parts:
                    add(site, (part,))
    return out


def refusals(results: dict[str, Any], site: str, stage: str) -> list[str]:
    """What the site refused in the stage's messages (`run.wire`: statistic and reason),
    its policy's or its disclosure ledger's."""
    prefixes = STAGE_MESSAGES.get(stage, (stage,))
    found: list[str] = []
    for entry in as_list(as_dict(as_dict(results.get("run")).get("wire")).get(site)):
        kind = str(as_dict(entry).get("message_type", ""))
        if not any(p in kind for p in prefixes):
            continue
        for statistic, reason in as_dict(as_dict(entry).get("why")).items():
            text = f"{statistic}: {reason}"
            if text not in found:
                found.append(text)
    return found


def left_out_reason(results: dict[str, Any], site: str, stage: str, parts: list[str],
                    limit: int = 4) -> str:
    """`left out of <parts>; refused by the site: <statistic: reason>; …` (the first
    `limit` refusals; results.json's run.wire has them all)."""
    text = f"left out of {', '.join(parts)}"
    why = _problems(results.get(stage), site) + refusals(results, site, stage)
    if why:
        more = f"; … {len(why) - limit} more in run.wire" if len(why) > limit else ""
        text += "; refused by the site: " + "; ".join(why[:limit]) + more
    return text


def _problems(block: Any, site: str) -> list[str]:
    """The site's reasons a stage's result records itself (`site_problems`,
    `site_reasons`, anywhere in the block)."""
    found: list[str] = []
    for key, value in as_dict(block).items():
        if key in ("site_problems", "site_reasons") and site in as_dict(value):
            text = str(as_dict(value)[site])
            found += [text] if text not in found else []
        elif isinstance(value, dict):
            found += [t for t in _problems(value, site) if t not in found]
    return found
