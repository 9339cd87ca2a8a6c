"""Report section of the cohort stage: the pooled table (label groups' n in the header),
each site's table, the patients-per-site figure. Every column adds up to its header's n:
the patients a covariate has no value for and those of a site whose policy refused the
covariate are rows of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from server.report.html import escape as _e
from server.report.html import p_value as _p
from server.report.html import table as _table


def cohort_section(cohort: dict[str, Any], out: Path) -> str:
    groups = cohort["groups"]
    pooled_n = cohort["n"]["pooled"]
    head = ["", *[f"{g} (n={n})" for g, n in zip(groups, pooled_n or [None, None], strict=True)],
            "test", "p"]
    figure = _cohort_figure(cohort, out)
    parts = [f"<h2>Cohort ({_e(cohort['task'])})</h2><h3>Pooled</h3>",
             _table(head, _cohort_rows(cohort["covariates"], None, pooled_n, cohort["n"]["sites"])),
             "<p class='muted'>Numeric: mean ± sd with the Student t-test, and median "
             "(Q1, Q3) with the Mann–Whitney U test (two-sided, normal approximation with "
             "tie and continuity correction), from label histograms on a grid all sites "
             "share; categorical: n (%), chi-square (Yates-corrected for 2×2). Moments and "
             "counts are exact from per-site sums; ≈ marks a median or quartile known only "
             "within a bound (the middle of it is shown; merged histogram cells or "
             "fractional values), and a p range the bound a Mann–Whitney p lies in "
             "(results.json: <code>*_bound</code>). Percentages are of the patients with "
             "a value at the sites that released the covariate; the rows <i>no value</i> "
             "and <i>not released</i> make each column add up to its n.</p>",
             f"<img src='{figure}' alt='patients per site and label'>"]
    for site, counts in cohort["n"]["sites"].items():
        if counts is None:
            continue
        site_head = ["", *[f"{g} (n={n})" for g, n in zip(groups, counts, strict=True)],
                     "test", "p"]
        parts.append(f"<details><summary>{_e(site)}</summary>"
                     + _table(site_head, _cohort_rows(cohort["covariates"], site, counts))
                     + "</details>")
    missing = [f"<li>{_e(name)}: {_e(', '.join(v['sites_missing']))}</li>"
               for name, v in cohort["covariates"].items() if v.get("sites_missing")]
    if missing:
        parts.append("<p>Left out of the pooled rows above because the site's privacy policy "
                     "refused them (a label group below min_patients, or a count cell below "
                     "min_cell_count); pooled values are exact over the other sites:</p><ul>"
                     + "".join(missing) + "</ul>")
    if cohort.get("left_out"):
        parts.append("<p class='bad'>Covariates left out of the cohort table: " + "; ".join(
            f"{_e(name)} ({_e(why)})" for name, why in cohort["left_out"].items()) + "</p>")
    return "\n".join(parts)


def _cohort_rows(covariates: dict[str, Any], site: str | None,
                 header: list[int | None] | None = None,
                 site_n: dict[str, list[int] | None] | None = None) -> list[list[str]]:
    """The table's rows; under each covariate, where its patients fall short of the
    header's n (`header`, per label group), the patients of the sites whose policy refused
    it (`site_n`: each site's n, pooled table only) and those with no value."""
    rows = []
    for name, var in covariates.items():
        entry = var if site is None else var.get("sites", {}).get(site)
        if entry is None or entry.get("mean", 0) is None:
            rows.append([_e(name), "—", "—", "not released", ""])
            continue
        if var["type"] == "numeric":
            cells = [f"{m:.2f} ± {s:.2f} <span class='muted'>(n={n})</span>"
                     if m is not None and s is not None else "—"
                     for m, s, n in zip(entry["mean"], entry["sd"], entry["n"], strict=True)]
            rows.append([_e(name), *cells, "t-test", _p(entry["t_test"]["p_value"])])
            if entry.get("mann_whitney"):
                rows.append(_rank_row(entry))
            counted = [int(n) for n in entry["n"]]
        else:
            rows.append([_e(name), "", "", "chi-square", _p(entry["chi2"]["p_value"])])
            counted = [sum(col) for col in zip(*entry["counts"], strict=True)] or [0, 0]
            for level, counts in zip(entry["levels"], entry["counts"], strict=True):
                cells = [f"{c} ({100 * c / t:.0f}%)" if t else str(c)
                         for c, t in zip(counts, counted, strict=True)]
                rows.append([f"&nbsp;&nbsp;{_e(level)}", *cells, "", ""])
        refused = var.get("sites_missing", []) if site is None else []
        rows += _shortfall(counted, header, refused, site_n or {})
    return rows


def _shortfall(counted: list[int], header: list[int | None] | None, refused: list[str],
               site_n: dict[str, list[int] | None]) -> list[list[str]]:
    """Rows that complete a covariate's columns to the header's n: the patients of the
    sites that refused it (their label counts, where released) and those with no value."""
    if not header or any(n is None for n in header):
        return []
    rows, rest = [], [int(n) - c for n, c in zip(header, counted, strict=True)]
    if refused:
        known = [site_n.get(s) for s in refused]
        if all(k is not None for k in known):
            out = [sum(int(k[g]) for k in known if k is not None) for g in range(len(rest))]
            rest = [r - o for r, o in zip(rest, out, strict=True)]
            cells = [str(o) for o in out]
        else:  # a refusing site's own n suppressed: the split is unknown
            cells = ["—"] * len(rest)
        rows.append([f"&nbsp;&nbsp;<i>not released ({_e(', '.join(refused))})</i>", *cells,
                     "", ""])
        if "—" in cells:
            return rows
    if any(rest):
        rows.append(["&nbsp;&nbsp;<i>no value</i>", *[str(r) for r in rest], "", ""])
    return rows


def _rank_row(entry: dict[str, Any]) -> list[str]:
    """The row under a numeric covariate: median (Q1, Q3) per group and the Mann–Whitney p."""
    cells = []
    for g in (0, 1):
        parts = [_quantile_text(entry[key][g], (entry.get(f"{key}_bound") or [None, None])[g])
                 for key in ("median", "q1", "q3")]
        cells.append("—" if None in parts else f"{parts[0]} ({parts[1]}, {parts[2]})")
    test = entry["mann_whitney"]
    if test.get("exact"):
        p = _p(test.get("p_value"))
    else:
        low, high = test.get("p_bound") or (None, None)
        p = _p(low) if _p(low) == _p(high) else f"{_p(low)}–{_p(high)}"
    return ["&nbsp;&nbsp;median (Q1, Q3)", *cells, "Mann–Whitney U", p]


def _quantile_text(value: float | None, bound: list[float | None] | None) -> str | None:
    """A quantile, marked ≈ when known only within its bound (the bound's middle)."""
    if value is None:
        return None
    known = bound is not None and bound[0] is not None and bound[0] == bound[1]
    return ("" if known else "≈") + (f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}")


def _cohort_figure(cohort: dict[str, Any], out: Path) -> str:
    name = "cohort_counts.png"
    sites = [s for s, c in cohort["n"]["sites"].items() if c is not None]
    fig, ax = plt.subplots(figsize=(6, 3))
    bottom = [0] * len(sites)
    for g, group in enumerate(cohort["groups"]):
        values = [cohort["n"]["sites"][s][g] for s in sites]
        ax.bar(sites, values, bottom=bottom, label=group)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("patients")
    ax.set_title("Patients per site and label")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name
