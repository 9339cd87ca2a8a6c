"""The survival stage end to end in the real Flower Simulation Engine, on the demo cohort
(`feddlr simulate --sites 3 --patients 40 --seed 7`, clinical rows only): results equal
lifelines on the pooled binned rows (Cox: on the times each site releases), truth.json's
Cox coefficients lie in the reported 95% CIs, and every message a site sent is in its audit
log. One run (~30 s) serves all."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.utils import concordance_index

from shared import cox as shared_cox
from shared.kaplan_meier import bin_times
from simulation.cohort import her2_labels, simulate_cohort
from simulation.launcher import run_simulation

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2", "site-3")
COLUMNS = ["her2_class=low", "her2_class=positive", "age", "tumour_size_mm",
           "hr_status=positive", "ki67", "lesion_type=non-mass"]
TRUTH = {"her2_class=low": ("her2_low", 1), "her2_class=positive": ("her2_positive", 1),
         "age": ("age_per10", 10), "tumour_size_mm": ("tumour_size_mm", 1),
         "hr_status=positive": ("hr_positive", 1), "ki67": ("ki67_per10", 10)}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("survival-e2e")
    truth = simulate_cohort(root / "sites", n_sites=3, n_patients=40, seed=7, images=False)
    rc = run_simulation(root / "sites", root / "out", {"stages": "cohort,survival"},
                        echo=False)
    results = json.loads((root / "out" / "results.json").read_text(encoding="utf-8"))
    return {"rc": rc, "root": root, "truth": truth, "results": results}


def released_times(rows: pd.DataFrame, her2: pd.Series) -> np.ndarray:
    """One site's Cox times as the default policy releases them (client.stages.survival.cox_times):
    its 30-day bins grouped into runs of ≥ 10 patients with 0 or ≥ 3 deaths, and 0 or ≥ 3
    of each level of the categorical covariates among both."""
    levels = [(values == level).to_numpy(float)
              for values in (her2, rows.hr_status, rows.lesion_type)
              for level, count in values.value_counts().items() if count >= 3]
    released = shared_cox.released_times(bin_times(rows.dfs_time.to_numpy(float), 30),
                                         rows.dfs_event.to_numpy(), np.column_stack(levels),
                                         10, 3)
    assert released is not None
    return released


def pooled_rows(run: dict, released: bool = False) -> pd.DataFrame:
    """The survival cohort of the her2-positive task (IHC2+ without ISH left out), binned
    (`released`: each site's Cox times as it releases them)."""
    frames = []
    for s in SITES:
        frame = pd.read_csv(run["root"] / "sites" / s / "clinical.csv", dtype={"her2_ish": str})
        her2 = her2_labels(frame)
        frame = frame[her2.notna()].reset_index(drop=True)
        her2 = her2[her2.notna()].reset_index(drop=True)
        frame["T"] = (released_times(frame, her2) if released
                      else bin_times(frame.dfs_time.to_numpy(float), 30))
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    her2 = her2_labels(rows)
    return pd.DataFrame({
        "T": rows["T"], "E": rows.dfs_event,
        "label": (her2 == "positive").astype(int),
        "her2_class=low": (her2 == "low").astype(float),
        "her2_class=positive": (her2 == "positive").astype(float),
        "age": rows.age.astype(float), "tumour_size_mm": rows.tumour_size_mm.astype(float),
        "hr_status=positive": (rows.hr_status == "positive").astype(float),
        "ki67": rows.ki67.astype(float),
        "lesion_type=non-mass": (rows.lesion_type == "non-mass").astype(float),
        "patient_id": rows.patient_id})


def test_stage_runs_in_the_simulation_engine(run: dict) -> None:
    assert run["rc"] == 0
    stages = run["results"]["run"]["stages"]
    assert stages["cohort"]["status"] == "ok" and stages["survival"]["status"] == "ok"
    survival = run["results"]["survival"]
    assert survival["time_bin"] == 30
    assert {s: v["status"] for s, v in survival["sites"].items()} == dict.fromkeys(SITES, "ok")
    log = (run["root"] / "out" / "run.log").read_text(encoding="utf-8")
    assert "[survival cox] round" in log


def test_results_equal_lifelines_on_the_pooled_binned_rows(run: dict) -> None:
    survival = run["results"]["survival"]
    rows = pooled_rows(run)
    fit = KaplanMeierFitter().fit(rows["T"], rows["E"])
    curve = survival["km"]["all"]
    np.testing.assert_array_equal(curve["time"], fit.timeline)
    np.testing.assert_allclose(curve["survival"], fit.survival_function_.iloc[:, 0], rtol=1e-6)
    np.testing.assert_allclose(curve["ci_lower"], fit.confidence_interval_.iloc[:, 0],
                               rtol=1e-6)
    # the Cox fit is exact on the times the sites release under the default policy (runs
    # of their 30-day bins: no risk-set step or tied-death group is a patient's row)
    rows = pooled_rows(run, released=True)
    cox = CoxPHFitter().fit(rows[[*COLUMNS, "T", "E"]], "T", "E",
                            fit_options={"precision": 1e-12, "r_precision": 1e-16,
                                         "step_size": 1.0})
    model = survival["cox"]
    assert model["covariates"] == COLUMNS
    np.testing.assert_allclose([model["coef"][c] for c in COLUMNS], cox.params_, rtol=1e-6)
    np.testing.assert_allclose([model["se"][c] for c in COLUMNS], cox.standard_errors_,
                               rtol=1e-6)
    assert model["log_likelihood"] == pytest.approx(cox.log_likelihood_, rel=1e-6)
    # the demo sites do not allow event queries: the C-index is a bound around the truth
    assert model["concordance_method"] == "histogram bound"
    low, high = model["concordance_bound"]
    assert low <= cox.concordance_index_ <= high
    scores = rows[COLUMNS].to_numpy() @ cox.params_.to_numpy()
    assert cox.concordance_index_ == pytest.approx(
        concordance_index(rows["T"], -scores, rows["E"]), rel=1e-12)
    assert set(survival["cox_stepwise"]["selected"]) <= set(survival["design"]["covariates"])


def test_true_coefficients_lie_in_the_reported_intervals(run: dict) -> None:
    model = run["results"]["survival"]["cox"]
    coefficients = run["truth"]["survival"]["coefficients"]
    for column, (name, scale) in TRUTH.items():
        beta = coefficients[name] / scale
        assert np.log(model["ci_lower"][column]) <= beta <= np.log(model["ci_upper"][column]), \
            column


def test_audit_logs_hold_every_survival_message_and_no_id_leaves(run: dict) -> None:
    results = run["results"]
    wire = results["run"]["wire"]
    run_id = results["run"]["run_id"]
    for site in SITES:
        audit = run["root"] / "sites" / site / "audit" / "egress.jsonl"
        lines = audit.read_text(encoding="utf-8")
        records = [r for r in map(json.loads, lines.splitlines()) if r["run_id"] == run_id]
        assert [(r["message_type"], r["sha256"]) for r in records] == [
            (w["message_type"], w["sha256"]) for w in wire[site]]
        kinds = {r["message_type"] for r in records}
        assert {"query.survival_setup", "query.survival_cox", "query.survival_histograms",
                "query.survival_bounds"} <= kinds
        assert "query.survival_events" not in kinds  # not allowed by the demo policy
    shared_text = "".join((run["root"] / "out" / name).read_text(encoding="utf-8")
                          for name in ("results.json", "report.html", "run.log"))
    assert [p for p in pooled_rows(run).patient_id if p in shared_text] == []
    page = (run["root"] / "out" / "report.html").read_text(encoding="utf-8")
    assert "survival_km.png" in page and "survival_forest.png" in page
