"""The egress guard: the site's policy holds whatever a handler produces, and every reply
is in the audit log."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from client.egress.guard import SUPPRESSED, EgressGuard, Statistic, suppress_small
from shared.policy import PrivacyPolicy

POLICY = PrivacyPolicy(min_patients=10, min_cell_count=3)


def make_guard(tmp_path: Path, ids: tuple[str, ...] = ("p-001", "p-002")) -> EgressGuard:
    return EgressGuard("site-a", POLICY, frozenset(ids), tmp_path / "audit" / "egress.jsonl")


def audit(tmp_path: Path) -> list[dict]:
    lines = (tmp_path / "audit" / "egress.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_statistic_over_too_few_patients_is_refused(tmp_path: Path) -> None:
    guard = make_guard(tmp_path)
    out = guard.release("cohort_sums", "r1", [
        Statistic("big", {"sum": 12.5}, n=10),
        Statistic("small", {"sum": 3.0}, n=9),
    ])
    assert out["big.sum"] == 12.5
    assert "small.sum" not in out
    assert "min_patients (10)" in out["refused.small"]
    record = audit(tmp_path)[-1]
    assert record["refused"] == {"small": out["refused.small"]}
    assert "small.sum" not in record["keys"]


def test_count_table_with_a_small_cell_is_refused(tmp_path: Path) -> None:
    guard = make_guard(tmp_path)
    out = guard.release("q", "r1", [
        Statistic("ok", {"table": np.array([[0, 3], [5, 9]])}, n=17, counts=("table",)),
        Statistic("bad", {"table": np.array([[2, 30], [5, 9]])}, n=46, counts=("table",)),
        Statistic("hidden", {"c": np.array([SUPPRESSED, 4])}, n=None, counts=("c",)),
    ])
    assert "ok.table" in out and "hidden.c" in out
    assert "bad.table" not in out and "min_cell_count (3)" in out["refused.bad"]


def test_anything_keyed_by_a_patient_refuses_the_whole_reply(tmp_path: Path) -> None:
    guard = make_guard(tmp_path)
    by_key = guard.release("q", "r1", [Statistic("p-001", {"x": 1.0}, n=50)])
    by_value = guard.release("q", "r1", [Statistic("ids", {"who": ["a", "p-002"]}, n=50)])
    for out in (by_key, by_value):
        assert out["status"] == "refused" and "patient identifier" in out["reason"]
        assert "p-00" not in json.dumps(out)
    # an id that is only a prefix of a longer token is not a match
    fine = guard.release("q", "r1", [Statistic("s", {"note": "p-0010x"}, n=50)])
    assert fine["status"] == "ok"


def test_failure_reasons_are_scrubbed_of_patient_ids(tmp_path: Path) -> None:
    guard = make_guard(tmp_path)
    out = guard.fail("q", "r1", "patient p-001: mask is empty")
    assert out == {"status": "failed", "reason": "patient <patient>: mask is empty"}


def test_audit_log_records_every_reply_with_shapes_and_hash(tmp_path: Path) -> None:
    guard = make_guard(tmp_path)
    table = np.array([[4, 5], [6, 7]], dtype=np.int64)
    guard.release("a", "run-9", [Statistic("t", {"table": table, "levels": ["x", "y"]}, n=22,
                                           counts=("table",))])
    guard.refuse("b", "run-9", "asks too much")
    guard.fail("c", "run-9", "broken")
    records = audit(tmp_path)
    assert [r["message_type"] for r in records] == ["query.a", "query.b", "query.c"]
    assert [r["status"] for r in records] == ["ok", "refused", "failed"]
    first = records[0]
    assert first["run_id"] == "run-9" and first["site_id"] == "site-a"
    assert first["arrays"] == {"t.table": {"shape": [2, 2], "dtype": "int64"}}
    assert first["keys"] == ["status", "t.levels", "t.table"]
    config = json.dumps({"status": "ok", "t.levels": ["x", "y"]}, sort_keys=True).encode()
    blob = config + b"t.table" + table.tobytes()
    assert first["bytes"] == len(blob)
    assert first["sha256"] == hashlib.sha256(blob).hexdigest()


def test_small_cell_suppression() -> None:
    assert [suppress_small(c, POLICY) for c in (0, 1, 2, 3, 40)] == [0, SUPPRESSED, SUPPRESSED,
                                                                    3, 40]
