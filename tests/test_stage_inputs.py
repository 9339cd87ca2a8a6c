"""Inputs follow the stages, and every stage ends with a status (issue 13).

- Survival-only site folders with neither HER2 nor `label` columns (lifelines' GBSG2 and
  Rossi, split non-IID) run, and KM, log-rank and Efron Cox equal lifelines on the pooled
  binned rows.
- A cohort-only folder without images runs.
- A site policy stricter than the sites (min_patients above each label group) ends the
  cohort stage `ok` with every refused covariate reported, where it used to crash the server.
- A server-side error inside a stage fails that stage, not the study's record of it, and
  `run.status` says which stage did not finish.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_rossi
from lifelines.statistics import logrank_test

from server import workflow
from server.core.transport import StudyError
from server.workflow import run_status, run_study
from shared.config import StudyConfig
from shared.kaplan_meier import bin_times
from shared.labels import LabelError, task_label
from simulation.cli import summary
from simulation.cohort import simulate_cohort
from simulation.in_process import InProcessTransport
from tests.splits import gbsg2, non_iid_split
from tests.test_survival_stage import released_rows
from tests.test_survival_stats import LIFELINES_TIGHT

TOL = 1e-6


def write_sites(root: Path, parts: list[pd.DataFrame], time_bin: int = 30,
                roles: tuple[str, ...] = ("survival",), **privacy: object) -> list[Path]:
    folders = []
    for i, rows in enumerate(parts, 1):
        folder = root / f"site-{i}"
        folder.mkdir(parents=True)
        policy = {"min_patients": 10, "min_cell_count": 3, "time_bin": time_bin,
                  "allow_event_queries": True, **privacy}
        (folder / "site.yaml").write_text(yaml.safe_dump(
            {"site_id": f"site-{i}", "roles": list(roles), "time_unit": "days",
             "privacy": policy}), encoding="utf-8")
        rows.to_csv(folder / "clinical.csv", index=False)
        folders.append(folder)
    return folders


def gbsg2_parts() -> list[pd.DataFrame]:
    """GBSG2 as a hospital would hold it for a DFS study: no HER2 or label columns."""
    rows = gbsg2().rename(columns={"time": "dfs_time", "cens": "dfs_event", "horTh": "hor_th"})
    rows.insert(0, "patient_id", [f"g{i:04d}" for i in range(len(rows))])
    return non_iid_split(rows, by="age", n_sites=4, seed=5)


def rossi_parts() -> list[pd.DataFrame]:
    rows = load_rossi().rename(columns={"week": "dfs_time", "arrest": "dfs_event"})
    rows.insert(0, "patient_id", [f"r{i:04d}" for i in range(len(rows))])
    return non_iid_split(rows, by="prio", n_sites=3, seed=2)


def survival_config(tmp_path: Path, group: str, covariates: tuple[str, ...]) -> StudyConfig:
    return StudyConfig(out_dir=str(tmp_path / "out"), stages=("survival",),
                       survival_group=group, survival_covariates=covariates, stepwise="none")


def pooled(parts: list[pd.DataFrame], time_bin: int) -> pd.DataFrame:
    rows = pd.concat(parts, ignore_index=True)
    rows["T"] = bin_times(rows.dfs_time.to_numpy(float), time_bin)
    rows["E"] = rows.dfs_event
    return rows


def assert_cox_equals_lifelines(model: dict, frame: pd.DataFrame, columns: list[str]) -> None:
    fit = CoxPHFitter().fit(frame[[*columns, "T", "E"]], "T", "E", fit_options=LIFELINES_TIGHT)
    assert model["covariates"] == columns
    for key, expect in (("coef", fit.params_), ("se", fit.standard_errors_),
                        ("p_value", fit.summary["p"])):
        np.testing.assert_allclose([model[key][c] for c in columns], expect, rtol=TOL)
    assert model["log_likelihood"] == pytest.approx(fit.log_likelihood_, rel=TOL)
    assert model["n"] == len(frame) and model["events"] == int(frame.E.sum())


def test_gbsg2_survival_only_without_her2_or_label_columns_equals_lifelines(
        tmp_path: Path) -> None:
    parts = gbsg2_parts()
    folders = write_sites(tmp_path, parts)
    config = survival_config(tmp_path, "hor_th", ("age", "tsize", "pnodes", "hor_th"))
    results = run_study(InProcessTransport(folders), config)
    assert results["run"]["status"] == "ok", results["run"]
    assert [s["status"] for s in results["run"]["sites"]] == ["ok"] * 4
    assert all(s["label_counts"] == [] for s in results["run"]["sites"])  # no label asked
    surv, ref = results["survival"], pooled(parts, 30)
    for level in ("no", "yes"):
        rows = ref[ref.hor_th == level]
        fit = KaplanMeierFitter().fit(rows["T"], rows["E"])
        np.testing.assert_allclose(surv["km"][f"hor_th={level}"]["survival"],
                                   fit.survival_function_.iloc[:, 0], rtol=TOL, atol=1e-12)
    a, b = ref[ref.hor_th == "no"], ref[ref.hor_th == "yes"]
    test = logrank_test(a["T"], b["T"], a["E"], b["E"])
    assert surv["logrank"]["statistic"] == pytest.approx(test.test_statistic, rel=TOL)
    ref = released_rows(parts, 30, ("hor_th",))  # Cox: on the times the sites release
    ref["hor_th=yes"] = (ref.hor_th == "yes").astype(float)
    assert_cox_equals_lifelines(surv["cox"], ref, ["age", "tsize", "pnodes", "hor_th=yes"])


def test_rossi_survival_only_equals_lifelines(tmp_path: Path) -> None:
    parts = rossi_parts()
    folders = write_sites(tmp_path, parts, time_bin=1)
    covariates = ("fin", "age", "race", "wexp", "mar", "paro", "prio")
    results = run_study(InProcessTransport(folders), survival_config(tmp_path, "fin",
                                                                     covariates))
    assert results["run"]["status"] == "ok", results["run"]
    ref = released_rows(parts, 1)  # Cox: on the times the sites release
    assert_cox_equals_lifelines(results["survival"]["cox"], ref.astype(
        {c: float for c in covariates}), list(covariates))


def test_a_survival_stage_grouped_by_label_still_needs_the_label(tmp_path: Path) -> None:
    folders = write_sites(tmp_path, gbsg2_parts())
    with pytest.raises(StudyError, match="only 0 usable site"):
        run_study(InProcessTransport(folders), survival_config(tmp_path, "label", ("age",)))
    run = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))["run"]
    assert run["status"] == "stopped" and run["reason"].startswith("only 0 usable site")
    reasons = " ".join(s["reason"] for s in run["sites"])
    assert "missing column 'her2_ihc' (needed for task her2-positive)" in reasons


def test_a_cohort_only_folder_without_images_runs(tmp_path: Path) -> None:
    simulate_cohort(tmp_path / "sites", n_sites=3, n_patients=60, seed=4, images=False)
    folders = sorted((tmp_path / "sites").glob("site-*"))
    assert not any((f / "images").exists() for f in folders)
    results = run_study(InProcessTransport(folders), StudyConfig(
        out_dir=str(tmp_path / "out"), stages=("cohort",)))
    assert results["run"]["status"] == "ok", results["run"]
    clinical = pd.concat(pd.read_csv(f / "clinical.csv", dtype=str, keep_default_na=False)
                         for f in folders)
    labels = [label(i, s) for i, s in zip(clinical.her2_ihc, clinical.her2_ish, strict=True)]
    counted = [y for y in labels if y is not None]
    assert results["cohort"]["n"]["pooled"] == [counted.count(0), counted.count(1)]
    assert counted and len(counted) < len(labels)  # IHC2+ without ISH are left out
    age = results["cohort"]["covariates"]["age"]
    assert age["sites_missing"] == []
    ages = pd.to_numeric(clinical.age)[[y is not None for y in labels]]
    np.testing.assert_allclose(age["mean"], [ages[np.array(counted) == g].mean()
                                             for g in (0, 1)], rtol=1e-12)


def label(ihc: str, ish: str) -> int | None:
    try:
        return task_label("her2-positive", ihc, ish, None)
    except LabelError:
        return None


def test_a_policy_stricter_than_every_site_is_reported_not_crashed(tmp_path: Path) -> None:
    simulate_cohort(tmp_path / "sites", n_sites=3, n_patients=30, seed=4, images=False)
    folders = sorted((tmp_path / "sites").glob("site-*"))
    for folder in folders:
        path = folder / "site.yaml"
        site = yaml.safe_load(path.read_text(encoding="utf-8"))
        site["privacy"]["min_patients"] = 25  # above every site's HER2-positive group
        path.write_text(yaml.safe_dump(site), encoding="utf-8")
    results = run_study(InProcessTransport(folders), StudyConfig(
        out_dir=str(tmp_path / "out"), stages=("cohort",)))
    assert results["run"]["stages"]["cohort"]["status"] == "ok"
    age = results["cohort"]["covariates"]["age"]
    assert age["mean"] is None and age["sites_missing"] == ["site-1", "site-2", "site-3"]
    assert "site policy" in age["reason"]
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "not released" in page and "could not be drawn" not in page
    saved = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert saved["run"]["status"] == "ok"


def test_an_internal_error_fails_its_stage_and_the_run_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = write_sites(tmp_path / "sites", gbsg2_parts())

    def broken(*args: object) -> dict:
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(workflow.STAGE_RUNNERS, "survival", broken)
    results = run_study(InProcessTransport(folders), survival_config(tmp_path, "hor_th",
                                                                     ("age",)))
    stage = results["run"]["stages"]["survival"]
    assert stage["status"] == "failed"
    assert stage["reason"] == "internal error: ZeroDivisionError: a bug"
    assert results["run"]["status"] == "incomplete"
    assert results["run"]["reason"] == "survival failed: internal error: ZeroDivisionError: a bug"
    assert (tmp_path / "out" / "report.html").is_file()


def test_run_status_is_ok_only_when_every_requested_stage_is() -> None:
    ok = {"status": "ok", "seconds": 1.0}
    assert run_status({"cohort": ok}, ("cohort",)) == {"status": "ok", "reason": None}
    assert run_status({"cohort": ok, "survival": {"status": "skipped", "reason": "no site"}},
                      ("cohort", "survival")) == {"status": "incomplete",
                                                  "reason": "survival skipped: no site"}
    assert run_status({}, ("cohort",))["reason"] == "cohort not run"
    text = summary({"stages": {"cohort": ok}, "status": "incomplete", "reason": "x",
                    "sites": [{"site_id": "site-2", "status": "failed", "reason": "bad"}]})
    assert "site site-2: failed: bad" in text and text.endswith("run status: incomplete (x)")


def test_earlier_results_reach_later_stages_explicitly(tmp_path: Path) -> None:
    """Validation's thresholds and resumed runs reach fusion/validation/survival as an
    `Earlier`; the run config's own keys add to and override them; the config itself is
    never rewritten."""
    from server.workflow import earlier_results
    from shared.config import Earlier

    results = {"run": {"stages": {"cohort": {"status": "ok", "resumed_from": "run-1"},
                                  "validation": {"status": "ok"}}},
               "validation": {"models": ["dlr", "dsfr"],
                              "dlr": {"threshold": {"value": 0.31}},
                              "dsfr": {"threshold": {"value": None}}}}
    earlier = earlier_results(results)
    assert earlier == Earlier(prediction_runs=("run-1",), thresholds={"dlr": 0.31})
    config = StudyConfig.from_run_config({"prediction-runs": "run-0,run-1",
                                          "survival-thresholds": "dsfr=0.7"})
    assert earlier.runs(config) == "run-0,run-1"
    assert earlier.threshold(config, "dlr") == 0.31
    assert earlier.threshold(config, "dsfr") == 0.7
    assert earlier.threshold(StudyConfig.from_run_config({"survival-thresholds": "dlr=0.9"}),
                             "dlr") == 0.9
    assert earlier.threshold(config, "fusion") == 0.5


def test_the_site_session_notices_an_edited_folder(tmp_path: Path) -> None:
    from client.site.session import open_session

    (folder,) = write_sites(tmp_path, gbsg2_parts()[:1])
    first = open_session(str(folder), None, ("clinical", "survival"))
    assert open_session(str(folder), None, ("clinical", "survival")) is first  # cached
    rows = pd.read_csv(folder / "clinical.csv")
    rows.head(len(rows) - 5).to_csv(folder / "clinical.csv", index=False)
    again = open_session(str(folder), None, ("clinical", "survival"))
    assert len(again.site.clinical) == len(first.site.clinical) - 5


def test_a_bad_setting_stops_the_study_before_any_site_is_asked(tmp_path: Path) -> None:
    from shared.config import ConfigError

    class NoSites(InProcessTransport):
        def handshake(self, query: dict) -> dict:
            raise AssertionError("a site was contacted")

    for value in ({"cv-folds": 1}, {"rounds": -1}, {"lr": "dlmri=0.1"}):
        with pytest.raises(ConfigError, match=f"run config {next(iter(value))}"):
            StudyConfig.from_run_config(value)  # one value alone: when it is parsed
    for rule in ({"validation-bins": 200, "calibration-bins": 30},  # rules across keys
                 {"fusion-models": "dl_mri"}, {"dsfr-layer": "activation_99"}):
        config = StudyConfig.from_run_config({"out-dir": str(tmp_path / "out"), **rule})
        with pytest.raises(ConfigError):
            run_study(NoSites([]), config)
        run = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
        assert run["run"]["status"] == "stopped"
        assert run["run"]["reason"].startswith("configuration: run config ")


def test_a_fresh_process_takes_the_loaded_site_from_the_sites_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a deployment every message is a new ClientApp process: the Site it loads comes from
    `<site>/cache/session/` while the folder is unchanged, and is read again when it is not
    (or when the stored file is damaged)."""
    from client.site import session

    (folder,) = write_sites(tmp_path, gbsg2_parts()[:1])
    loads: list[Path] = []
    real = session.load_site
    monkeypatch.setattr(session, "load_site", lambda root, **kw: loads.append(root) or
                        real(root, **kw))
    needs = ("clinical", "survival")
    first = session.open_session(str(folder), None, needs)
    session.clear_sessions()  # what a new process starts with
    again = session.open_session(str(folder), None, needs)
    assert len(loads) == 1 and again is not first
    pd.testing.assert_frame_equal(again.site.clinical, first.site.clinical)
    assert again.site.excluded == first.site.excluded
    (stored,) = (folder / "cache" / "session").glob("*.pkl")
    stored.write_bytes(b"not a pickle")
    session.clear_sessions()
    session.open_session(str(folder), None, needs)
    assert len(loads) == 2
    rows = pd.read_csv(folder / "clinical.csv")
    rows.head(len(rows) - 5).to_csv(folder / "clinical.csv", index=False)
    session.clear_sessions()
    edited = session.open_session(str(folder), None, needs)
    assert len(loads) == 3 and len(edited.site.clinical) == len(first.site.clinical) - 5
