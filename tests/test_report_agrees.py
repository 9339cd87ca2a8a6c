"""The report agrees with itself and with results.json (issue 26, point 6): rendered from
results shaped as the stages write them (the numbers of a demo run), no study run.

- Cohort: each column of a covariate adds up to the header's n. Before: lesion_type's
  levels summed to 45/52 under a header of 63/69 (centre-2's table was refused by its
  policy and two patients had no value), and nothing in the table said so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from server.report.page import write_report


def cohort() -> dict[str, Any]:
    """A cohort block as server/stages/cohort.py writes it: centre-2 refused lesion_type
    (a cell below min_cell_count); two HER2-zero patients have no hr_status, three no ki67."""
    return {
        "task": "her2-low", "groups": ["HER2-zero", "HER2-low"],
        "n": {"pooled": [63, 69], "sites": {"centre-1": [23, 29], "centre-2": [18, 17],
                                            "centre-3": [22, 23]}, "sites_missing": []},
        "covariates": {
            "ki67": {"type": "numeric", "n": [60, 69], "mean": [20.0, 25.0],
                     "sd": [5.0, 6.0], "t_test": {"p_value": 0.2}, "sites_missing": [],
                     "sites": {"centre-1": {"n": [23, 29], "mean": [20.0, 25.0],
                                            "sd": [5.0, 6.0], "t_test": {"p_value": 0.3}}}},
            "hr_status": {"type": "categorical", "levels": ["negative", "positive"],
                          "counts": [[23, 11], [38, 58]], "chi2": {"p_value": 0.01},
                          "sites_missing": [], "sites": {}},
            "lesion_type": {"type": "categorical", "levels": ["mass", "non-mass"],
                            "counts": [[37, 41], [8, 11]], "chi2": {"p_value": 0.87},
                            "sites_missing": ["centre-2"],
                            "sites": {"centre-1": {"levels": ["mass", "non-mass"],
                                                   "counts": [[19, 24], [4, 5]],
                                                   "chi2": {"p_value": 1.0}}}}},
        "sites": {}, "sites_used": ["centre-1", "centre-2", "centre-3"], "restarts": []}


def report(results: dict[str, Any], tmp_path: Path) -> str:
    results = {"run": {"run_id": "t", "config": {"task": "her2-low"}, "stages": {},
                       "sites": []}, **results}
    return write_report(results, tmp_path).read_text(encoding="utf-8")


def rows_of(html: str, first_cell: str) -> list[list[str]]:
    """The cells of every table row whose first cell contains `first_cell`."""
    out = []
    for row in re.findall(r"<tr>(.*?)</tr>", html):
        cells = re.findall(r"<td>(.*?)</td>", row)
        if cells and first_cell in cells[0]:
            out.append(cells)
    return out


def pooled_table(html: str) -> str:
    return html.split("<h3>Pooled</h3>")[1].split("</table>")[0]


def test_every_cohort_column_adds_up_to_the_header(tmp_path: Path) -> None:
    html = pooled_table(report({"cohort": cohort()}, tmp_path))
    assert "HER2-zero (n=63)" in html and "HER2-low (n=69)" in html
    refused = rows_of(html, "not released")
    assert len(refused) == 1 and "centre-2" in refused[0][0], refused
    assert refused[0][1:3] == ["18", "17"]
    missing = rows_of(html, "no value")
    # hr_status: 61/69 counted -> 2/0 with no value; ki67: n 60/69 -> 3/0
    assert [m[1:3] for m in missing] == [["3", "0"], ["2", "0"]], missing


def test_a_site_table_adds_up_to_its_own_header(tmp_path: Path) -> None:
    block = cohort()
    block["covariates"]["lesion_type"]["sites"]["centre-1"]["counts"] = [[18, 24], [4, 5]]
    html = report({"cohort": block}, tmp_path)
    site = html.split("<summary>centre-1</summary>")[1].split("</table>")[0]
    assert "HER2-zero (n=23)" in site
    assert [m[1:3] for m in rows_of(site, "no value")] == [["1", "0"]]


# --------------------------------------------------------------------------- survival

LEDGER = ("differs from an earlier release of the same statistic by fewer than "
          "min_difference (10) patients")


def survival_results() -> dict[str, Any]:
    """centre-2's ledger refused its Cox cohort (`cox.setup`) and its KM table: the fit is
    centre-1's 68 patients; `survival.sites` still says ok for both (server/stages/survival.py)."""
    cox = {"covariates": ["age"], "terms": ["age"], "coef": {"age": 0.01},
           "se": {"age": 0.02}, "z": {"age": 0.5}, "hazard_ratio": {"age": 1.01},
           "ci_lower": {"age": 0.97}, "ci_upper": {"age": 1.05}, "p_value": {"age": 0.6},
           "log_likelihood": -80.0, "aic": 162.0, "converged": True, "n": 68, "events": 20,
           "sites_used": ["centre-1"], "sites_missing": ["centre-2"], "concordance": 0.6}
    km = {"time": [0.0, 30.0], "survival": [1.0, 0.9], "ci_lower": [1.0, 0.8],
          "ci_upper": [1.0, 1.0], "at_risk": [68, 60], "events": [0, 7], "n": 68,
          "n_events": 7, "sites_used": ["centre-1"], "sites_missing": ["centre-2"]}
    wire = {"centre-1": [{"message_type": "query.survival_setup", "bytes": 100}],
            "centre-2": [{"message_type": "query.survival_setup", "bytes": 80,
                          "why": {"cox.setup": LEDGER, "km.g0": LEDGER}}]}
    return {"run": {"run_id": "t", "config": {"task": "her2-low"},
                    "stages": {"survival": {"status": "ok", "seconds": 1.0}},
                    "sites": [{"site_id": s, "roles": ["survival"], "n_patients": n,
                               "status": "ok"} for s, n in (("centre-1", 68),
                                                            ("centre-2", 30))],
                    "wire": wire},
            "survival": {"task": "her2-low", "time_bin": 30.0, "time_unit": "days",
                         "sites": {"centre-1": {"status": "ok", "reason": None},
                                   "centre-2": {"status": "ok", "reason": None}},
                         "km": {"all": km}, "cox": cox}}


def test_a_site_whose_patients_were_refused_is_not_ticked(tmp_path: Path) -> None:
    html = write_report(survival_results(), tmp_path).read_text(encoding="utf-8")
    contribution = html.split("<h2>Per-site contribution</h2>")[1].split("</table>")[0]
    row = rows_of(contribution, "centre-2")[0]
    survival_cell = row[5]
    assert "✓" not in survival_cell and "left out" in survival_cell, row
    assert "cox" in survival_cell and LEDGER in survival_cell
    assert rows_of(contribution, "centre-1")[0][5] == "✓"


def test_the_cox_section_names_the_sites_of_its_n_and_why_one_is_not(tmp_path: Path) -> None:
    html = write_report(survival_results(), tmp_path).read_text(encoding="utf-8")
    section = html.split("Cox model (Efron ties)")[1].split("<h2>")[0]  # to the next section
    assert "n = 68" in section
    line = section.split("C-index")[1]
    assert "n = 68 over the sites in the fit: centre-1" in line, line
    assert "centre-2" in line and "not in the fit" in line and LEDGER in line, line


# --------------------------------------------------------------------------- one AUC


def radiomics_block(auc: float, n: list[int]) -> dict[str, Any]:
    """The radiomics stage's block, as server/stages/radiomics.py writes it (AUC part: its own
    histogram estimate, known only within its bound)."""
    entry = {"auc": auc, "bound": [0.90, 1.0], "exact": False, "n": n, "sites_missing": []}
    return {"features": {"n_extracted": 107}, "icc_filter": {"reason": "no reader 2"},
            "standardization": {}, "lasso": {"loss": "logistic", "C": 0.1},
            "screen": {"method": "mi", "percentile": 50}, "selected": ["f1"],
            "selection": "lasso", "folds": [0, 1],
            "auc": {"train_oof": entry, "sites": {"centre-1": dict(entry)}}}


def validation_block(auc: float, n: list[int]) -> dict[str, Any]:
    entry = {"auc": auc, "auc_ci": [0.85, 1.0], "auc_bound": [0.91, 0.99], "exact": False,
             "n": n, "sites_missing": []}
    return {"models": ["radiomics"],
            "radiomics": {"training": entry, "pooled": entry, "sites": {"centre-1": entry}}}


def radiomics_section(html: str) -> str:
    return html.split("<h2>Radiomics")[1].split("<h2>")[0]


def test_the_same_scores_give_one_auc(tmp_path: Path) -> None:
    html = report({"radiomics": radiomics_block(0.974, [10, 12]),
                   "validation": validation_block(0.943, [10, 12])}, tmp_path)
    section = radiomics_section(html)
    rows = rows_of(section, "out-of-fold") + rows_of(section, "centre-1")
    assert [r[1] for r in rows] == ["0.943", "0.943"], rows
    note = section.split("</table>")[1]
    assert "0.974" in note and "validation stage" in note and "bound" in note, note


def test_different_patients_keep_their_own_auc_and_say_why(tmp_path: Path) -> None:
    html = report({"radiomics": radiomics_block(0.974, [10, 12]),
                   "validation": validation_block(0.943, [9, 12])}, tmp_path)
    section = radiomics_section(html)
    assert rows_of(section, "out-of-fold")[0][1] == "0.974"
    note = section.split("</table>")[1]
    assert "0.943" in note and "9/12" in note and "10/12" in note, note


def test_a_cox_model_not_fitted_says_why(tmp_path: Path) -> None:
    results = survival_results()
    results["survival"]["cox"] = {
        "error": "no site released its Cox cohort", "sites_missing": ["centre-1", "centre-2"],
        "site_reasons": {"centre-2": LEDGER}}
    html = write_report(results, tmp_path).read_text(encoding="utf-8")
    survival = html.split("<h2>Survival")[1].split("<h2>")[0]
    assert "not fitted: no site released its Cox cohort" in survival
    assert f"centre-2: {LEDGER}" in survival
