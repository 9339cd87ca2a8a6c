"""Report sections of the fusion and validation stages, the per-site contribution table and the
privacy summary, rendered from a realistic results dict.

The metrics blocks are real: logistic models on the Wisconsin breast-cancer set, fitted on two
"training" sites and scored on those and one "external" site, with every metric computed by
scikit-learn / scipy. One outside model has sites whose policy refused their histograms, so
its blocks hold None and missing keys, and a failed site's reason carries HTML.
"""

from __future__ import annotations

import copy
import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from server.report.page import write_report
from server.report.validation import (
    contribution_section,
    fusion_section,
    privacy_section,
    validation_sections,
)
from tests.splits import wisconsin

SITES = ["site-1", "site-2", "site-3"]
TRAINING, EXTERNAL = ["site-1", "site-2"], ["site-3"]
FEATURES = {"radiomics": ["mean texture", "mean smoothness", "mean concavity"],
            "dsfr": ["mean symmetry", "texture error", "mean fractal dimension", "area error"]}
OUTSIDE = "vendor A&B <v2>"  # an outside model whose name needs escaping
BAD_REASON = "<script>alert('x')</script> & fewer than min_patients < 5"
PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- metrics

def _f1_ci(tp: int, fp: int, fn: int) -> list[float]:
    f1 = 2 * tp / (2 * tp + fp + fn)
    se = np.sqrt(4 * tp * (fp + fn) * (tp + fp + fn)) / (2 * tp + fp + fn) ** 2
    return [max(f1 - 1.96 * se, 0.0), min(f1 + 1.96 * se, 1.0)]


def _wilson(k: int, n: int) -> list[float] | None:
    if n == 0:
        return None
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(centre - half), float(centre + half)]


def _ratio(k: int, n: int) -> float | None:
    return k / n if n else None


def _youden(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return {"threshold": float(min(thresholds[best], 1.0)), "sen": float(tpr[best]),
            "spe": float(1 - fpr[best]), "j": float(tpr[best] - fpr[best])}


def metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """A metrics block as the validation stage writes it, from labels and probabilities."""
    n0, n1 = int((y == 0).sum()), int((y == 1).sum())
    auc = float(roc_auc_score(y, p))
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)  # Hanley-McNeil standard error
    se = float(np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2)
                        + (n0 - 1) * (q2 - auc ** 2)) / (n0 * n1)))
    pred = p >= threshold
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    fn, tn = int((~pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    logit = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    recal = LogisticRegression(C=1e6).fit(logit[:, None], y)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=8)
    fpr, tpr, _ = roc_curve(y, p)
    return {
        "auc": auc, "auc_ci": [max(auc - 1.96 * se, 0.0), min(auc + 1.96 * se, 1.0)],
        "auc_se": se, "auc_bound": [auc - 0.004, auc + 0.004], "exact": False, "n": [n0, n1],
        "threshold": threshold, "threshold_source": "training",
        "confusion": [[tn, fp], [fn, tp]],
        "acc": (tp + tn) / len(y), "sen": _ratio(tp, tp + fn), "spe": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn), "f1": f1,
        "ci": {"acc": _wilson(tp + tn, len(y)), "sen": _wilson(tp, tp + fn),
               "spe": _wilson(tn, tn + fp), "ppv": _wilson(tp, tp + fp),
               "npv": _wilson(tn, tn + fn), "f1": _f1_ci(tp, fp, fn)},
        "own": _youden(y, p),
        "brier": float(brier_score_loss(y, p)),
        "calibration_slope": float(recal.coef_[0][0]),
        "calibration_intercept": float(recal.intercept_[0]),
        "calibration": {"prob_true": prob_true.tolist(), "prob_pred": prob_pred.tolist(),
                        "count": np.histogram(p, bins=8, range=(0, 1))[0].tolist()},
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "sites_missing": [],
    }


def _fit_predict(frame: Any, train: np.ndarray, features: list[str]) -> np.ndarray:
    x = frame[features].to_numpy(dtype=float)
    x = (x - x[train].mean(axis=0)) / x[train].std(axis=0)
    model = LogisticRegression(C=1.0, max_iter=1000).fit(x[train], frame.label[train])
    return model.predict_proba(x)[:, 1]


def realistic_results() -> dict[str, Any]:
    """results.json of a run with fusion and validation, three sites and a failed fourth."""
    frame = wisconsin()
    rng = np.random.default_rng(7)
    site = np.array(SITES)[np.repeat([0, 1, 2], [200, 200, len(frame) - 400])]
    site = site[rng.permutation(len(frame))]
    y = frame.label.to_numpy()
    train = np.isin(site, TRAINING)
    scores = {name: _fit_predict(frame, train, cols) for name, cols in FEATURES.items()}
    scores["dlr"] = (scores["radiomics"] + scores["dsfr"]) / 2
    noise = rng.normal(0, 0.25, len(frame))
    scores[OUTSIDE] = np.clip(0.8 * scores["radiomics"] + noise * 0.3 + 0.1, 0.01, 0.99)
    models = ["radiomics", "dsfr", "dlr", OUTSIDE]
    large = frame["mean area"].to_numpy() > np.median(frame["mean area"])
    validation: dict[str, Any] = {
        "grid": {"bins": 200, "note": "scores snapped to the centres of 200 equal bins on "
                                      "[0, 1] at each site before counting"},
        "models": models, "sets": {m: {"pooled": SITES, "training": TRAINING,
                                       "external": EXTERNAL} for m in models},
        "sites": {"site-1": {"status": "ok"}, "site-2": {"status": "ok"},
                  "site-3": {"status": "ok"},
                  "site-4": {"status": "failed", "reason": BAD_REASON}},
    }
    for name in models:
        p = scores[name]
        threshold = _youden(y[train], p[train])["threshold"]
        block = {
            "kinds": {s: "out-of-fold" if s in TRAINING else "external" for s in SITES},
            "threshold": {"value": threshold, "source": "training",
                          "rule": "Youden J on the grid's edges, score >= threshold"},
            "pooled": metrics(y, p, threshold),
            "training": metrics(y[train], p[train], threshold),
            "external": metrics(y[~train], p[~train], threshold),
            "sites": {s: metrics(y[site == s], p[site == s], threshold) for s in SITES},
            "subgroups": {"mean_area=large": metrics(y[large], p[large], threshold),
                          "mean_area=small": metrics(y[~large], p[~large], threshold)},
        }
        validation[name] = block
    # the outside model: site-3's policy refused its histograms
    outside = validation[OUTSIDE]
    outside.pop("external")
    validation["sets"][OUTSIDE] = {"pooled": SITES, "training": TRAINING}
    outside["sites"]["site-3"] = {"auc": None, "auc_ci": None, "n": None, "threshold": None,
                                  "ci": None, "own": None, "sites_missing": ["site-3"]}
    outside["pooled"] = metrics(y[train], scores[OUTSIDE][train], outside["pooled"]["threshold"])
    outside["pooled"]["sites_missing"] = ["site-3"]
    outside["subgroups"]["mean_area=small"] = None
    comparisons = []
    for a, b in (("radiomics", "dsfr"), ("dlr", "radiomics")):
        for set_name in ("pooled", "external"):
            ma, mb = validation[a][set_name], validation[b][set_name]
            delta = ma["auc"] - mb["auc"]
            z = delta / np.hypot(ma["auc_se"], mb["auc_se"])
            comparisons.append({"set": set_name, "models": [a, b],
                                "auc": [ma["auc"], mb["auc"]], "delta_auc": delta, "z": z,
                                "p_value": float(2 * stats.norm.sf(abs(z))), "exact": False})
    comparisons.append({"set": "site:site-3", "models": ["radiomics", OUTSIDE], "auc": None,
                        "delta_auc": None, "z": None, "p_value": None,
                        "reason": "site-3 did not release the paired deviations"})
    validation["comparisons"] = comparisons
    loso: dict[str, Any] = {"models": ["radiomics", "dsfr"], "sites": {}}
    for held in SITES:
        rest = site != held
        loso["sites"][held] = {}
        for name in ("radiomics", "dsfr"):
            p = _fit_predict(frame, rest, FEATURES[name])
            m = metrics(y[~rest], p[~rest], 0.5)
            loso["sites"][held][name] = {"auc": m["auc"], "auc_ci": m["auc_ci"], "n": m["n"]}
    loso["sites"]["site-4"] = {m: {"auc": None, "reason": "radiomics: too few <10> rows"}
                               for m in loso["models"]}
    loso["note"] = ("each row: the model fitted federated on every other site, validated on "
                    "the held-out site")
    validation["loso"] = loso

    def wire(types: list[str]) -> list[dict[str, Any]]:
        return [{"message_type": t, "bytes": int(rng.integers(200, 90_000)),
                 "sha256": f"{i:02d}" + "ab" * 31} for i, t in enumerate(types)]

    log = ["query.handshake", "query.cohort_sums", "query.cohort_squares",
           "query.fusion_fit", "query.fusion_fit", "query.validation_histograms"]
    run_wire = {s: wire(log) for s in SITES}
    run_wire["site-3"] = wire(log[:3] + log[-1:])
    run_wire["site-3"][-1]["refused"] = [f"hist.{OUTSIDE}.label0", f"hist.{OUTSIDE}.label1"]
    run_wire["site-4"] = wire(["query.handshake"])
    rows = [{"site_id": s, "roles": ["train"] if s in TRAINING else ["external"],
             "n_patients": int((site == s).sum()), "n_excluded": 1, "status": "ok",
             "reason": None} for s in SITES]
    rows.append({"site_id": "site-4", "roles": ["train"], "n_patients": None, "n_excluded": 0,
                 "status": "failed", "reason": BAD_REASON})
    return {
        "run": {"run_id": "r-test", "started": "2025-01-01T00:00:00", "finished":
                "2025-01-01T00:10:00",
                "config": {"task": "her2-positive", "stages": ["fusion", "validation"]},
                "sites": rows, "wire": run_wire,
                "stages": {"fusion": {"status": "ok", "seconds": 1.2},
                           "validation": {"status": "ok", "seconds": 3.4}}},
        "fusion": {
            "dlr": {"models": ["radiomics", "dsfr"], "sites": SITES},
            "fusion": {"models": ["dl_mri", "dl_us"], "coef": {"dl_mri": 1.2345, "dl_us": 0.8},
                       "intercept": -1.0, "C": 1.0, "rounds": 6, "sites": TRAINING,
                       "converged": True, "external": EXTERNAL, "restarts": []},
            "sites": {**{s: {"status": "ok"} for s in TRAINING},
                      "site-3": {"status": "ok"}, "site-4": {"status": "failed",
                                                             "reason": BAD_REASON}},
        },
        "validation": validation,
        "provenance": {"config": {"task": "her2-positive"}},
    }


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return realistic_results()


@pytest.fixture(scope="module")
def rendered(results: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("report")
    return validation_sections(results, out), out


def metrics_row(page: str, model: str, site: str) -> list[str]:
    """The cells of `site`'s row in the metrics table of `model`'s section of the page."""
    start = page.index(f"<h3>{html.escape(model)}</h3>")
    end = page.find("<h3>", start + 1)
    section = page[start:end if end > 0 else len(page)]
    table = section[section.index("<table class='metrics'>"):]
    table = table[:table.index("</table>")]
    rows = [r for r in table.split("<tr>") if r.startswith(f"<td>{site}<br>")]
    assert len(rows) == 1, (model, site, rows)
    return re.findall(r"<td>(.*?)</td>", rows[0])


# --------------------------------------------------------------------------- tests

def test_validation_section_shows_every_model_with_formatted_aucs(
        results: dict[str, Any], rendered: tuple[str, Path]) -> None:
    page, _ = rendered
    assert page.startswith("<h2>Validation</h2>")
    assert "200 bins" in page and "bound" in page and "Youden" in page
    for name in results["validation"]["models"]:
        assert f"<h3>{html.escape(name)}</h3>" in page
        block = results["validation"][name]
        low, high = block["pooled"]["auc_ci"]
        assert f"{block['pooled']['auc']:.3f}<br><small class='muted'>{low:.3f}–{high:.3f}" \
            in page
    # each site's row of each model: its AUC, or (site-3 refused the outside model's
    # histograms) a dash and the site named as not released
    refused = []
    for name in results["validation"]["models"]:
        for s in SITES:
            entry = results["validation"][name]["sites"][s]
            cells = metrics_row(page, name, s)
            if entry["auc"] is None:
                refused.append((name, s))
                assert cells[2] == "—" and cells[-1] == s, cells
            else:
                assert cells[2].startswith(f"{entry['auc']:.3f}<br>"), cells
    assert refused == [(OUTSIDE, "site-3")]
    radiomics = results["validation"]["radiomics"]["pooled"]
    assert f"{radiomics['threshold']:.3f}" in page
    assert f"{radiomics['sen']:.3f}" in page and f"{radiomics['brier']:.3f}" in page
    n0, n1 = radiomics["n"]
    assert f"{n0} / {n1}" in page
    assert "out-of-fold" in page and "external" in page
    assert "Training sites: site-1, site-2; external sites: site-3." in page
    assert f"Threshold {radiomics['threshold']:.3f}: Youden cut of the training set" in page


def test_fusion_section_explains_dlr_and_lists_coefficients(results: dict[str, Any]) -> None:
    page = fusion_section(results)
    assert "mean of the predicted probabilities of radiomics and dsfr" in page
    assert "<td>dl_mri</td><td>1.2345</td>" in page and "<td>dl_us</td><td>0.8000</td>" in page
    assert "<td><i>intercept</i></td><td>-1.0000</td>" in page
    assert "in 6 rounds" in page and "also scored at site-3" in page
    skipped = fusion_section({"fusion": {
        "dlr": {"skipped": "no site has both radiomics and DSFR probabilities"},
        "fusion": {"models": ["dl_mri", "dl_us"], "skipped": "no training site <x>"}}})
    assert "DLR not computed: no site has both" in skipped
    assert "not fitted: no training site &lt;x&gt;" in skipped


def test_comparisons_subgroups_and_loso_are_tabulated(results: dict[str, Any],
                                                       rendered: tuple[str, Path]) -> None:
    page, _ = rendered
    for c in results["validation"]["comparisons"]:
        if c["auc"] is None:  # a comparison that could not be made shows why
            row = (f"<td>{c['set']}</td><td>radiomics vs {html.escape(OUTSIDE)}</td>"
                   f"<td>—</td><td>—</td><td>—</td><td>—</td><td>—</td>"
                   f"<td>{c['reason']}</td>")
        else:
            row = (f"<td>{c['set']}</td><td>{c['models'][0]} vs {c['models'][1]}</td>"
                   f"<td>{c['auc'][0]:.3f} / {c['auc'][1]:.3f}</td>"
                   f"<td>{c['delta_auc']:.3f}</td><td>{c['z']:.2f}</td>"
                   f"<td>{c['p_value']:.3f}</td><td>binned</td><td></td>")
        assert row in page
    assert "mean_area=large" in page and "mean_area=small" in page
    loso = page[page.index("Leave-one-site-out"):]
    assert "Each row: the model fitted federated on every other site" in loso
    for held, by_model in results["validation"]["loso"]["sites"].items():
        assert f"<tr><td>{held}</td>" in loso
        for entry in by_model.values():
            if entry["auc"] is None:
                assert f"<li>{held}, radiomics: radiomics: too few &lt;10&gt; rows</li>" in loso
            else:
                assert f"{entry['auc']:.3f}<br>" in loso


def test_figures_are_written_beside_the_report(rendered: tuple[str, Path]) -> None:
    page, out = rendered
    sources = re.findall(r"<img src='([^']+)' alt='[^']+'>", page)
    assert set(sources) == {"roc_pooled.png", "calibration.png", "loso.png", "roc_radiomics.png",
                            "roc_dsfr.png", "roc_dlr.png", "roc_vendor_A_B_v2.png"}
    for name in sources:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name


def test_missing_values_render_as_dashes(results: dict[str, Any], tmp_path: Path) -> None:
    page = validation_sections(results, tmp_path)
    outside = page[page.index(f"<h3>{html.escape(OUTSIDE)}</h3>"):]
    outside = outside[:outside.index("</table>")]
    assert "site-3<br><small class='muted'>external</small></td><td>—</td><td>—</td>" in outside
    assert "external sites" not in outside  # that set is absent for this model
    assert "Not in the pooled rows above: site-3" in page

    broken = copy.deepcopy(results)
    val = broken["validation"]
    val["radiomics"]["pooled"] = {k: None for k in results["validation"]["radiomics"]["pooled"]}
    val["radiomics"]["sites"]["site-1"] = {}
    val["radiomics"]["sites"]["site-2"] = {"auc": float("nan"), "auc_ci": [None, 0.9],
                                           "n": [None, 4], "ci": {"sen": None}, "exact": True,
                                           "confusion": [[1, 2]], "roc": {"fpr": [0, 1]}}
    val["dsfr"] = None
    val["comparisons"] = [{"set": "pooled", "models": None, "auc": [None, 0.7], "z": None},
                          None]
    val["loso"] = {"models": ["radiomics"], "sites": {"site-1": None, "site-2": {
        "radiomics": {"auc": None}}}}
    val.pop("grid")
    val["sets"] = {"training": ["site-1", "site-2"], "external": ["site-3"]}  # one for all
    page = validation_sections(broken, tmp_path)
    assert "<h3>radiomics</h3>" in page and "—" in page
    assert "Training sites: site-1, site-2; external sites: site-3." in page
    assert "&lt;k / 4" in page  # a suppressed count
    assert "No results for this model." in page  # dsfr
    assert "loso.png" not in page  # no AUC to draw

    assert validation_sections({"validation": {}}, tmp_path).startswith("<h2>Validation</h2>")
    assert validation_sections({"validation": None}, tmp_path)
    assert fusion_section({"fusion": {}}).count("not") >= 2
    assert "—" in fusion_section({"fusion": {"fusion": {"coef": {"a": None}}}})
    empty = {"run": {"sites": [{"site_id": "s"}], "wire": {"s": [
        {"bytes": None}, "junk", {"message_type": "query.x", "bytes": 10, "direction": "down"}]}}}
    assert "<tr><td>s</td><td>—</td><td>—</td><td>—</td><td><span>—</span></td><td>1</td>" \
        "<td>—</td></tr>" in contribution_section(empty)
    assert "<tr><td>s</td><td>1</td><td>—</td><td>—</td>" in privacy_section(empty)


def test_sections_are_absent_without_their_stage(results: dict[str, Any], tmp_path: Path) -> None:
    assert validation_sections({"run": {}}, tmp_path) == ""
    assert fusion_section({"run": {}}) == ""
    assert contribution_section({"run": {}}) == "" and privacy_section({}) == ""
    assert list(tmp_path.iterdir()) == []


def test_html_in_a_site_reason_is_escaped(results: dict[str, Any], tmp_path: Path) -> None:
    page = write_report(results, tmp_path).read_text(encoding="utf-8")
    assert "<script>alert" not in page
    escaped = html.escape(BAD_REASON)
    assert escaped in validation_sections(results, tmp_path)
    assert escaped in fusion_section(results)
    assert escaped in contribution_section(results)  # as the stage cell's tooltip
    assert html.escape(OUTSIDE) in page and OUTSIDE not in page


def test_contribution_table_has_stages_messages_and_bytes(results: dict[str, Any]) -> None:
    page = contribution_section(results)
    head = page[page.index("<thead>"):page.index("</thead>")]
    assert re.findall(r"<th>([^<]+)</th>", head) == [
        "site", "roles", "patients", "excluded", "status", "fusion", "validation",
        "messages sent", "bytes sent"]
    for row in results["run"]["sites"]:
        s = row["site_id"]
        log = results["run"]["wire"][s]
        total = sum(w["bytes"] for w in log)
        text = f"{total / 1024:.1f} KiB" if total >= 1024 else f"{total} B"
        assert re.search(rf"<tr><td>{s}</td>.*?<td>{len(log)}</td><td>{text}</td></tr>", page)
    site4 = page[page.index("<tr><td>site-4</td>"):]
    site4 = site4[:site4.index("</tr>")]
    assert "&lt;k" in site4 and "class='bad'" in site4 and site4.count("✓") == 0
    # site-1..3 took part in fusion and validation, but site-3's policy refused its
    # histograms of the outside model: not ticked there, the part named (issue 26)
    assert page.count("✓</td>") >= 5
    site3 = page[page.index("<tr><td>site-3</td>"):]
    site3 = site3[:site3.index("</tr>")]
    assert "left out of vendor A&amp;B &lt;v2&gt; pooled" in site3, site3


def test_privacy_summary_counts_replies_by_type(results: dict[str, Any]) -> None:
    page = privacy_section(results)
    assert "No patient-level value" in page and "&lt;site&gt;/predictions/" in page
    assert "audit/egress.jsonl" in page
    assert "query.fusion_fit × 2" in page and "query.validation_histograms × 1" in page
    site3 = page[page.index("<tr><td>site-3</td>"):]
    assert site3.startswith("<tr><td>site-3</td><td>4</td>")
    assert "<td>2</td>" in site3[:site3.index("</tr>")]  # two refused statistics
    sha = results["run"]["wire"]["site-1"][0]["sha256"]
    assert f"<code>{sha}</code>" in page


def test_write_report_puts_sections_in_order(results: dict[str, Any], tmp_path: Path) -> None:
    page = write_report(results, tmp_path).read_text(encoding="utf-8")
    headings = re.findall(r"<h2>([^<]+)</h2>", page)
    assert headings == ["Sites", "Fusion (DLR and late fusion)", "Validation",
                        "Per-site contribution", "Privacy summary", "Stages", "Provenance"]
    assert "data-figures" not in page and "document.body.dataset.figures" in page
