"""Patients a stage left out, by reason and site, in `run.stages.<stage>.excluded` and in
the report (issue 26). The server collects them from every reply of the stage, whatever
the stage: a reply's `excluded` statistic (`excluded.reasons`, `excluded.counts`, counts
coarsened at the site: −1 where 1 … min_cell_count−1, shown as <k), or — from sites that
send only a number — `counts.n_failed` (images that could not be read or extracted).
Before, `n_excluded` of the handshake (clinical rows only) was all the report said: null
and "<k" although a stage had left patients out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import workflow
from server.core.transport import Reply
from server.report.page import write_report
from shared import schema
from shared.config import StudyConfig

REASON = "mask misregistered: offset 20.0 mm from the image"


class Replies:
    """A transport whose sites answer with what `payloads` says for them."""

    def __init__(self, payloads: dict[str, dict[str, Any]]) -> None:
        self.payloads = payloads
        self.wire: dict[str, list] = {}

    def ask(self, action: str, query: Any, sites: Any) -> dict[str, Reply]:
        return {s: Reply(s, schema.STATUS_OK, dict(self.payloads[s]), None) for s in sites}


def stage(transport: Any, config: StudyConfig, sites: list[str]) -> dict[str, Any]:
    """A stage that asks its sites twice (the same exclusions reported in both replies)."""
    transport.ask(schema.RADIOMICS_EXTRACT, {}, sites)
    transport.ask(schema.RADIOMICS_COLUMNS, {}, sites)
    return {"sites": {s: {"status": "ok"} for s in sites}}


@pytest.fixture
def status(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    monkeypatch.setitem(workflow.STAGE_RUNNERS, "radiomics", stage)
    payloads = {
        "site-1": {"excluded.reasons": [REASON, "no mask"],
                   "excluded.counts": np.array([4, -1])},
        "site-2": {"excluded.reasons": [REASON], "excluded.counts": np.array([3])},
        "site-3": {"counts.n_failed": np.array([5]), "counts.n_extracted": np.array([30])},
    }
    config = StudyConfig(sites_dir=str(tmp_path), out_dir=str(tmp_path), stages=("radiomics",))
    results: dict[str, Any] = {"run": {"sites": [{"site_id": s, "status": "ok"}
                                                 for s in payloads]}}
    out = workflow._stage_status("radiomics", Replies(payloads), config, list(payloads),
                                 results)
    results["run"]["stages"] = {"radiomics": out}
    results.pop("radiomics")  # the stub stage's result: no radiomics section to draw
    return {"status": out, "results": results, "out": tmp_path}


def test_excluded_counts_by_reason_and_site(status: dict[str, Any]) -> None:
    excluded = status["status"]["excluded"]
    assert excluded == {REASON: {"site-1": 4, "site-2": 3},
                        "no mask": {"site-1": None},  # 1 … min_cell_count−1: <k
                        workflow.FAILED_IMAGES: {"site-3": 5}}
    assert status["status"]["status"] == "ok"


def test_the_report_shows_them(status: dict[str, Any]) -> None:
    html = write_report(status["results"], status["out"]).read_text(encoding="utf-8")
    table = html.split("Patients left out by the stages")[1].split("</table>")[0]
    assert REASON in table and "no mask" in table and workflow.FAILED_IMAGES in table
    assert "site-1 4" in table and "site-2 3" in table and "site-1 &lt;k" in table


def test_clinical_rows_left_out_at_the_handshake_by_reason(tmp_path: Path) -> None:
    class Handshake(Replies):
        def handshake(self, query: Any) -> dict[str, Reply]:
            return self.ask(schema.HANDSHAKE, query, list(self.payloads))

    hello = {"site.roles": ["train"], "site.schema_version": schema.SCHEMA_VERSION,
             "counts.n_patients": np.array([40]), "counts.n_excluded": np.array([-1])}
    transport = Handshake({"site-1": {**hello, "excluded.reasons": ["age: '6,5' is not a number"],
                                      "excluded.counts": np.array([-1])},
                           "site-2": hello})
    config = StudyConfig(sites_dir=str(tmp_path), out_dir=str(tmp_path), stages=("cohort",))
    results: dict[str, Any] = {"run": {"stages": {}}}
    assert workflow.connect(transport, config, results) == ["site-1", "site-2"]
    assert results["run"]["excluded"] == {"age: '6,5' is not a number": {"site-1": None}}
    html = write_report(results, tmp_path).read_text(encoding="utf-8")
    table = html.split("Patients left out by the stages")[1].split("</table>")[0]
    assert "clinical.csv" in table and "site-1 &lt;k" in table
