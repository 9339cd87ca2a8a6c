"""report.html: one page a clinician can read, with its figures as PNG files beside it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from server.report.auc import agreed, notes_paragraph
from server.report.cohort import cohort_section
from server.report.format import refusals
from server.report.html import escape as _e
from server.report.html import p_value as _p
from server.report.html import table as _table
from server.report.validation import contribution_section, fusion_section, privacy_section
from shared import stages

log = logging.getLogger("feddlr")

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.muted{color:#777}.bad{color:#a00}img{max-width:100%}details{margin:.4em 0}
table.metrics{font-size:.82em}.figs img{max-width:49%;vertical-align:top}
"""
# Counts the figures that loaded (body's data-figures = "loaded/total"), for browser checks.
SCRIPT = ("addEventListener('load',function(){var n=0,i=document.images;for(var k=0;"
          "k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0)n++}"
          "document.body.dataset.figures=n+'/'+i.length})")


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Render results into `out/report.html` (+ PNG figures) and return its path. A section
    that cannot be drawn says so in its place (and in the log); the others still are. Each
    stage in `results` draws its section (its declaration's `report`, shared.stages; stages
    sharing one, such as the CNN stages, draw it once), in the order the stages run."""
    parts: list[tuple[str, Callable[[], str]]] = [
        ("header", lambda: _header(results)), ("sites", lambda: _sites(results))]
    drawn: set[str] = set()
    for stage in stages.STAGES:
        if stage.name in results and stage.report and stage.report not in drawn:
            drawn.add(stage.report)
            parts.append((stage.name, partial(stages.load(stage.report), results, out)))
    parts += [("contributions", lambda: contribution_section(results)),
              ("privacy", lambda: privacy_section(results)), ("stages", lambda: _stages(results)),
              ("provenance", lambda: _provenance(results))]
    sections = [_section(name, draw) for name, draw in parts]
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>FedDLR study report</title><style>{STYLE}</style>"
            f"<script>{SCRIPT}</script></head><body>"
            + "\n".join(sections) + "</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# The stage sections drawn here, as shared.stages names them: f(results, out) -> html
def cohort_part(results: dict[str, Any], out: Path) -> str:
    return cohort_section(results["cohort"], out)


def radiomics_part(results: dict[str, Any], out: Path) -> str:
    return _radiomics(results["radiomics"], out, results)


def fusion_part(results: dict[str, Any], out: Path) -> str:
    return fusion_section(results)


def survival_part(results: dict[str, Any], out: Path) -> str:
    return _survival(results["survival"], out, results)


def _section(name: str, draw: Callable[[], str]) -> str:
    try:
        return draw()
    except Exception as err:  # a drawing bug must not cost the rest of the report
        log.exception("report: the %s section could not be drawn", name)
        return (f"<h2>{_e(name)}</h2><p class='bad'>This section could not be drawn "
                f"({_e(type(err).__name__)}: {_e(err)}); results.json holds its numbers.</p>")


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
              "&lt;k (suppressed at the site). <i>excluded</i>: rows of clinical.csv the site "
              "left out when it read them; the patients each stage left out (their images, "
              "by reason) are listed under Stages.</p>")


def _count(value: Any) -> str:
    return "&lt;k" if value is None else _e(value)


def _stages(results: dict[str, Any]) -> str:
    stages = results.get("run", {}).get("stages", {})
    rows = [[_e(k), _e(v.get("status")),
             _e(v.get("reason") or f"{v.get('seconds', 0):.1f} s")] for k, v in stages.items()]
    excluded = [[_e(stage), _e(reason), _e(", ".join(
        f"{site} {'<k' if n is None else n}" for site, n in counts.items()))]
        for stage, v in [("clinical.csv", {"excluded": results.get("run", {}).get("excluded")}),
                         *stages.items()]
        for reason, counts in (v.get("excluded") or {}).items()]
    text = ("<h3>Patients left out by the stages</h3>"
            + _table(["stage", "reason", "patients per site"], excluded)
            + "<p class='muted'>Each site's own count of the patients it left out of the "
              "stage for that reason (&lt;k: between 1 and its min_cell_count, suppressed at "
              "the site); results.json: <code>run.stages.&lt;stage&gt;.excluded</code>. "
              "The sites table's <i>excluded</i> counts clinical rows only.</p>"
            if excluded else "")
    return "<h2>Stages</h2>" + _table(["stage", "status", "detail"], rows) + text


def _provenance(results: dict[str, Any]) -> str:
    prov = results.get("provenance", {})
    return ("<h2>Provenance</h2><details><summary>config, versions, site data hashes</summary>"
            f"<pre>{_e(json.dumps(prov, indent=2))}</pre></details>")


# --------------------------------------------------------------------------- survival

KM_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _survival(surv: dict[str, Any], out: Path, results: dict[str, Any] | None = None) -> str:
    unit = surv.get("time_unit") or ""
    bin_text = (f"times rounded up to multiples of {surv.get('time_bin'):g} {_e(unit)} at "
                "each site" if surv.get("time_bin") else "exact times")
    parts = [f"<h2>Survival (DFS)</h2><p class='muted'>{bin_text}; every number is exact "
             "against the pooled, equally binned rows of the sites that released it.</p>"]
    by_group = _km_groups(surv)
    for i, (group, groups) in enumerate(by_group.items()):
        if len(by_group) > 1:
            parts.append(f"<h3>By {_e(group)}</h3>")
        ticks = _at_risk_ticks(groups)
        name = "survival_km.png" if i == 0 else f"survival_km_{i + 1}.png"
        parts.append(f"<img src='{_km_figure(groups, ticks, unit, out, name)}' "
                     f"alt='Kaplan-Meier curves by {_e(group)} with numbers at risk'>")
        rows = [[_e(label), *[_e(_at_risk(c, t)) for t in ticks], _e(c.get("n")),
                 _e(c.get("n_events"))] for label, c in groups.items()]
        parts.append("<h3>Numbers at risk</h3>"
                     + _table(["group", *[f"{t:g} {unit}" for t in ticks], "n", "events"], rows))
        missing = [f"{_e(label)}: {_e(', '.join(c['sites_missing']))}"
                   for label, c in groups.items() if c.get("sites_missing")]
        if missing:
            parts.append("<p>Curves without these sites (their policy refused the table: "
                         "fewer than min_patients, or 1–2 events): " + "; ".join(missing)
                         + "</p>")
        logrank = surv.get("logrank_by", {}).get(group) or (surv.get("logrank") if i == 0
                                                            else None)
        if logrank and logrank.get("statistic") is not None:
            parts.append(f"<p>Log-rank test ({_e(', '.join(logrank['groups']))}): χ² = "
                         f"{logrank['statistic']:.3f} on {logrank['df']} df, p = "
                         f"{_p(logrank['p_value'])}.</p>")
    models = [(title, surv[key]) for key, title in
              (("cox", "Cox model (Efron ties), all covariates"),
               ("cox_stepwise", "Cox model after stepwise AIC"))
              if isinstance(surv.get(key), dict) and "coef" in surv[key]]
    for key in ("cox", "cox_stepwise"):  # a model that could not be fitted says why
        failed = surv.get(key)
        if isinstance(failed, dict) and failed.get("error"):
            why = "; ".join(f"{s}: {r}" for s, r in (failed.get("site_reasons") or {}).items())
            parts.append(f"<p class='bad'>{_e(key)}: not fitted: {_e(failed['error'])}"
                         + (f" ({_e(why)})" if why else "") + "</p>")
    design = surv.get("design") or {}
    if design.get("left_out"):  # a covariate of the run not in the model says why
        parts.append("<p class='bad'>Covariates left out of the Cox model: " + "; ".join(
            f"{_e(name)} ({_e(why)})" for name, why in design["left_out"].items()) + "</p>")
    if models:
        parts.append(f"<img src='{_forest_figure(models, out)}' "
                     "alt='forest plot of hazard ratios'>")
    for title, model in models:
        parts.append(f"<h3>{_e(title)}</h3>" + _cox_table(model)
                     + _cox_sites(model, results or {}))
        if "steps" in model:
            rows = [[_e(i), _e(step["action"]), _e(step.get("covariate") or ""),
                     f"{step['aic']:.2f}"] for i, step in enumerate(model["steps"])]
            parts.append("<details><summary>stepwise path "
                         f"({_e(model.get('direction'))})</summary>"
                         + _table(["step", "action", "covariate", "AIC"], rows) + "</details>")
    if surv.get("thresholds"):
        parts.append("<p class='muted'>Predicted labels: score ≥ "
                     + "; ".join(f"{_e(m)} {float(t):.3f}" for m, t in surv["thresholds"].items())
                     + " (the validation stage's training-site Youden cut).</p>")
    return "\n".join(parts)


def _km_groups(surv: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Curves per grouping (`label`, `predicted:<model>`, …), each {label: curve}; the
    overall curve alone when there is no grouping."""
    out: dict[str, dict[str, Any]] = {}
    for key, curve in surv.get("km", {}).items():
        if key != "all" and curve is not None and len(curve.get("time", [])):
            group = key.rsplit("=", 1)[0]
            out.setdefault(group, {})[_group_label(key, surv.get("task"))] = curve
    overall = surv.get("km", {}).get("all")
    if not out and overall is not None and len(overall.get("time", [])):
        out["all"] = {"all": overall}
    return out


def _group_label(key: str, task: str | None) -> str:
    """`label=1` shown with the task's group name (e.g. HER2-positive)."""
    names = {"her2-positive": ["HER2-negative", "HER2-positive"],
             "her2-low": ["HER2-zero", "HER2-low"]}.get(task or "")
    if names and key in ("label=0", "label=1"):
        return f"{names[int(key[-1])]} ({key})"
    return key


def _cox_table(model: dict[str, Any]) -> str:
    rows = []
    for name in model["covariates"]:
        rows.append([_e(name), f"{model['coef'][name]:.4f}", f"{model['se'][name]:.4f}",
                     f"{model['hazard_ratio'][name]:.3f} ({model['ci_lower'][name]:.3f}–"
                     f"{model['ci_upper'][name]:.3f})", _p(model["p_value"][name])])
    bound = model.get("concordance_bound") or [None, None]
    c_text = "—" if model.get("concordance") is None else f"{model['concordance']:.4f}"
    if bound[0] is not None and bound[0] != bound[1]:
        c_text += f" (bound {bound[0]:.4f}–{bound[1]:.4f}, {_e(model.get('concordance_method'))})"
    return (_table(["covariate", "coef", "SE", "HR (95% CI)", "p"], rows)
            + f"<p class='muted'>n = {_e(model.get('n'))}, events = {_e(model.get('events'))}, "
              f"partial log-likelihood = {model['log_likelihood']:.3f}, AIC = "
              f"{model['aic']:.2f}, C-index = {c_text}.</p>")


def _cox_sites(model: dict[str, Any], results: dict[str, Any]) -> str:
    """The sites whose patients make the fit's n, and each site of the stage that is not
    in it with why (its reasons in `site_reasons`, else what it refused on the wire)."""
    used = [str(s) for s in model.get("sites_used") or []]
    missing = [str(s) for s in model.get("sites_missing") or []]
    if not used and not missing:
        return ""
    reasons = model.get("site_reasons") or {}
    out = []
    for site in missing:
        why = reasons.get(site) or "; ".join(
            w for w in refusals(results, site, "survival") if "cox" in w.split(":")[0]) \
            or "; ".join(refusals(results, site, "survival")[:3]) \
            or "no complete case or too few events for its policy"
        out.append(f"{_e(site)} ({_e(why)})")
    text = f"<p>n = {_e(model.get('n'))} over the sites in the fit: {_e(', '.join(used))}"
    if out:
        text += ("; not in the fit, their patients refused by their policy or disclosure "
                 "ledger: " + "; ".join(out))
    return text + ".</p>"


def _at_risk_ticks(groups: dict[str, Any]) -> list[float]:
    """Five or six round time points (1, 2, 2.5 or 5 × 10^k apart) from 0 to the end."""
    end = max(float(np.max(np.asarray(c["time"], dtype=float))) for c in groups.values())
    if end <= 0:
        return [0.0]
    raw = end / 5
    power = 10 ** np.floor(np.log10(raw))
    step = next(f * power for f in (5, 2.5, 2, 1) if f * power <= raw)
    return [round(i * step, 6) for i in range(7) if i * step <= end]


def _at_risk(curve: dict[str, Any], t: float) -> int:
    """Patients at risk at t (time ≥ t): the count at the first curve time ≥ t."""
    times = np.asarray(curve["time"], dtype=float)
    at_risk = np.asarray(curve["at_risk"], dtype=float)
    idx = int(np.searchsorted(times, t, side="left"))
    return int(at_risk[idx]) if idx < len(times) else 0


def _km_figure(groups: dict[str, Any], ticks: list[float], unit: str, out: Path,
               name: str = "survival_km.png") -> str:
    fig, (ax, table) = plt.subplots(2, 1, figsize=(7, 4.8), sharex=True,
                                    gridspec_kw={"height_ratios": [4, 1.1]})
    for i, (label, c) in enumerate(groups.items()):
        color = KM_COLORS[i % len(KM_COLORS)]
        t = np.asarray(c["time"], dtype=float)
        ax.step(t, np.asarray(c["survival"], dtype=float), where="post", color=color,
                label=label)
        ax.fill_between(t, np.asarray(c["ci_lower"], dtype=float),
                        np.asarray(c["ci_upper"], dtype=float), step="post", color=color,
                        alpha=0.15, linewidth=0)
        for tick in ticks:
            table.text(tick, len(groups) - 1 - i, str(_at_risk(c, tick)), ha="center",
                       va="center", fontsize=8, color=color)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("disease-free survival")
    ax.set_title("Kaplan–Meier (95% CI)")
    ax.legend(frameon=False, fontsize=8, loc="lower left")
    table.set_ylim(-0.5, len(groups) - 0.5)
    table.set_yticks(range(len(groups)))
    table.set_yticklabels(list(groups)[::-1], fontsize=7)
    table.set_xticks(ticks)
    table.set_xlabel(f"time ({unit})" if unit else "time")
    table.set_title("number at risk", fontsize=8, loc="left")
    for side in ("top", "right", "left"):
        table.spines[side].set_visible(False)
    table.tick_params(axis="y", length=0)
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _forest_figure(models: list[tuple[str, dict[str, Any]]], out: Path) -> str:
    name = "survival_forest.png"
    rows = sum(len(m["covariates"]) for _, m in models) + len(models)
    fig, ax = plt.subplots(figsize=(7, 0.32 * rows + 1.2))
    y, labels, positions = 0, [], []
    for i, (title, model) in enumerate(models):
        color = KM_COLORS[i % len(KM_COLORS)]
        labels.append(title)
        positions.append(y)
        y -= 1
        for cov in model["covariates"]:
            hr, lo, hi = (model["hazard_ratio"][cov], model["ci_lower"][cov],
                          model["ci_upper"][cov])
            if all(v is not None and np.isfinite(v) and v > 0 for v in (hr, lo, hi)):
                ax.errorbar([hr], [y], xerr=[[hr - lo], [hi - hr]], fmt="s", color=color,
                            capsize=2, markersize=4)
            labels.append(f"  {cov}")
            positions.append(y)
            y -= 1
    ax.axvline(1.0, color="#777", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("hazard ratio (95% CI, log scale)")
    ax.set_title("Cox proportional hazards")
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _radiomics(block: dict[str, Any], out: Path,
               results: dict[str, Any] | None = None) -> str:
    icc_filter = block.get("icc_filter", {})
    icc_text = (f"ICC(2,1) &gt; {icc_filter['threshold']} kept {icc_filter['kept']} features "
                f"(readers at {_e(', '.join(icc_filter.get('sites', [])))})"
                if "kept" in icc_filter else f"ICC filter skipped: {_e(icc_filter.get('reason'))}")
    lasso = block.get("lasso", {})
    penalty = f"C = {lasso['C']}" if "C" in lasso else f"alpha = {lasso.get('alpha')}"
    parts = [
        "<h2>Radiomics (pyradiomics → ICC → LASSO → screening → LR)</h2>",
        f"<p>{block['features']['n_extracted']} features per patient; {icc_text}; "
        f"{len(block['standardization'].get('dropped', {}))} constant after pooled "
        "standardization.</p>",
        f"<p>LASSO ({_e(lasso.get('loss'))}, {penalty}, {_e(lasso.get('mode'))} rounds: "
        f"{_e(lasso.get('rounds'))}) on all training rows selected "
        f"{len(lasso.get('selected', []))}; {_e(block['screen'].get('method'))} screening "
        f"(top {_e(block['screen'].get('percentile'))} %) kept "
        f"{len(block.get('selected', []))}. Selection: {_e(block.get('selection'))}; "
        f"{len(block.get('folds', []))}-fold CV, L2 logistic regression per fold.</p>",
    ]
    parts.append(_harmonization(block.get("harmonization", {}), out))
    if lasso.get("selected"):
        parts.append(f"<img src='{_lasso_figure(lasso, out)}' alt='LASSO coefficients'>")
    rows, notes = [], []
    auc = block.get("auc", {})
    sets = [(name, label, auc[name]) for name, label in
            (("train_oof", "training sites, out-of-fold"), ("external", "external sites"))
            if name in auc]
    sets += [(f"sites/{site}", site, entry) for site, entry in auc.get("sites", {}).items()]
    for key, label, entry in sets:
        shown, note = agreed(results or {}, "radiomics", key, entry, label)
        rows.append([_e(label), *_auc_cells(shown)])
        notes.append(note)
    parts.append(_table(["patients", "AUC", "bound (histogram grid)", "n (neg/pos)",
                         "not released"], rows))
    parts.append(notes_paragraph(notes))
    return "\n".join(parts)


def _harmonization(block: dict[str, Any], out: Path) -> str:
    """ComBat's line: what was harmonized, and how many features differ by site (one-way
    ANOVA, p < threshold) before and after, with the per-feature F as a figure."""
    if block.get("method", "none") == "none":
        return "<p>Features not harmonized across sites (<code>harmonize = none</code>).</p>"
    if block.get("status") != "ok":
        return f"<p>ComBat harmonization skipped: {_e(block.get('reason'))}</p>"
    options = block.get("options", {})
    effect = block.get("site_effect", {})
    text = (f"<p>ComBat ({'empirical Bayes' if options.get('eb') else 'no EB'}, "
            f"{'parametric' if options.get('parametric') else 'non-parametric'}"
            + (f", covariates {_e(', '.join(options['covariates']))}"
               if options.get("covariates") else "")
            + f") on {block.get('features')} features, fitted on "
            f"{_e(', '.join(block.get('sites', [])))}"
            + (f", applied also at {_e(', '.join(block['external']))}"
               if block.get("external") else "") + ". ")
    if "before" not in effect:
        return text + f"Site effect not measured: {_e(effect.get('reason'))}</p>"
    p = effect.get("p_threshold")
    text += (f"Features that differ by site (one-way ANOVA of site, p &lt; {p}): "
             f"{effect['before']['n_site_dependent']} before, "
             f"{effect['after']['n_site_dependent']} after.</p>")
    return text + f"<img src='{_site_effect_figure(effect, out)}' alt='site effect per feature'>"


def _site_effect_figure(effect: dict[str, Any], out: Path) -> str:
    name = "radiomics_site_effect.png"
    fig, ax = plt.subplots(figsize=(6, 3))
    for when, color in (("before", "#c44e52"), ("after", "#4c72b0")):
        f = np.array([v for v in effect[when]["f"].values() if v is not None], dtype=float)
        ax.hist(np.log10(np.maximum(f, 1e-6)), bins=40, alpha=0.6, color=color, label=when)
    ax.set_xlabel("log10 F of site (one-way ANOVA per feature)")
    ax.set_ylabel("features")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _auc_cells(entry: dict[str, Any]) -> list[str]:
    if entry.get("auc") is None:
        return ["—", "", "", _e(", ".join(entry.get("sites_missing", [])))]
    low, high = entry.get("bound") or (None, None)
    bound = "" if low is None or high is None else f"{low:.3f} – {high:.3f}"
    return [f"{entry['auc']:.3f}", bound, _e("/".join(map(str, entry.get("n") or []))),
            _e(", ".join(entry.get("sites_missing", [])))]


def _lasso_figure(lasso: dict[str, Any], out: Path) -> str:
    name = "radiomics_lasso.png"
    chosen = sorted(lasso["selected"], key=lambda f: abs(lasso["coef"][f]))[-20:]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(chosen) + 1.2))
    ax.barh(chosen, [lasso["coef"][f] for f in chosen], color="#4c72b0")
    ax.axvline(0, color="#444", lw=0.8)
    ax.set_xlabel("coefficient (pooled z-scores)")
    ax.set_title("LASSO-selected radiomics features")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name
