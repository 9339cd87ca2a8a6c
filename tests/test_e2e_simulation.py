"""End to end in the real Flower Simulation Engine (`flwr run` on a private SuperLink):
synthetic site folders → cohort stage → results.json checked against scipy on the pooled rows.

One run serves every assertion (it takes ~20 s): a normal site, a site with three broken
patients, a site whose policy refuses every statistic (min_patients 1000) and a site folder
that cannot serve at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from simulation.cohort import simulate_cohort
from simulation.launcher import run_simulation
from tests.processes import processes

pytestmark = pytest.mark.slow

NUMERIC = ["age", "tumour_size_mm", "ki67"]
CATEGORICAL = ["hr_status", "lesion_type"]
BROKEN = ["s2-p0003", "s2-p0010", "s2-p0017"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    sites_dir = root / "sites"
    simulate_cohort(sites_dir, n_sites=3, n_patients=60, seed=11)
    clinical = pd.read_csv(sites_dir / "site-2" / "clinical.csv", dtype={"her2_ish": str})
    clinical.loc[clinical.patient_id.isin(BROKEN), "her2_ihc"] = 7
    clinical.to_csv(sites_dir / "site-2" / "clinical.csv", index=False)
    strict = yaml.safe_load((sites_dir / "site-3" / "site.yaml").read_text())
    strict["privacy"]["min_patients"] = 1000
    (sites_dir / "site-3" / "site.yaml").write_text(yaml.safe_dump(strict))
    broken = sites_dir / "site-4"
    broken.mkdir()
    (broken / "site.yaml").write_text("site_id: site-4\nroles: [train]\ntime_unit: days\n")

    out = root / "out"
    rc = run_simulation(sites_dir, out, {"stages": "cohort"}, echo=False)
    results = json.loads((out / "results.json").read_text())
    return {"rc": rc, "sites_dir": sites_dir, "out": out, "results": results}


def labelled_rows(sites_dir: Path, site: str) -> pd.DataFrame:
    """The site's rows with a HER2-positive-task label, computed here from the raw columns."""
    rows = pd.read_csv(sites_dir / site / "clinical.csv", dtype={"her2_ish": str})
    ish = rows.her2_ish.fillna("").str.lower()
    valid = rows.her2_ihc.isin([0, 1, 2, 3]) & ~((rows.her2_ihc == 2) & (ish == ""))
    positive = (rows.her2_ihc == 3) | ((rows.her2_ihc == 2) & (ish == "positive"))
    rows["y"] = positive.astype(int)
    return rows[valid].reset_index(drop=True)


def test_run_finishes_and_sites_are_reported(run: dict) -> None:
    assert run["rc"] == 0
    sites = {s["site_id"]: s for s in run["results"]["run"]["sites"]}
    assert set(sites) >= {"site-1", "site-2", "site-3"}
    assert [sites[s]["status"] for s in ("site-1", "site-2", "site-3")] == ["ok"] * 3
    failed = [s for s in sites.values() if s["status"] == "failed"]
    assert len(failed) == 1 and "clinical.csv" in failed[0]["reason"]
    for site in ("site-1", "site-2", "site-3"):
        raw = pd.read_csv(run["sites_dir"] / site / "clinical.csv")
        kept = labelled_rows(run["sites_dir"], site)
        assert sites[site]["n_patients"] == len(kept)
        n_excluded = len(raw) - len(kept)
        assert sites[site]["n_excluded"] == (n_excluded if n_excluded == 0 or n_excluded >= 3
                                             else None)
    assert sites["site-2"]["n_excluded"] >= 3


def test_excluded_patients_are_named_only_in_the_sites_own_log(run: dict) -> None:
    site_log = (run["sites_dir"] / "site-2" / "audit" / "site.log").read_text()
    for patient in BROKEN:
        assert patient in site_log and "her2_ihc 7" in site_log
    every_id = pd.concat([pd.read_csv(run["sites_dir"] / s / "clinical.csv").patient_id
                          for s in ("site-1", "site-2", "site-3")])
    shared_text = ((run["out"] / "results.json").read_text() + (run["out"] / "run.log").read_text()
                   + (run["out"] / "report.html").read_text())
    leaked = [p for p in every_id if p in shared_text]
    assert leaked == []


def test_pooled_counts_and_tests_match_scipy(run: dict) -> None:
    cohort = run["results"]["cohort"]
    rows = {s: labelled_rows(run["sites_dir"], s) for s in ("site-1", "site-2", "site-3")}
    pooled = pd.concat(rows.values(), ignore_index=True)
    assert cohort["n"]["pooled"] == [int((pooled.y == 0).sum()), int((pooled.y == 1).sum())]
    for name in NUMERIC:
        entry = cohort["covariates"][name]
        released = [s for s, r in rows.items() if r.y.value_counts().min() >= min_patients(run, s)]
        assert "site-3" not in released
        assert sorted(entry["sites_missing"]) == sorted(set(rows) - set(released))
        data = pd.concat([rows[s] for s in released], ignore_index=True)
        g0, g1 = data.loc[data.y == 0, name], data.loc[data.y == 1, name]
        ref = stats.ttest_ind(g0, g1)
        np.testing.assert_allclose(entry["mean"], [g0.mean(), g1.mean()], rtol=1e-9)
        np.testing.assert_allclose(entry["sd"], [g0.std(), g1.std()], rtol=1e-9)
        assert entry["t_test"]["statistic"] == pytest.approx(ref.statistic, rel=1e-9)
        assert entry["t_test"]["p_value"] == pytest.approx(ref.pvalue, rel=1e-7)
    for name in CATEGORICAL:
        entry = cohort["covariates"][name]
        tables = {s: pd.crosstab(r[name], r.y) for s, r in rows.items()}
        released = [s for s, t in tables.items() if s != "site-3"
                    and not ((t.to_numpy() > 0) & (t.to_numpy() < 3)).any()]
        assert sorted(entry["sites_missing"]) == sorted(set(rows) - set(released))
        data = pd.concat([rows[s] for s in released], ignore_index=True)
        table = pd.crosstab(data[name], data.y)
        assert entry["counts"] == table.to_numpy().tolist()
        ref = stats.chi2_contingency(table.to_numpy())
        assert entry["chi2"]["statistic"] == pytest.approx(ref.statistic, rel=1e-9)
        assert entry["chi2"]["p_value"] == pytest.approx(ref.pvalue, rel=1e-7)


def min_patients(run: dict, site: str) -> int:
    config = yaml.safe_load((run["sites_dir"] / site / "site.yaml").read_text())
    return int(config["privacy"]["min_patients"])


def audit_records(run: dict, site: str) -> list[dict]:
    run_id = run["results"]["run"]["run_id"]
    lines = (run["sites_dir"] / site / "audit" / "egress.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["run_id"] == run_id]


def test_audit_log_holds_every_message_each_site_sent(run: dict) -> None:
    wire = run["results"]["run"]["wire"]
    for site in ("site-1", "site-2", "site-3"):
        records = audit_records(run, site)
        assert [r["message_type"] for r in records] == [
            "query.handshake", "query.cohort_sums", "query.cohort_squares",
            "query.cohort_histograms"]
        assert [(r["message_type"], r["bytes"], r["sha256"]) for r in records] == [
            (w["message_type"], w["bytes"], w["sha256"]) for w in wire[site]]
        # what the policy withheld, as the site's audit log and the server's log both say
        assert [sorted(r["refused"]) for r in records] == [w.get("refused", [])
                                                           for w in wire[site]]
    assert any(w.get("refused") for w in wire["site-3"])  # site-3: min_patients 1000


def test_query_over_fewer_than_min_patients_is_refused_and_logged(run: dict) -> None:
    sums = audit_records(run, "site-3")[1]
    refused = [k for k in sums["refused"] if k.startswith("numeric.")]
    assert len(refused) == 2 * len(NUMERIC)
    assert all("min_patients (1000)" in sums["refused"][k] for k in refused)
    assert not any(k.startswith("numeric.") and k.endswith(".sum") for k in sums["keys"])


def test_report_and_logs_are_written(run: dict) -> None:
    page = (run["out"] / "report.html").read_text()
    assert "Cohort" in page and "cohort_counts.png" in page
    assert (run["out"] / "cohort_counts.png").stat().st_size > 1000
    log = (run["out"] / "run.log").read_text()
    assert "[cohort] round 1/3" in log and "site-1 ok" in log


def test_no_superlink_is_left_running(run: dict) -> None:
    assert not processes(str(run["out"]))
    assert not processes("flower-superlink", "--simulation", "--port")
