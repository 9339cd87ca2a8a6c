"""`min-replies` means one thing in every stage (shared/settings.py): when fewer of the sites
a round asks reply `ok`, or fewer are left to fit on after sites failed or dropped, the
stage fails with the reason and the next stages still run; it never stops the study. The
survival stage keeps its curves and gives the Cox model's reason instead. One test per
stage kind, each with a site that answers with an error (as a site whose handler raised)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from server.core.transport import (
    Reply,
    SiteSetChanged,
    StudyError,
    TooFewReplies,
    on_stable_sites,
)
from server.workflow import run_study
from shared import schema
from shared.config import StudyConfig, stage_settings
from simulation.in_process import InProcessTransport


class FailsAt(InProcessTransport):
    """In-process sites, except that `fail[site]` names an action the site answers with an
    error every time it is asked."""

    def __init__(self, folders: Iterable[Path], fail: Mapping[str, str]) -> None:
        super().__init__(folders)
        self.fail = dict(fail)

    def ask(self, action: str, query, sites: Iterable[str]) -> dict[str, Reply]:
        sites = list(sites)
        broken = [s for s in sites if self.fail.get(s) == action]
        live = [s for s in sites if s not in broken]
        out = super().ask(action, query, live) if live else {}
        for s in broken:
            out[s] = Reply(s, schema.STATUS_FAILED, reason=f"{action} failed at {s}: injected")
        return {s: out[s] for s in sites}


def stage_of(results: dict, stage: str) -> dict:
    return results["run"]["stages"][stage]


# --------------------------------------------------------------------------- the rule


def test_a_fit_below_min_replies_fails_its_stage_and_a_failure_never_stops_the_study():
    def fit(sites: list[str]) -> list[str]:
        if "b" in sites:
            raise SiteSetChanged("step", {"b": "failed: MemoryError"}, failed=["b"])
        return sites

    # a site that fails (it is still there) never stops the study, even below min-sites
    assert on_stable_sites(fit, ["a", "b"], min_sites=3, stage="x")[0] == ["a"]
    with pytest.raises(TooFewReplies, match=r"x: only 1 site\(s\) left after b dropped "
                                            r"\(failed: MemoryError\), min-replies is 2"):
        on_stable_sites(fit, ["a", "b"], min_sites=1, stage="x", min_replies=2)
    with pytest.raises(TooFewReplies, match=r"x: only 1 site\(s\) to fit on, min-replies is 2"):
        on_stable_sites(fit, ["a"], min_sites=1, stage="x", min_replies=2)

    def gone(sites: list[str]) -> list[str]:  # a site that dropped still does
        if "b" in sites:
            raise SiteSetChanged("step", {"b": "no reply"})
        return sites

    with pytest.raises(StudyError, match="min-sites is 2"):
        on_stable_sites(gone, ["a", "b"], min_sites=2, stage="x")


# --------------------------------------------------------------------------- cohort


def test_cohort(tmp_path: Path) -> None:
    from tests.test_dropout_resume import COVARIATES, write_sites

    folders = write_sites(tmp_path / "sites")
    results = run_study(FailsAt(folders, {"site-2": schema.COHORT_SUMS}), StudyConfig(
        out_dir=str(tmp_path / "out"), task="label", stages=("cohort", "survival"),
        cohort_covariates=COVARIATES, min_replies=3))
    assert stage_of(results, "cohort")["status"] == "failed"
    assert stage_of(results, "cohort")["reason"] == (
        "2 site(s) answered round 1 of 3 asked, min-replies is 3; site-2: failed "
        "(cohort_sums failed at site-2: injected)")
    assert "cohort" not in results
    assert stage_of(results, "survival")["status"] != "failed"  # the next stage still ran
    assert results["run"]["status"] != "stopped"


# --------------------------------------------------------------------------- radiomics


def test_radiomics(tmp_path: Path) -> None:
    from tests.splits import non_iid_split, wisconsin
    from tests.test_radiomics_stage import BASE, FailsMidFit, write_feature_site

    frame = wisconsin()
    frame.insert(0, "patient_id", [f"w{i:04d}" for i in range(len(frame))])
    parts = non_iid_split(frame, by="mean area", n_sites=3, seed=2)
    folders = [write_feature_site(tmp_path / "sites", f"site-{i + 1}", p)
               for i, p in enumerate(parts)]

    def run(out: str, **kw: int) -> dict:
        config = StudyConfig(out_dir=str(tmp_path / out), task="label",
                             stages=("radiomics",), **kw,
                             settings=stage_settings({**BASE, "selection": "paper"}))
        return run_study(FailsMidFit(folders), config)

    failed = run("a", min_replies=3)  # site-3 fails mid-fit: 2 left to fit on
    assert stage_of(failed, "radiomics")["status"] == "failed"
    assert stage_of(failed, "radiomics")["reason"] == (
        "radiomics: only 2 site(s) left after site-3 dropped (failed: radiomics_step failed "
        "at site-3: MemoryError), min-replies is 3")
    assert failed["run"]["status"] != "stopped"
    # below min-sites after a failure (not a drop): the fit goes on, the study too (before
    # issue 27 this stopped the study)
    fitted = run("b", min_sites=3)
    assert stage_of(fitted, "radiomics")["status"] == "ok"
    assert fitted["radiomics"]["sites"]["site-3"]["status"] == "failed"


# --------------------------------------------------------------------------- fusion


def test_fusion(tmp_path: Path) -> None:
    from tests.test_validation_stage import cohort, run, write_run_predictions, write_sites

    parts = cohort()
    folders = write_sites(tmp_path / "sites", parts, min_cell=1)
    write_run_predictions(folders, parts)
    fail = {"site-2": schema.FUSION_SETUP}  # site-2 is a training site

    def study(out: str, min_replies: int) -> dict:
        config = StudyConfig(out_dir=str(tmp_path / out), task="label",
                             stages=("fusion", "validation"), min_replies=min_replies,
                             settings=stage_settings({"validation-grid": "uniform"}))
        return run_study(FailsAt(folders, fail), config)

    assert run(folders, tmp_path / "ok", ("fusion",))["run"]["stages"]["fusion"]["status"] \
        == "ok"  # without the failure the stage runs
    setup = study("a", 4)  # 3 of 4 answered the setup
    assert stage_of(setup, "fusion")["reason"] == (
        "3 site(s) answered the fusion setup of 4 asked, min-replies is 4; site-2: failed "
        "(fusion_setup failed at site-2: injected)")
    assert stage_of(setup, "validation")["status"] == "ok"  # the next stage still ran
    fit = study("b", 3)  # 3 answered, but the late fusion fit has 2 training sites
    assert stage_of(fit, "fusion")["status"] == "failed"
    assert stage_of(fit, "fusion")["reason"] == (
        "fusion: only 2 site(s) to fit on, min-replies is 3")
    assert stage_of(fit, "validation")["status"] == "ok"  # the next stage still ran


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("grid", "action"), [("uniform", schema.VALIDATION_SCORES),
                                              ("adaptive", schema.VALIDATION_RANGES)])
def test_validation(tmp_path: Path, grid: str, action: str) -> None:
    from tests.test_validation_stage import cohort, write_sites

    folders = write_sites(tmp_path / "sites", cohort(), min_cell=1)

    def study(min_replies: int) -> dict:
        config = StudyConfig(out_dir=str(tmp_path / f"out{min_replies}"), task="label",
                             stages=("validation",), min_replies=min_replies,
                             settings=stage_settings({"validation-grid": grid}))
        return run_study(FailsAt(folders, {"site-2": action}), config)

    failed = study(4)
    assert stage_of(failed, "validation")["status"] == "failed"
    assert stage_of(failed, "validation")["reason"] == (
        f"3 site(s) answered the validation rounds of 4 asked, min-replies is 4; site-2: "
        f"failed ({action} failed at site-2: injected)")
    assert failed["run"]["status"] != "stopped"
    done = study(3)  # before issue 27 min-replies did nothing here
    assert stage_of(done, "validation")["status"] != "failed"
    assert done["validation"]["sites"]["site-2"]["status"] == "failed"


# --------------------------------------------------------------------------- survival


def test_survival(tmp_path: Path) -> None:
    from tests.test_survival_stage import config, split, write_site

    folders = [write_site(tmp_path / "sites", f"site-{i + 1}", p)
               for i, p in enumerate(split())]
    setup = run_study(FailsAt(folders, {"site-2": schema.SURVIVAL_SETUP}),
                      config(tmp_path / "a", stepwise="none", min_replies=3))
    assert stage_of(setup, "survival")["reason"] == (
        "2 site(s) answered the survival setup of 3 asked, min-replies is 3; site-2: failed "
        "(survival_setup failed at site-2: injected)")
    # a Cox fit left with fewer sites: the curves stand, the Cox model gives the reason
    cox = run_study(FailsAt(folders, {"site-2": schema.SURVIVAL_COX}),
                    config(tmp_path / "b", stepwise="none", min_replies=3))
    assert stage_of(cox, "survival")["status"] != "failed"
    assert cox["survival"]["km"]["all"]
    assert cox["survival"]["cox"]["error"].startswith("survival: only 2 site(s) left after "
                                                      "site-2 dropped (failed: ")
    assert cox["survival"]["cox"]["error"].endswith("min-replies is 3")


# --------------------------------------------------------------------------- CNN training


def test_cnn_training(tmp_path: Path) -> None:
    from simulation.cohort import simulate_cohort

    simulate_cohort(tmp_path / "sites", n_sites=3, n_patients=24, seed=6, image_size=24)
    folders = sorted(p for p in (tmp_path / "sites").iterdir() if p.is_dir())
    tiny = {"deep-models": "dl_mri", "rounds": 1, "local-steps": 1, "batch-size": 4,
            "cnn-width": 0.0625, "mri-size": 16, "deep-cv-folds": 2, "gradcam-patients": 0}
    config = StudyConfig(sites_dir=str(tmp_path / "sites"), out_dir=str(tmp_path / "out"),
                         stages=("deep", "cohort"), min_replies=3,
                         settings=stage_settings(tiny))
    results = run_study(FailsAt(folders, {"site-2": "train.dl_mri"}), config)
    assert stage_of(results, "deep")["status"] == "failed"
    assert stage_of(results, "deep")["reason"].startswith(
        "2 site(s) answered dl_mri round 1 of 3 asked, min-replies is 3; site-2: failed "
        "(train.dl_mri failed at site-2: injected)")
    assert stage_of(results, "cohort")["status"] == "ok"  # the next stage still ran
