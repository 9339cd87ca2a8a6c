"""Dropouts, stragglers, min-sites/min-replies and checkpoint/resume, in-process and on the
real GridTransport code with a scripted Grid (the loopback deployment test kills a real
SuperNode; these pin down every branch quickly)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from flwr.app import Error, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats

import server.workflow as workflow
from server.core.transport import (
    GridTransport,
    Reply,
    SiteSetChanged,
    StudyError,
    ask_same_sites,
    on_stable_sites,
)
from shared import cohort, schema
from shared.config import StudyConfig
from simulation.in_process import InProcessTransport
from tests.splits import gbsg2, non_iid_split
from wire import to_records

NUMERIC = ("age", "tsize", "pnodes")
COVARIATES = (*NUMERIC, "horTh", "tgrade")


def write_sites(root: Path) -> list[Path]:
    frame = gbsg2()
    frame["label"] = frame.pop("cens")
    frame.insert(0, "patient_id", [f"g{i:04d}" for i in range(len(frame))])
    folders = []
    for i, part in enumerate(non_iid_split(frame, by="age", n_sites=3, seed=5)):
        folder = root / f"site-{i + 1}"
        folder.mkdir(parents=True)
        (folder / "site.yaml").write_text(yaml.safe_dump({
            "site_id": folder.name, "roles": ["train"], "time_unit": "days",
            "privacy": {"min_patients": 10, "min_cell_count": 1}}))
        part.to_csv(folder / "clinical.csv", index=False)
        folders.append(folder)
    return folders


class FlakyTransport(InProcessTransport):
    """In-process sites, except that `drop[site]` names the action at which a site stops
    answering (as GridTransport reports a timeout); `asked` records every round."""

    def __init__(self, dirs: Iterable[Path], drop: Mapping[str, str] | None = None) -> None:
        super().__init__(dirs)
        self.drop = dict(drop or {})
        self.dropped: dict[str, str] = {}
        self.asked: list[tuple[str, list[str]]] = []

    def ask(self, action: str, query, sites: Iterable[str]) -> dict[str, Reply]:
        sites = list(sites)
        self.asked.append((action, sites))
        live = [s for s in sites if s not in self.dropped and self.drop.get(s) != action]
        out = super().ask(action, query, live)
        for s in sites:
            if s not in live:
                reason = "no reply within round-timeout 5s"
                self.dropped.setdefault(s, f"{action}: {reason}")
                out[s] = Reply(s, schema.STATUS_DROPPED, reason=reason)
        return {s: out[s] for s in sites}


def config(tmp_path: Path, **kw) -> StudyConfig:
    values = {"out_dir": str(tmp_path / "out"), "task": "label", "stages": ("cohort",),
              "cohort_covariates": COVARIATES, **kw}
    return StudyConfig(**values)


def pooled(folders: list[Path], names: Iterable[str]) -> pd.DataFrame:
    return pd.concat([pd.read_csv(f / "clinical.csv") for f in folders if f.name in names],
                     ignore_index=True)


# --------------------------------------------------------------------------- dropouts


def test_site_dropping_in_round_2_restarts_the_cohort_fit_on_the_survivors(tmp_path):
    folders = write_sites(tmp_path / "sites")
    transport = FlakyTransport(folders, drop={"site-3": schema.COHORT_SQUARES})
    results = workflow.run_study(transport, config(tmp_path))

    rows = {r["site_id"]: r for r in results["run"]["sites"]}
    assert rows["site-3"]["status"] == "dropped"
    assert "round-timeout" in rows["site-3"]["reason"]
    assert [rows[s]["status"] for s in ("site-1", "site-2")] == ["ok", "ok"]
    co = results["cohort"]
    assert co["sites_used"] == ["site-1", "site-2"]
    assert co["restarts"] == [{"sites": ["site-1", "site-2", "site-3"],
                               "dropped": {"site-3": "no reply within round-timeout 5s"},
                               "action": schema.COHORT_SQUARES}]
    # round 2 ran twice: once on all three (site-3 silent), then on the survivors alone
    assert [a for a in transport.asked if a[0] == schema.COHORT_SQUARES] == [
        (schema.COHORT_SQUARES, ["site-1", "site-2", "site-3"]),
        (schema.COHORT_SQUARES, ["site-1", "site-2"])]
    # every pooled number is exact over the survivors: no piece of site-3 is mixed in
    data = pooled(folders, ("site-1", "site-2"))
    assert co["n"]["pooled"] == data.label.value_counts().sort_index().tolist()
    for name in NUMERIC:
        g0, g1 = data.loc[data.label == 0, name], data.loc[data.label == 1, name]
        entry = co["covariates"][name]
        np.testing.assert_allclose(entry["mean"], [g0.mean(), g1.mean()], rtol=1e-12)
        np.testing.assert_allclose(entry["sd"], [g0.std(), g1.std()], rtol=1e-10)
        assert entry["t_test"]["p_value"] == pytest.approx(stats.ttest_ind(g0, g1).pvalue,
                                                           rel=1e-9)
        assert "site-3" not in entry["sites"]
    table = pd.crosstab(data.tgrade, data.label).to_numpy()
    assert co["covariates"]["tgrade"]["counts"] == table.tolist()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["cohort"]["restarts"][0]["dropped"] == {"site-3": co["restarts"][0]
                                                         ["dropped"]["site-3"]}


def test_a_site_failing_round_2_is_left_out_exactly_without_a_new_round(tmp_path):
    """A site that answers round 2 with `failed` (not dropped) is left out of the numeric
    tables; the others' squares are re-centred on their own pooled means, exactly."""
    folders = write_sites(tmp_path / "sites")

    class FailingSquares(FlakyTransport):
        def ask(self, action, query, sites):
            out = super().ask(action, query, sites)
            if action == schema.COHORT_SQUARES and "site-2" in out:
                out["site-2"] = Reply("site-2", schema.STATUS_FAILED, reason="disk error")
            return out

    transport = FailingSquares(folders)
    results = workflow.run_study(transport, config(tmp_path))
    co = results["cohort"]
    assert co["restarts"] == [] and len([a for a in transport.asked
                                         if a[0] == schema.COHORT_SQUARES]) == 1
    data = pooled(folders, ("site-1", "site-3"))
    for name in NUMERIC:
        entry = co["covariates"][name]
        assert entry["sites_missing"] == ["site-2"]
        g0, g1 = data.loc[data.label == 0, name], data.loc[data.label == 1, name]
        np.testing.assert_allclose(entry["mean"], [g0.mean(), g1.mean()], rtol=1e-12)
        np.testing.assert_allclose(entry["sd"], [g0.std(), g1.std()], rtol=1e-10)


def test_fewer_sites_than_min_sites_after_a_dropout_stops_with_a_clear_error(tmp_path):
    folders = write_sites(tmp_path / "sites")
    transport = FlakyTransport(folders, drop={"site-2": schema.COHORT_SQUARES})
    with pytest.raises(StudyError, match=r"cohort: only 2 site\(s\) left after site-2 dropped "
                                         r"\(no reply within round-timeout 5s\), min-sites is 3"):
        workflow.run_study(transport, config(tmp_path, min_sites=3))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "cohort" not in saved and saved["run"]["finished"]


def test_a_site_dropped_in_one_stage_is_not_asked_in_the_next(tmp_path, monkeypatch):
    folders = write_sites(tmp_path / "sites")
    later: list[list[str]] = []

    def next_stage(transport, cfg, sites):
        later.append(list(sites))
        return {"sites": {}}

    monkeypatch.setitem(workflow.STAGE_RUNNERS, "dsfr", next_stage)
    monkeypatch.setattr(workflow, "write_report", lambda results, out: None)
    transport = FlakyTransport(folders, drop={"site-1": schema.COHORT_SUMS})
    results = workflow.run_study(transport, config(tmp_path, stages=("cohort", "dsfr")))
    assert later == [["site-2", "site-3"]]
    assert results["cohort"]["restarts"] == []  # round 1 drop: nothing was pooled yet
    assert results["cohort"]["sites_used"] == ["site-2", "site-3"]
    row = next(r for r in results["run"]["sites"] if r["site_id"] == "site-1")
    assert row["status"] == "dropped" and "round-timeout" in row["reason"]

    transport = FlakyTransport(folders, drop={"site-1": schema.COHORT_SUMS})
    with pytest.raises(StudyError, match=r"only 2 usable site\(s\) left after cohort, "
                                         r"min-sites is 3: site-1: cohort"):
        workflow.run_study(transport, config(tmp_path, stages=("cohort", "dsfr"),
                                             min_sites=3))


def test_fewer_replies_than_min_replies_fails_the_stage_not_the_study(tmp_path, monkeypatch):
    folders = write_sites(tmp_path / "sites")
    ran = []
    monkeypatch.setitem(workflow.STAGE_RUNNERS, "dsfr",
                        lambda t, c, s: ran.append(s) or {"sites": {}})
    monkeypatch.setattr(workflow, "write_report", lambda results, out: None)
    transport = FlakyTransport(folders, drop={"site-1": schema.COHORT_SUMS,
                                              "site-2": schema.COHORT_SUMS})
    results = workflow.run_study(transport, config(tmp_path, stages=("cohort", "dsfr"),
                                                   min_replies=2))
    stage = results["run"]["stages"]["cohort"]
    assert stage["status"] == "failed"
    assert stage["reason"] == (
        "1 site(s) answered round 1 of 3 asked, min-replies is 2; site-1: dropped (no reply "
        "within round-timeout 5s); site-2: dropped (no reply within round-timeout 5s)")
    assert "cohort" not in results
    assert ran == [["site-3"]]


def test_on_stable_sites_restarts_until_the_site_set_holds():
    calls: list[list[str]] = []

    def fit(sites):
        calls.append(sites)
        if "b" in sites:
            raise SiteSetChanged("step", {"b": "gone"})
        return sum(len(s) for s in sites)

    result, restarts = on_stable_sites(fit, ["a", "b", "c"], min_sites=2, stage="x")
    assert result == 2 and calls == [["a", "b", "c"], ["a", "c"]]
    assert restarts == [{"sites": ["a", "b", "c"], "dropped": {"b": "gone"}, "action": "step"}]
    with pytest.raises(StudyError, match=r"x: only 2 site\(s\) left after b dropped \(gone\), "
                                         r"min-sites is 3"):
        on_stable_sites(fit, ["a", "b", "c"], min_sites=3, stage="x")


def test_ask_same_sites_raises_only_for_dropped_sites(tmp_path):
    folders = write_sites(tmp_path / "sites")
    transport = FlakyTransport(folders, drop={"site-2": schema.COHORT_SUMS})
    transport.handshake({"task": "label"})
    query = {"task": "label", "covariates": ["age"]}
    replies = ask_same_sites(transport, schema.HANDSHAKE, {"task": "nope"}, ["site-1"])
    # an unknown task is outside the query's declaration: refused, and a refused (or failed)
    # reply is not a changed site set
    assert replies["site-1"].status == "refused"
    with pytest.raises(SiteSetChanged) as info:
        ask_same_sites(transport, schema.COHORT_SUMS, query, ["site-1", "site-2"])
    assert info.value.dropped == {"site-2": "no reply within round-timeout 5s"}


def test_recentred_squares_are_exact():
    rng = np.random.default_rng(0)
    x, y = rng.normal(5, 2, 40), rng.integers(0, 2, 40)
    n, total = cohort.local_group_sums(x, y)
    old, new = np.array([4.0, 6.5]), np.array([5.2, 4.9])
    moved = cohort.recenter_squares(cohort.local_group_squares(x, y, old), n, total, old, new)
    np.testing.assert_allclose(moved, cohort.local_group_squares(x, y, new), rtol=1e-12)


# --------------------------------------------------------------------------- GridTransport


class ScriptedGrid:
    """A Grid whose nodes answer per a script: node -> list of ("ok", payload) |
    ("error", code) | ("silent",) | ("late", payload) per pull, one entry per round; a late
    reply is there only from LATE seconds after the push (after any round-timeout here)."""

    LATE = 2.0

    def __init__(self, script: dict[int, list[tuple]]) -> None:
        self.script = script
        self.inbox: dict[str, Message] = {}
        self.round = -1
        self.pushed_at = 0.0

    def get_node_ids(self) -> list[int]:
        return sorted(self.script)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.round += 1
        ids = []
        for i, msg in enumerate(messages):
            mid = f"r{self.round}-m{i}"
            msg.metadata.__dict__["_message_id"] = mid
            self.inbox[mid] = msg
            ids.append(mid)
        self.pushed_at = time.monotonic()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        late = time.monotonic() - self.pushed_at > self.LATE
        out = []
        for mid in message_ids:
            msg = self.inbox[mid]
            node = msg.metadata.dst_node_id
            step = self.script[node][self.round]
            if step[0] == "ok" or (step[0] == "late" and late):
                out.append(reply(msg, content=to_records(step[1])))
            elif step[0] == "error":
                out.append(reply(msg, error=Error(step[1], "node went away")))
        return out


def reply(msg: Message, content: RecordDict | None = None, error: Error | None = None):
    metadata = Metadata(run_id=1, message_id="", src_node_id=msg.metadata.dst_node_id,
                        dst_node_id=0, reply_to_message_id=msg.metadata.message_id,
                        group_id="", created_at=0.0, ttl=60, message_type=msg.metadata
                        .message_type)
    return Message(content if error is None else error, metadata=metadata)


@pytest.fixture
def task_identity():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def hello(site: str) -> dict:
    return {"status": "ok", "site.site_id": site}


def test_grid_transport_matches_replies_by_message_and_drops_silent_or_gone_nodes(
        task_identity):
    grid = ScriptedGrid({
        11: [("ok", hello("a")), ("ok", {"status": "ok", "x": 1.0}), ("ok", {"status": "ok"})],
        12: [("ok", hello("b")), ("error", ErrorCode.NODE_UNAVAILABLE), ("ok", {})],
        13: [("ok", hello("c")), ("error", ErrorCode.CLIENT_APP_RAISED_EXCEPTION),
             ("ok", {"status": "ok"})],
        14: [("ok", hello("d")), ("late", {"status": "ok"}), ("ok", {})],
    })
    transport = GridTransport(grid, round_timeout=0.3, connect_timeout=5, min_sites=4,
                              poll_interval=0.05)
    transport._wait_for_nodes = lambda: grid.get_node_ids()
    assert sorted(transport.handshake({})) == ["a", "b", "c", "d"]

    replies = transport.ask("cohort_sums", {}, ["a", "b", "c", "d"])
    assert replies["a"].ok and replies["a"].payload["x"] == 1.0
    assert replies["b"].status == "dropped" and "node went away" in replies["b"].reason
    assert replies["c"].status == "failed"  # the ClientApp raised: a failure, not a dropout
    assert replies["d"].status == "dropped"
    assert replies["d"].reason == "no reply within round-timeout 0.3s"
    assert set(transport.dropped) == {"b", "d"}

    # dropped sites are not asked again; their reply says why
    replies = transport.ask("cohort_squares", {}, ["a", "b", "c", "d"])
    assert [replies[s].status for s in "abcd"] == ["ok", "dropped", "ok", "dropped"]
    assert replies["b"].reason.startswith("dropped earlier: cohort_sums: site error")
    assert len(grid.inbox) == 4 + 4 + 2
    assert [w["message_type"] for w in transport.wire["a"]] == [
        "query.handshake", "query.cohort_sums", "query.cohort_squares"]


# --------------------------------------------------------------------------- resume


class CountingTransport(InProcessTransport):
    def __init__(self, dirs: Iterable[Path]) -> None:
        super().__init__(dirs)
        self.actions: list[str] = []

    def ask(self, action, query, sites):
        self.actions.append(action)
        return super().ask(action, query, sites)


class ServerKilled(BaseException):
    """The server process dying mid-stage (a signal, not an error a stage can report)."""


def crashing_stage(transport, cfg, sites):
    raise ServerKilled("server killed in the middle of the dsfr stage")


def test_resume_continues_from_the_last_completed_stage(tmp_path, monkeypatch):
    folders = write_sites(tmp_path / "sites")
    monkeypatch.setattr(workflow, "write_report", lambda results, out: None)
    monkeypatch.setitem(workflow.STAGE_RUNNERS, "dsfr", crashing_stage)
    cfg = config(tmp_path, stages=("cohort", "dsfr"))
    with pytest.raises(ServerKilled, match="server killed"):
        workflow.run_study(CountingTransport(folders), cfg, run_id="run-1")
    saved = json.loads((tmp_path / "out" / "checkpoint.json").read_text())
    assert saved["run_id"] == "run-1" and list(saved["stages"]) == ["cohort"]
    first = json.loads((tmp_path / "out" / "results.json").read_text())["cohort"]

    monkeypatch.setitem(workflow.STAGE_RUNNERS, "dsfr",
                        lambda t, c, s: {"ran_on": s, "sites": {}})
    transport = CountingTransport(folders)
    results = workflow.run_study(transport, config(tmp_path, stages=("cohort", "dsfr"),
                                                   resume=True, round_timeout=30.0),
                                 run_id="run-2")
    assert transport.actions == []  # only the handshake: no cohort query was sent again
    assert results["run"]["stages"]["cohort"]["resumed_from"] == "run-1"
    assert results["run"]["resume"]["stages"] == ["cohort"]
    assert results["dsfr"]["ran_on"] == ["site-1", "site-2", "site-3"]
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["cohort"] == first
    saved = json.loads((tmp_path / "out" / "checkpoint.json").read_text())
    assert saved["stages"]["cohort"]["run_id"] == "run-1"
    assert saved["stages"]["dsfr"]["run_id"] == "run-2"


def test_resume_runs_everything_again_when_data_or_config_changed(tmp_path):
    folders = write_sites(tmp_path / "sites")
    workflow.run_study(CountingTransport(folders), config(tmp_path), run_id="run-1")

    transport = CountingTransport(folders)
    results = workflow.run_study(transport, config(tmp_path, task="label", resume=True,
                                                   cohort_covariates=("age",)))
    assert "cohort_covariates" in results["run"]["resume"]["reason"]
    assert transport.actions == [schema.COHORT_SUMS, schema.COHORT_SQUARES,
                                 schema.COHORT_HISTOGRAMS]

    rows = pd.read_csv(folders[1] / "clinical.csv")
    rows.loc[0, "age"] += 1
    rows.to_csv(folders[1] / "clinical.csv", index=False)
    from client.site.session import clear_sessions

    clear_sessions()
    transport = CountingTransport(folders)
    results = workflow.run_study(transport, config(tmp_path, resume=True,
                                                   cohort_covariates=("age",)))
    assert "site-2's data changed" in results["run"]["resume"]["reason"]
    assert transport.actions == [schema.COHORT_SUMS, schema.COHORT_SQUARES,
                                 schema.COHORT_HISTOGRAMS]

    transport = CountingTransport(folders[:2])
    results = workflow.run_study(transport, config(tmp_path, resume=True,
                                                   cohort_covariates=("age",)))
    assert "site-3 is missing" in results["run"]["resume"]["reason"]
