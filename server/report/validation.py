"""Report sections of the `validation` stage: per-model performance per set and site, ROC and
calibration figures, DeLong comparisons, subgroups and leave-one-site-out.

Every function returns an HTML fragment; figures are PNG files written beside report.html
(`roc_pooled.png`, `roc_<model>.png`, `calibration.png`, `loso.png`). Any number may be missing
or None (a site's policy refused its histogram, a stage failed): it is shown as "—".

The fusion section lives in `server.report.fusion`, the per-site contribution and privacy
sections in `server.report.sites`; both are importable from here too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from server.report.format import as_dict as _dict
from server.report.format import as_list as _list
from server.report.format import counts as _n
from server.report.format import fixed as _f
from server.report.format import interval as _interval
from server.report.format import name_list as _names
from server.report.format import num as _num
from server.report.format import site_problems as _site_problems
from server.report.format import with_ci as _with_ci
from server.report.fusion import fusion_section
from server.report.html import DASH
from server.report.html import escape as _e
from server.report.html import p_value as _p
from server.report.html import table as _table
from server.report.sites import contribution_section, privacy_section

__all__ = ["contribution_section", "fusion_section", "privacy_section", "validation_sections"]

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22"]
CLASSIFICATION = (("acc", "ACC"), ("sen", "SEN"), ("spe", "SPE"), ("ppv", "PPV"),
                  ("npv", "NPV"), ("f1", "F1"))
# Validation keys that are not model names.
RESERVED = {"grid", "models", "sets", "comparisons", "loso", "sites"}


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _img(name: str, alt: str) -> str:
    return f"<img src='{_e(name)}' alt='{_e(alt)}'>"


# --------------------------------------------------------------------------- validation

def validation_sections(results: dict[str, Any], out: Path) -> str:
    """Per-model performance per set and site, ROC / calibration figures, DeLong comparisons,
    subgroups and leave-one-site-out; "" when the run has no validation stage results."""
    if "validation" not in results:
        return ""
    val = _dict(results.get("validation"))
    models = [str(m) for m in _list(val.get("models")) if str(m) not in RESERVED]
    if "models" not in val:  # older or partial results: every block that looks like a model
        models = [str(k) for k, v in val.items() if str(k) not in RESERVED
                  and isinstance(v, dict) and ("pooled" in v or "sites" in v)]
    sets = _dict(val.get("sets"))
    grid = _dict(val.get("grid"))
    bins = grid.get("bins")
    parts = ["<h2>Validation</h2>"]
    grid_text = (f"Each site sent, per model and label, a histogram of its predicted "
                 f"probabilities on a common grid of {_e(bins)} bins (never a patient's "
                 "score)" if bins else "Each site sent histograms of its predicted "
                 "probabilities per label (never a patient's score)")
    parts.append(
        f"<p>{grid_text}; every metric below is computed from the sum of those histograms, "
        "refined where a bin held patients of both labels. A row is <i>exact</i> when the "
        "refinement proved that every such bin holds one score value: its AUC, CI, Youden "
        "cut and classification metrics are then those of the unbinned scores. Where a row "
        "is not exact (a site's min_cell_count kept bins merged), patients of the two labels "
        "sharing a bin could be ordered either way, so the AUC of the unbinned scores lies "
        "within the <i>bound</i> shown; the 95% CI is DeLong's. The threshold is the "
        "Youden cut of the pooled training sites, applied unchanged to every set (each "
        "set's own optimum is listed for reference). Classification metrics carry Wilson "
        "95% intervals, F1 a delta-method one (small print).</p>")
    if grid.get("note"):
        parts.append(f"<p class='muted'>{_e(grid['note'])}</p>")
    refined = _dict(val.get("refinement"))
    if refined.get("rounds") is not None:
        parts.append(f"<p class='muted'>Refinement: {_e(refined['rounds'])} extra round(s), "
                     f"{_e(refined.get('bytes'))} bytes from the sites.</p>")
    union = {key: list(dict.fromkeys(str(s) for m in models
                                     for s in _list(_model_sets(sets, m).get(key))))
             for key in ("training", "external")}
    parts.append(f"<p>Training sites: {_names(union['training'])}; external sites: "
                 f"{_names(union['external'])}.</p>")
    blocks = {m: _dict(val.get(m)) for m in models}
    figures = []
    roc = _roc_pooled_figure(blocks, out)
    if roc:
        figures.append(_img(roc, "ROC curves of all models, pooled over sites"))
    calibration = _calibration_figure(blocks, out)
    if calibration:
        figures.append(_img(calibration, "calibration of all models, pooled over sites"))
    if figures:
        parts.append("<div class='figs'>" + "".join(figures) + "</div>")
    parts.append(_summary_table(blocks))
    used = {"roc_pooled.png"}
    for model, block in blocks.items():
        parts.append(_model_section(model, block, _model_sets(sets, model), out, used))
    parts.append(_comparisons(val.get("comparisons")))
    parts.append(_subgroups(blocks))
    if "loso" in val:
        parts.append(_loso(_dict(val.get("loso")), out))
    problems = _site_problems(val.get("sites"))
    if problems:
        parts.append("<h3>Sites</h3>" + problems)
    parts.append("<p class='muted'>Patient-level predictions stay at each site, in "
                 "<code>&lt;site&gt;/predictions/</code>.</p>")
    return "\n".join(p for p in parts if p)


def _summary_table(blocks: dict[str, dict[str, Any]]) -> str:
    rows = []
    for model, block in blocks.items():
        cells = [f"<b>{_e(model)}</b>"]
        for key in ("pooled", "training", "external"):
            entry = _dict(block.get(key))
            cells.append(_with_ci(entry.get("auc"), entry.get("auc_ci")) if entry else DASH)
        rows.append(cells)
    if not rows:
        return "<p class='muted'>No model was validated.</p>"
    return ("<h3>AUC at a glance</h3>"
            + _table(["model", "pooled", "training sites", "external sites"], rows))


def _model_sets(sets: dict[str, Any], model: str) -> dict[str, Any]:
    """The sets of sites (pooled, training, external) one model was validated on: per model
    (`sets.<model>`), or one for all models."""
    own = sets.get(model)
    return own if isinstance(own, dict) else sets


def _set_rows(block: dict[str, Any], sets: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, metrics) for pooled, training, external and each site, in that order."""
    rows: list[tuple[str, Any]] = []
    labels = {"pooled": "pooled (all sites)", "training": "training sites",
              "external": "external sites"}
    for key, label in labels.items():
        if key in block:
            members = _list(sets.get(key))
            rows.append((f"<b>{_e(label)}</b>" + (f"<br><small class='muted'>"
                                                  f"{_e(', '.join(map(str, members)))}</small>"
                                                  if members else ""), block[key]))
    kinds = _dict(block.get("kinds"))
    site_blocks = _dict(block.get("sites"))
    order = [str(s) for s in _list(sets.get("training")) + _list(sets.get("external"))]
    order = [s for s in dict.fromkeys(order) if s in site_blocks]
    order += [s for s in site_blocks if s not in order]
    for site in order:
        kind = kinds.get(site)
        rows.append((_e(site) + (f"<br><small class='muted'>{_e(kind)}</small>" if kind else ""),
                     site_blocks[site]))
    return rows


def _metric_cells(entry: Any) -> list[str]:
    m = _dict(entry)
    if not m:
        return [DASH] * 13 + ["not released"]
    ci = _dict(m.get("ci"))
    bound = DASH if m.get("exact") is True else (_interval(m.get("auc_bound")) or DASH)
    threshold = _f(m.get("threshold"))
    if threshold != DASH and m.get("threshold_source"):
        threshold += f"<br><small class='muted'>{_e(m['threshold_source'])}</small>"
    missing = ", ".join(map(str, _list(m.get("sites_missing"))))
    if m.get("reason"):
        missing = f"{missing}; {m['reason']}" if missing else str(m["reason"])
    return [_n(m.get("n")), _with_ci(m.get("auc"), m.get("auc_ci")), bound, threshold,
            *[_with_ci(m.get(key), ci.get(key)) for key, _ in CLASSIFICATION],
            _f(m.get("brier")), _f(m.get("calibration_slope"), 2),
            _f(m.get("calibration_intercept"), 2),
            _e(missing)]


def _model_section(model: str, block: dict[str, Any], sets: dict[str, Any], out: Path,
                   used: set[str]) -> str:
    parts = [f"<h3>{_e(model)}</h3>"]
    if not block:
        return parts[0] + "<p class='muted'>No results for this model.</p>"
    cut = _dict(block.get("threshold"))
    if cut:
        parts.append(f"<p class='muted'>Threshold {_f(cut.get('value'))}: Youden cut of the "
                     f"{_e(cut.get('source') or DASH)} set"
                     + (f" ({_e(cut['rule'])})" if cut.get("rule") else "") + ".</p>")
    rows = _set_rows(block, sets)
    head = ["set", "n (neg / pos)", "AUC (95% CI)", "AUC bound", "threshold",
            *[label for _, label in CLASSIFICATION], "Brier", "cal. slope", "cal. intercept",
            "not released / note"]
    parts.append(_table(head, [[label, *_metric_cells(m)] for label, m in rows], "metrics"))
    confusion_rows = []
    for label, entry in rows:
        m = _dict(entry)
        matrix = m.get("confusion")
        cells = [DASH] * 4
        if (isinstance(matrix, (list, tuple)) and len(matrix) == 2
                and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in matrix)):
            cells = [_e(matrix[0][0]), _e(matrix[0][1]), _e(matrix[1][0]), _e(matrix[1][1])]
        own = _dict(m.get("own"))
        confusion_rows.append([label, *cells, _f(own.get("threshold")), _f(own.get("sen")),
                               _f(own.get("spe")), _f(own.get("j"))])
    parts.append("<details><summary>confusion matrices at the training threshold, and each "
                 "set's own Youden cut</summary>"
                 + _table(["set", "TN", "FP", "FN", "TP", "own cut", "SEN", "SPE", "J"],
                          confusion_rows) + "</details>")
    missing = sorted({str(s) for _, m in rows for s in _list(_dict(m).get("sites_missing"))})
    if missing:
        parts.append(f"<p class='muted'>Not in the pooled rows above: {_e(', '.join(missing))} "
                     "(the site's policy refused a histogram, e.g. fewer than min_patients of a "
                     "label).</p>")
    figure = _roc_model_figure(model, block, rows, out, used)
    if figure:
        parts.append(_img(figure, f"ROC curves of {model}, pooled and per site"))
    return "\n".join(parts)


def _curve(entry: Any) -> tuple[np.ndarray, np.ndarray] | None:
    roc = _dict(_dict(entry).get("roc"))
    try:
        fpr = np.asarray(roc.get("fpr"), dtype=float)
        tpr = np.asarray(roc.get("tpr"), dtype=float)
    except (TypeError, ValueError):
        return None
    if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size < 2:
        return None
    return fpr, tpr


def _auc_label(name: str, entry: Any) -> str:
    auc = _num(_dict(entry).get("auc"))
    return name if auc is None else f"{name} (AUC {auc:.3f})"


def _roc_axes(ax: Any, title: str) -> None:
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, loc="lower right")


def _roc_pooled_figure(blocks: dict[str, dict[str, Any]], out: Path) -> str | None:
    curves = [(m, b.get("pooled"), _curve(b.get("pooled"))) for m, b in blocks.items()]
    curves = [(m, entry, c) for m, entry, c in curves if c is not None]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for i, (model, entry, (fpr, tpr)) in enumerate(curves):
        ax.plot(fpr, tpr, color=COLORS[i % len(COLORS)], lw=1.8, label=_auc_label(model, entry))
    _roc_axes(ax, "ROC, pooled over all sites")
    return _save(fig, out, "roc_pooled.png")


def _file_name(model: str, used: set[str]) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("._") or "model"
    name, i = f"roc_{safe}.png", 2
    while name in used:
        name, i = f"roc_{safe}_{i}.png", i + 1
    used.add(name)
    return name


def _roc_model_figure(model: str, block: dict[str, Any], rows: list[tuple[str, Any]],
                      out: Path, used: set[str]) -> str | None:
    pooled = _curve(block.get("pooled"))
    sites = [(s, entry, _curve(entry)) for s, entry in _dict(block.get("sites")).items()]
    sites = [(s, entry, c) for s, entry, c in sites if c is not None]
    if pooled is None and not sites:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    if pooled is not None:
        ax.plot(*pooled, color="#222", lw=2.6, label=_auc_label("pooled", block.get("pooled")))
    kinds = _dict(block.get("kinds"))
    for i, (site, entry, (fpr, tpr)) in enumerate(sites):
        dashed = kinds.get(site) == "external"
        ax.plot(fpr, tpr, color=COLORS[i % len(COLORS)], lw=1.2, ls="--" if dashed else "-",
                label=_auc_label(f"{site}{' (external)' if dashed else ''}", entry))
    _roc_axes(ax, f"ROC of {model}: pooled and per site")
    return _save(fig, out, _file_name(model, used))


def _calibration_figure(blocks: dict[str, dict[str, Any]], out: Path) -> str | None:
    series = []
    for model, block in blocks.items():
        pooled = _dict(block.get("pooled"))
        cal = _dict(pooled.get("calibration"))
        try:
            pred = np.asarray(cal.get("prob_pred"), dtype=float)
            true = np.asarray(cal.get("prob_true"), dtype=float)
        except (TypeError, ValueError):
            continue
        if pred.ndim == 1 and pred.size and pred.shape == true.shape:
            series.append((model, pooled, pred, true))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--", label="perfect calibration")
    for i, (model, pooled, pred, true) in enumerate(series):
        slope = _num(pooled.get("calibration_slope"))
        label = model if slope is None else f"{model} (slope {slope:.2f})"
        ax.plot(pred, true, marker="o", markersize=3.5, lw=1.3, color=COLORS[i % len(COLORS)],
                label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.set_title("Calibration, pooled over all sites")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    return _save(fig, out, "calibration.png")


def _comparisons(comparisons: Any) -> str:
    rows = []
    for c in _list(comparisons):
        c = _dict(c)
        models = [str(m) for m in _list(c.get("models"))]
        aucs = _list(c.get("auc"))
        exact = c.get("exact")
        rows.append([_e(c.get("set") or DASH), _e(" vs ".join(models)) if models else DASH,
                     " / ".join(_f(a) for a in aucs) if aucs else DASH,
                     _f(c.get("delta_auc")), _f(c.get("z"), 2), _p(c.get("p_value")),
                     DASH if exact is None else ("yes" if exact else "binned"),
                     _e(c.get("reason") or "")])
    if not rows:
        return ""
    head = ["set", "models", "AUC", "ΔAUC", "z", "p", "exact", "note"]
    if not any(row[-1] for row in rows):
        head, rows = head[:-1], [row[:-1] for row in rows]
    return ("<h3>Comparisons of AUCs (DeLong test for paired ROC curves)</h3>"
            + _table(head, rows)
            + "<p class='muted'>ΔAUC = first minus second model; two-sided p.</p>")


def _subgroups(blocks: dict[str, dict[str, Any]]) -> str:
    models = [m for m, b in blocks.items() if _dict(b.get("subgroups"))]
    if not models:
        return ""
    names = list(dict.fromkeys(g for m in models for g in _dict(blocks[m].get("subgroups"))))
    rows = []
    for group in names:
        cells = [_e(group)]
        for model in models:
            entry = _dict(_dict(blocks[model].get("subgroups")).get(group))
            if not entry:
                cells.append(DASH)
                continue
            cells.append(_with_ci(entry.get("auc"), entry.get("auc_ci"))
                         + f"<br><small class='muted'>n {_n(entry.get('n'))}</small>")
        rows.append(cells)
    return ("<h3>Subgroups (AUC, 95% CI, pooled over sites)</h3>"
            + _table(["subgroup", *models], rows))


def _loso(loso: dict[str, Any], out: Path) -> str:
    sites = _dict(loso.get("sites"))
    models = [str(m) for m in _list(loso.get("models"))]
    if not models:
        models = list(dict.fromkeys(m for v in sites.values() for m in _dict(v)))
    note = loso.get("note") or ("each row: the model fitted on every other site, validated "
                                "on the held-out site")
    note = str(note).strip().rstrip(".")
    parts = [f"<h3>Leave-one-site-out</h3><p>{_e(note[:1].upper() + note[1:])}.</p>"]
    if not sites or not models:
        return parts[0] + ("<p class='muted'>No leave-one-site-out results"
                           + (f": {_e(loso['reason'])}" if loso.get("reason") else "")
                           + ".</p>")
    rows, reasons = [], []
    matrix = np.full((len(sites), len(models)), np.nan)
    for i, (site, by_model) in enumerate(sites.items()):
        cells = [_e(site)]
        for j, model in enumerate(models):
            entry = _dict(_dict(by_model).get(model))
            auc = _num(entry.get("auc"))
            if auc is not None:
                matrix[i, j] = auc
            elif entry.get("reason"):
                reasons.append(f"<li>{_e(site)}, {_e(model)}: {_e(entry['reason'])}</li>")
            cells.append(_with_ci(auc, entry.get("auc_ci"))
                         + (f"<br><small class='muted'>n {_n(entry.get('n'))}</small>"
                            if entry.get("n") else ""))
        rows.append(cells)
    parts.append(_table(["held-out site", *models], rows))
    if reasons:
        parts.append("<p>No AUC:</p><ul>" + "".join(reasons) + "</ul>")
    if np.isfinite(matrix).any():
        parts.append(_img(_loso_figure(matrix, list(sites), models, out),
                          "heat map of leave-one-site-out AUCs"))
    return "\n".join(parts)


def _loso_figure(matrix: np.ndarray, sites: list[str], models: list[str], out: Path) -> str:
    fig, ax = plt.subplots(figsize=(1.2 * len(models) + 2.6, 0.5 * len(sites) + 1.6))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdYlGn", vmin=0.5, vmax=1.0,
                      aspect="auto")
    for i in range(len(sites)):
        for j in range(len(models)):
            value = matrix[i, j]
            ax.text(j, i, DASH if np.isnan(value) else f"{value:.2f}", ha="center",
                    va="center", fontsize=9)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(sites)))
    ax.set_yticklabels(sites, fontsize=8)
    ax.set_xlabel("model")
    ax.set_ylabel("held-out site")
    ax.set_title("Leave-one-site-out AUC")
    fig.colorbar(image, ax=ax, label="AUC")
    return _save(fig, out, "loso.png")
