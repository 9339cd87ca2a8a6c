"""The `feddlr` console script as a user runs it."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from simulation.cli import main
from simulation.cohort import simulate_cohort

FEDDLR = str(Path(sys.executable).parent / "feddlr")


def feddlr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FEDDLR, *args], capture_output=True, text=True, timeout=300)


def test_simulate_then_check_site_passes(tmp_path: Path) -> None:
    done = feddlr("simulate", "--sites", "2", "--patients", "20", "--seed", "4",
                  "--out", str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    truth = json.loads((tmp_path / "c" / "truth.json").read_text())
    assert truth["seed"] == 4 and truth["n_sites"] == 2
    check = feddlr("check-site", str(tmp_path / "c" / "site-1"), str(tmp_path / "c" / "site-2"))
    assert check.returncode == 0, check.stdout
    assert "site-1: OK" in check.stdout and "site-2: OK" in check.stdout


def test_simulate_passes_effect_size_image_size_and_external_sites(tmp_path: Path) -> None:
    out = tmp_path / "c"
    done = feddlr("simulate", "--sites", "2", "--patients", "20", "--seed", "3",
                  "--effect-size", "0.5", "--image-size", "24", "--external-sites", "1",
                  "--out", str(out))
    assert done.returncode == 0, done.stderr
    truth = json.loads((out / "truth.json").read_text())
    assert truth["effect_size"] == 0.5 and truth["image_size"] == 24
    assert truth["image_model"]["mri_fov_mm"][0] == pytest.approx(24 * 0.8)
    assert yaml.safe_load((out / "site-2" / "site.yaml").read_text())["roles"] == [
        "external", "survival"]
    assert 0.6 < truth["ceiling"]["her2-positive"]["population"] < 0.8


def test_simulate_defaults_are_simulate_cohorts(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = {k: v.default for k, v in inspect.signature(simulate_cohort).parameters.items()}
    passed: dict = {}
    monkeypatch.setattr("simulation.cohort.simulate_cohort",
                        lambda out, **kwargs: passed.update(kwargs) or {})
    assert main(["simulate", "--out", "unused"]) == 0
    for name in ("n_sites", "n_patients", "seed", "effect_size", "image_size",
                 "external_sites"):
        assert passed[name] == defaults[name], name


@pytest.mark.parametrize(("args", "message"), [
    (["--effect-size", "-1"], "effect_size must be a finite number >= 0"),
    (["--effect-size", "nan"], "effect_size must be a finite number >= 0"),
    (["--effect-size", "big"], "invalid float value"),
    (["--image-size", "8"], "image_size must be an integer >= 16"),
    (["--image-size", "2.5"], "invalid int value"),
    (["--external-sites", "2"], "external_sites must be an integer in [0, n_sites - 1]"),
])
def test_simulate_rejects_bad_values_with_exit_2(tmp_path: Path, args: list[str],
                                                 message: str) -> None:
    done = feddlr("simulate", "--sites", "2", "--patients", "20", *args,
                  "--out", str(tmp_path / "c"))
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "c" / "truth.json").exists()


def test_check_site_names_a_broken_patient_without_traceback(tmp_path: Path) -> None:
    assert feddlr("simulate", "--sites", "1", "--patients", "20", "--seed", "5",
                  "--out", str(tmp_path / "c")).returncode == 0
    site = tmp_path / "c" / "site-1"
    rows = pd.read_csv(site / "clinical.csv")
    rows.loc[2, "dfs_time"] = -5
    rows.to_csv(site / "clinical.csv", index=False)
    patient = rows.loc[2, "patient_id"]
    (site / "images" / patient / "mri_mask.nii.gz").unlink()
    check = feddlr("check-site", str(site))
    assert check.returncode == 1
    assert f"site-1: clinical.csv: patient {patient}: dfs_time -5" in check.stdout
    assert f"site-1: images/{patient}/mri_mask.nii.gz: patient {patient}: missing" in check.stdout
    assert "Traceback" not in check.stdout + check.stderr


def test_run_rejects_a_malformed_override(tmp_path: Path) -> None:
    done = feddlr("run", "--sites-dir", str(tmp_path), "--out", str(tmp_path / "o"), "-c", "oops")
    assert done.returncode == 2 and "KEY=VALUE" in done.stderr


def test_run_without_site_folders_says_so(tmp_path: Path) -> None:
    done = feddlr("run", "--sites-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert done.returncode == 1 and "no site folders" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_rejects_an_unknown_key_naming_the_nearest_one(tmp_path: Path) -> None:
    done = feddlr("run", "--sites-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                  "-c", "rouns=3")
    assert done.returncode == 2
    assert "unknown run-config key 'rouns'; did you mean 'rounds'?" in done.stderr
    bad = feddlr("run", "--sites-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "-c", "stages=cohort,radiomix")
    assert bad.returncode == 2 and "stages: 'radiomix' is not one of" in bad.stderr
    assert "did you mean 'radiomics'?" in bad.stderr


@pytest.mark.parametrize(("case", "rc", "status"), [
    ("survival-only", 0, "ok"),              # no HER2 columns, none needed
    ("cohort-without-labels", 1, "stopped"),  # every site fails the handshake
    ("survival-failing", 1, "incomplete"),    # the sites disagree on time_bin: stage failed
])
def test_run_exit_status_tells_what_happened(tmp_path: Path, case: str, rc: int,
                                             status: str) -> None:
    from tests.test_stage_inputs import gbsg2_parts, write_sites

    parts = gbsg2_parts()[:2]
    folders = write_sites(tmp_path / "sites", parts)
    if case == "survival-failing":
        policy = yaml.safe_load((folders[1] / "site.yaml").read_text(encoding="utf-8"))
        policy["privacy"]["time_bin"] = 7
        (folders[1] / "site.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    stages = "cohort" if case == "cohort-without-labels" else "survival"
    done = feddlr("run", "--sites-dir", str(tmp_path / "sites"), "--out", str(tmp_path / "o"),
                  "-c", f"stages={stages}", "-c", "survival-group=hor_th",
                  "-c", "survival-covariates=age,tsize", "-c", "stepwise=none")
    assert done.returncode == rc, done.stdout[-3000:]
    run = json.loads((tmp_path / "o" / "results.json").read_text(encoding="utf-8"))["run"]
    assert run["status"] == status
    assert f"run status: {status}" in done.stdout
    if case == "cohort-without-labels":  # sites named by site_id, not by Flower node id
        assert "site site-1: failed: " in done.stdout and "node-" not in done.stdout
    if case == "survival-failing":
        assert "disagree on privacy.time_bin" in run["stages"]["survival"]["reason"]


def test_console_keeps_the_pipe_sparse_and_the_terminal_live() -> None:
    """Round lines are shown on a stage change, on trouble, or as a 30 s heartbeat; the same
    note for fold after fold is shown once; everything else is shown."""
    import io

    from simulation.console import Console, RoundFilter

    now = [0.0]
    keep = RoundFilter(clock=lambda: now[0])
    ok = "3 sites replied: site-1 ok, site-2 ok, site-3 ok"
    lines = ["feddlr 10:00:00 [radiomics] started with 3 sites",
             *[f"feddlr 10:00:01 [radiomics:lasso] round {r}: {ok}" for r in range(1, 40)],
             *[f"feddlr 10:00:02 [radiomics] f{k}.lasso: site-1 refused p×p matrices "
               f"({900 + k} features > 0.33 × 35 patients)" for k in range(10)],
             "feddlr 10:00:03 [radiomics:lasso] round 40: 3 sites replied: site-1 ok, "
             "site-2 failed (gone), site-3 ok",
             "feddlr 10:00:04 [radiomics] done in 4.0s",
             "\x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor"]
    shown = []
    for i, line in enumerate(lines):
        now[0] = 0.5 * i  # 20 s of rounds: no heartbeat yet
        if keep.show(line):
            shown.append(line)
    assert [s.split("] ", 1)[1][:22] for s in shown] == [
        "started with 3 sites", "round 1: 3 sites repli", "f0.lasso: site-1 refus",
        "round 40: 3 sites repl", "done in 4.0s"]
    now[0] = 100.0
    assert keep.show(f"feddlr 10:01:40 [radiomics:lasso] round 41: {ok}")  # heartbeat

    out = io.StringIO()
    live = Console(out, live=True)
    for line in lines:
        live.write(line + "\n")
    live.close()
    assert "done in 4.0s" in out.getvalue() and "round 39" not in out.getvalue()


@pytest.mark.parametrize(("setting", "says"), [
    ("cv-folds=1", "run config cv-folds: 1 is not in [2, 100]"),
    ("rounds=-1", "run config rounds: -1 is not in [1, 10000]"),
    ("lr=dlmri=0.1", "run config lr: expected model=value pairs"),
    ("calibration-bins=30", "calibration-bins (30) must divide validation-bins (200)"),
])
def test_run_rejects_a_bad_value_before_launch(tmp_path: Path, setting: str, says: str) -> None:
    done = feddlr("run", "--sites-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                  "-c", setting)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()  # nothing started
