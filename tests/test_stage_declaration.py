"""The stage as the unit (issue 27): every stage declared once in shared.stages, and the rest
of the system — the site's dispatch, the query declarations, the Flower ClientApp's message
registration, the workflow's runners and roles, the settings and the report — derived from
the declarations.

The toy stage: a copy of the application with one new file (the stage's code: its site
handler, query declaration, server runner and report section) and one new line in
shared/stages.py runs in Flower's Simulation Engine beside the cohort stage, its query
checked and answered through each site's egress guard, its result in results.json and its
section in report.html. Nothing else of the copy differs from this checkout."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client import handlers
from server import workflow
from shared import queries, schema, settings, stages
from shared.config import STAGE_NEEDS

REPO = Path(__file__).resolve().parents[1]
APP_PARTS = ("client", "server", "shared", "simulation", "wire", "deploy", "pyproject.toml",
             "README.md")

TOY = '''"""A toy stage: each site's number of patients, summed at the server."""

import numpy as np

from client.egress.guard import Statistic
from shared.queries.common import COMMON
from shared.queries.params import declared

QUERY_TYPES = (declared("toy_count", common=COMMON),)


def count(session, query):
    """Crosses the wire: the site's number of patients (refused below min_patients)."""
    n = len(session.site.clinical)
    return [Statistic("patients", {"n": np.array([n], dtype=np.int64)}, n=n)]


def run(transport, config, sites):
    replies = transport.ask("toy_count", {"task": config.task, "needs": ""}, sites)
    per_site = {s: int(r.payload["patients.n"][0]) for s, r in replies.items() if r.ok}
    return {"patients": per_site, "n": sum(per_site.values())}


def report(results, out):
    return f"<h2>Toy stage</h2><p>{results['toy']['n']} patients</p>"
'''
TOY_LINE = ('    Stage("toy", ("clinical",), "toy_stage:run", {"toy_count": "toy_stage:count"}, '
            'queries="toy_stage", report="toy_stage:report"),\n')


def test_every_declared_reference_resolves() -> None:
    for declared in stages.STAGES:
        for reference in (declared.runner, declared.settings, declared.report,
                          *declared.handlers.values()):
            if reference is not None:
                assert callable(stages.load(reference)), (declared.name, reference)


def test_the_registries_are_the_declarations() -> None:
    names = [s.name for s in stages.STAGES]
    assert tuple(names) == settings.STAGES and list(STAGE_NEEDS) == names
    assert set(workflow.STAGE_RUNNERS) == set(names)
    assert set(workflow.READS_EARLIER) == {"fusion", "validation", "survival"}
    assert workflow.STAGE_ROLES["survival"] == ("survival",) and "cohort" not in \
        workflow.STAGE_ROLES
    actions = set(stages.handlers())
    assert set(handlers.HANDLERS) == actions | {schema.HANDSHAKE}
    # every query a site answers is declared, and every declared query is answered
    assert set(queries.QUERIES) == (actions - set(schema.TRAIN_ACTIONS)) | {schema.HANDSHAKE} \
        | (set(queries.QUERIES) & set(schema.TRAIN_ACTIONS))
    assert set(queries.QUERIES) <= set(handlers.HANDLERS)
    assert set(schema.query_actions()) == (actions - set(schema.TRAIN_ACTIONS)) | {
        schema.HANDSHAKE, schema.BATCH}


def test_two_stages_cannot_answer_one_action_differently(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clash = stages.Stage("clash", ("clinical",), "x:y", {schema.COHORT_SUMS: "x:z"})
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, clash))
    clashing = r"cohort_sums.*client\.stages\.cohort:cohort_sums and x:z"
    with pytest.raises(ValueError, match=clashing):
        stages.handlers()


def with_toy_stage(copy: Path) -> None:
    """The two edits a new stage takes: its file, and its line in shared/stages.py."""
    (copy / "toy_stage.py").write_text(TOY, encoding="utf-8")
    registry = copy / "shared" / "stages.py"
    text = registry.read_text(encoding="utf-8")
    end = text.index("\n)\n", text.index("STAGES: tuple[Stage, ...] = ("))
    registry.write_text(text[:end + 1] + TOY_LINE + text[end + 1:], encoding="utf-8")


def changed_files(left: Path, right: Path) -> list[str]:
    """Files that differ or exist on one side only, relative to the copy's root."""
    found: list[str] = []

    def walk(cmp: filecmp.dircmp, prefix: str) -> None:
        found.extend(prefix + n for n in (*cmp.diff_files, *cmp.left_only, *cmp.right_only)
                     if not n.endswith((".pyc", "__pycache__")))
        for name, sub in cmp.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(left, right, ignore=["__pycache__"]), "")
    return sorted(found)


@pytest.mark.slow
def test_a_toy_stage_is_one_file_and_one_line(tmp_path: Path) -> None:
    original, copy = tmp_path / "original", tmp_path / "app"
    for part in APP_PARTS:
        for target in (original, copy):
            source = REPO / part
            if source.is_dir():
                shutil.copytree(source, target / part,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(source, target / part)
    with_toy_stage(copy)
    assert changed_files(original, copy) == ["shared/stages.py", "toy_stage.py"]
    old = (original / "shared" / "stages.py").read_text(encoding="utf-8").splitlines()
    new = (copy / "shared" / "stages.py").read_text(encoding="utf-8").splitlines()
    assert len(new) == len(old) + 1 and [line for line in new if line not in old] == [
        TOY_LINE.rstrip("\n")]

    script = f"""
import json, sys
from pathlib import Path
from simulation.cohort import simulate_cohort
from simulation.launcher import run_simulation
root = Path({str(tmp_path)!r})
simulate_cohort(root / "sites", n_sites=2, n_patients=30, seed=3, images=False)
rc = run_simulation(root / "sites", root / "out", {{"stages": "cohort,toy"}}, echo=False)
sys.exit(rc)
"""
    env = {**os.environ, "PYTHONPATH": str(copy),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=300)
    out = tmp_path / "out"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["run"]["stages"]["toy"]["status"] == "ok"
    rows = {r["site_id"]: r["n_patients"] for r in results["run"]["sites"]}
    assert results["toy"]["patients"] == rows and results["toy"]["n"] == sum(rows.values()) > 0
    report = (out / "report.html").read_text(encoding="utf-8")
    assert f"<h2>Toy stage</h2><p>{sum(rows.values())} patients</p>" in report
    audit = (tmp_path / "sites" / "site-1" / "audit" / "egress.jsonl").read_text()
    assert '"message_type": "query.toy_count"' in audit  # through the site's egress guard
