"""`feddlr audit SITE`: the privacy officer reads, from the site's own logs, what left it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from client.handlers import serve
from shared import schema
from simulation.cli import main as cli
from tests.test_policy_refusals import QUERY, make_site


def _serve_a_study(folder: Path) -> None:
    serve(folder, schema.HANDSHAKE, {"task": "label"}, "run-a")
    serve(folder, schema.COHORT_SUMS, QUERY, "run-a")  # one piece refused (3 patients)
    serve(folder, schema.COHORT_SUMS, {**QUERY, "nonce": 1}, "run-a")  # refused whole
    serve(folder, schema.HANDSHAKE, {"task": "label"}, "run-b")


def test_the_report_names_messages_statistics_refusals_and_the_ledger(tmp_path, capsys) -> None:
    folder = make_site(tmp_path)
    _serve_a_study(folder)
    page = tmp_path / "audit.html"
    assert cli(["audit", str(folder), "--html", str(page)]) == 0
    text = capsys.readouterr().out
    assert "run run-a" in text and "run run-b" in text
    assert "query.cohort_sums            ok       1" in text
    assert "query.cohort_sums            refused  1" in text
    assert "numeric.age.g1: computed over fewer than min_patients (10) patients" in text
    assert "(whole message): site-a: cohort_sums: unknown query key(s) 'nonce'" in text
    assert "numeric.age.g0 ×1" in text  # released; g1 was not
    assert "numeric.age.g1 ×" not in text
    assert "ledger: " in text and "releases in" in text
    html = page.read_text()
    assert "unknown query key(s) &#x27;nonce&#x27;" in html and "numeric.age.g0" in html
    assert "pt-0" not in text and "pt-0" not in html  # counts, never patient ids


def test_json_and_one_run_through_the_installed_command(tmp_path) -> None:
    folder = make_site(tmp_path)
    _serve_a_study(folder)
    done = subprocess.run([sys.executable, "-m", "simulation.cli", "audit", str(folder),
                           "--run", "run-b", "--json"], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert list(report["runs"]) == ["run-b"]
    assert report["runs"]["run-b"]["messages"] == [
        {"message_type": "query.handshake", "status": "ok", "count": 1}]


def test_a_broken_log_line_is_reported_and_a_folder_without_log_is_an_error(
        tmp_path, capsys) -> None:
    folder = make_site(tmp_path)
    _serve_a_study(folder)
    with (folder / "audit" / "egress.jsonl").open("a") as fh:
        fh.write("{not json\n")
    assert cli(["audit", str(folder)]) == 0
    assert "1 line(s) of the audit log are not records" in capsys.readouterr().out
    assert cli(["audit", str(tmp_path / "nowhere")]) == 2
    assert "no audit log" in capsys.readouterr().out
