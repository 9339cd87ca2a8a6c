"""report.html: one page a clinician can read, with its figures as PNG files beside it."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.muted{color:#777}.bad{color:#a00}img{max-width:100%}details{margin:.4em 0}
"""


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Render results into `out/report.html` (+ PNG figures) and return its path."""
    sections = [_header(results), _sites(results)]
    if "cohort" in results:
        sections.append(_cohort(results["cohort"], out))
    sections += [_stages(results), _provenance(results)]
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>FedDLR study report</title><style>{STYLE}</style></head><body>"
            + "\n".join(sections) + "</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _header(results: dict[str, Any]) -> str:
    run = results.get("run", {})
    config = run.get("config", {})
    return (f"<h1>FedDLR study report</h1><p class='muted'>run {_e(run.get('run_id'))} · "
            f"{_e(run.get('started'))} → {_e(run.get('finished'))} · task "
            f"<b>{_e(config.get('task'))}</b> · stages {_e(', '.join(config.get('stages', [])))}"
            "</p><p>No image or patient row left any hospital: every number below was "
            "computed from aggregate statistics released by each site's egress guard.</p>")


def _sites(results: dict[str, Any]) -> str:
    rows = []
    for s in results.get("run", {}).get("sites", []):
        status = s.get("status")
        cls = "" if status == "ok" else " class='bad'"
        rows.append([_e(s.get("site_id")), _e(", ".join(s.get("roles", []))),
                     _count(s.get("n_patients")), _count(s.get("n_excluded")),
                     f"<span{cls}>{_e(status)}</span>", _e(s.get("reason") or "")])
    return ("<h2>Sites</h2>" + _table(["site", "roles", "patients", "excluded", "status",
                                       "reason"], rows)
            + "<p class='muted'>Counts between 1 and the site's min_cell_count are shown as "
              "&lt;k (suppressed at the site).</p>")


def _count(value: Any) -> str:
    return "&lt;k" if value is None else _e(value)


def _cohort(cohort: dict[str, Any], out: Path) -> str:
    groups = cohort["groups"]
    pooled_n = cohort["n"]["pooled"]
    head = ["", *[f"{g} (n={n})" for g, n in zip(groups, pooled_n or [None, None], strict=True)],
            "test", "p"]
    figure = _cohort_figure(cohort, out)
    parts = [f"<h2>Cohort ({_e(cohort['task'])})</h2><h3>Pooled</h3>",
             _table(head, _cohort_rows(cohort["covariates"], None)),
             "<p class='muted'>Numeric: mean ± sd, Student t-test; categorical: n (%), "
             "chi-square (Yates-corrected for 2×2), exact from per-site sums.</p>",
             f"<img src='{figure}' alt='patients per site and label'>"]
    for site, counts in cohort["n"]["sites"].items():
        if counts is None:
            continue
        site_head = ["", *[f"{g} (n={n})" for g, n in zip(groups, counts, strict=True)],
                     "test", "p"]
        parts.append(f"<details><summary>{_e(site)}</summary>"
                     + _table(site_head, _cohort_rows(cohort["covariates"], site)) + "</details>")
    missing = [f"<li>{_e(name)}: {_e(', '.join(v['sites_missing']))}</li>"
               for name, v in cohort["covariates"].items() if v.get("sites_missing")]
    if missing:
        parts.append("<p>Left out of the pooled rows above because the site's privacy policy "
                     "refused them (a label group below min_patients, or a count cell below "
                     "min_cell_count); pooled values are exact over the other sites:</p><ul>"
                     + "".join(missing) + "</ul>")
    return "\n".join(parts)


def _cohort_rows(covariates: dict[str, Any], site: str | None) -> list[list[str]]:
    rows = []
    for name, var in covariates.items():
        entry = var if site is None else var.get("sites", {}).get(site)
        if entry is None:
            rows.append([_e(name), "—", "—", "not released", ""])
        elif var["type"] == "numeric":
            cells = [f"{m:.2f} ± {s:.2f} <span class='muted'>(n={n})</span>"
                     if m is not None and s is not None else "—"
                     for m, s, n in zip(entry["mean"], entry["sd"], entry["n"], strict=True)]
            rows.append([_e(name), *cells, "t-test", _p(entry["t_test"]["p_value"])])
        else:
            rows.append([_e(name), "", "", "chi-square", _p(entry["chi2"]["p_value"])])
            totals = [sum(col) for col in zip(*entry["counts"], strict=True)] or [0, 0]
            for level, counts in zip(entry["levels"], entry["counts"], strict=True):
                cells = [f"{c} ({100 * c / t:.0f}%)" if t else str(c)
                         for c, t in zip(counts, totals, strict=True)]
                rows.append([f"&nbsp;&nbsp;{_e(level)}", *cells, "", ""])
    return rows


def _p(value: float | None) -> str:
    if value is None or value != value:
        return "—"
    return "&lt;0.001" if value < 0.001 else f"{value:.3f}"


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


def _stages(results: dict[str, Any]) -> str:
    stages = results.get("run", {}).get("stages", {})
    rows = [[_e(k), _e(v.get("status")),
             _e(v.get("reason") or f"{v.get('seconds', 0):.1f} s")] for k, v in stages.items()]
    return "<h2>Stages</h2>" + _table(["stage", "status", "detail"], rows)


def _provenance(results: dict[str, Any]) -> str:
    prov = results.get("provenance", {})
    return ("<h2>Provenance</h2><details><summary>config, versions, site data hashes</summary>"
            f"<pre>{_e(json.dumps(prov, indent=2))}</pre></details>")
