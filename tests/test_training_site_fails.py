"""A site whose local training raises, inside a real Flower simulation run: the stage is
not `ok` — it is `partial`, naming the site and the error — the site is `failed` in the
stage's sites and in `run.sites`, the run is `incomplete`, and the report says so.

Before issue 26 the failing site was dropped from training with a warning in run.log
alone: the stage said `ok`, `run.sites` said `ok` (the IndexError of `_batches` with
n ≡ 1 mod batch size did exactly this).

The failure is injected through a `sitecustomize` module on PYTHONPATH (the test's
environment reaches the SuperLink and the Simulation Engine's workers): it wraps
`client.stages.training_round._train_one` when that module is imported and raises for one site."""

from __future__ import annotations

import json
import os

import pytest

from simulation.cohort import simulate_cohort
from simulation.launcher import run_simulation

FAILING = "site-2"
ENV = "FEDDLR_TEST_TRAINING_FAILS_AT"
HOOK = '''
import importlib.abc, importlib.util, os, sys

_SITE = os.environ.get("ENV_NAME", "")


class _Wrap(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "client.stages.training_round":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            real = module._train_one

            def train_one(unit, net, start, data, p, device, state_dir, site, *rest):
                if site == _SITE:
                    raise RuntimeError(f"injected: local training breaks at {site}")
                return real(unit, net, start, data, p, device, state_dir, site, *rest)

            module._train_one = train_one

        spec.loader.exec_module = exec_module
        return spec


if _SITE:
    sys.meta_path.insert(0, _Wrap())
'''.replace("ENV_NAME", ENV)

TINY = {"stages": "deep", "deep-models": "dl_us", "rounds": "1", "local-steps": "1",
        "batch-size": "4", "cnn-width": "0.0625", "us-size": "32", "deep-cv-folds": "2",
        "gradcam-patients": "0", "seed": "3"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("site-fails")
    simulate_cohort(root / "sites", n_sites=3, n_patients=24, seed=6, image_size=24)
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(hook)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    os.environ[ENV] = FAILING
    try:
        rc = run_simulation(root / "sites", root / "out", TINY, echo=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out = root / "out"
    return {"rc": rc, "results": json.loads((out / "results.json").read_text(encoding="utf-8")),
            "report": (out / "report.html").read_text(encoding="utf-8"),
            "log": (out / "run.log").read_text(encoding="utf-8")}


def test_the_stage_is_not_ok_and_names_the_site_and_error(run: dict) -> None:
    stage = run["results"]["run"]["stages"]["deep"]
    assert "injected: local training breaks at site-2" in run["log"], run["log"][-3000:]
    assert stage["status"] == "partial", stage
    assert set(stage["sites_failed"]) == {FAILING}
    assert "injected: local training breaks at site-2" in stage["sites_failed"][FAILING]
    assert "round 1" in stage["sites_failed"][FAILING]
    assert run["results"]["run"]["status"] == "incomplete"  # `feddlr run` exits 1


def test_the_site_is_failed_in_the_stage_and_the_run(run: dict) -> None:
    results = run["results"]
    model = results["deep"]["models"]["dl_us"]
    assert model["sites"] == ["site-1", "site-3"]
    assert FAILING in model["failed_sites"]
    assert results["deep"]["sites"][FAILING]["status"] == "failed"
    row = next(r for r in results["run"]["sites"] if r["site_id"] == FAILING)
    assert row["status"] == "failed" and row["reason"].startswith("deep: "), row
    others = [r["status"] for r in results["run"]["sites"] if r["site_id"] != FAILING]
    assert others == ["ok", "ok"]


def test_the_report_says_which_site_failed_and_why(run: dict) -> None:
    assert "partial" in run["report"]
    assert "injected: local training breaks at site-2" in run["report"]
