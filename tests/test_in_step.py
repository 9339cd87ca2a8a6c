"""Independent fits in step (`server.core.in_step`) and the batch message that carries them.

The leave-one-site-out refits in step must give exactly what each refit gives alone, in as
many rounds as the longest of them; each part of a batch must be guarded and audited at the
site as a message of its own, and logged so by the server.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest

from client.handlers import serve
from server.core.in_step import in_step
from server.core.transport import Reply, Transport, record_wire, reply_from_payload, site_query
from server.stages.radiomics import run_radiomics
from shared import schema
from shared.config import StudyConfig, stage_settings
from simulation.in_process import InProcessTransport
from tests.test_validation_stage import cohort, write_sites


class Counting:
    """A transport that counts the rounds (asks) it sends, by action."""

    def __init__(self, inner: Transport) -> None:
        self.inner, self.asks = inner, []

    def handshake(self, query):
        return self.inner.handshake(query)

    def ask(self, action: str, query, sites: Iterable[str]) -> dict[str, Reply]:
        self.asks.append(action)
        return self.inner.ask(action, query, sites)


class Echo:
    """Sites that answer `cohort_sums` with the query's `x` plus their index; `gone` sites
    are dropped, `failing` ones fail the part whose `x` is negative."""

    def __init__(self, sites: list[str], gone: Iterable[str] = ()) -> None:
        self.sites, self.gone, self.asks = sites, set(gone), []

    def handshake(self, query):
        raise AssertionError("not used")

    def ask(self, action: str, query, sites: Iterable[str]) -> dict[str, Reply]:
        self.asks.append((action, {s: site_query(query, s) for s in sites}))
        out = {}
        for s in sites:
            q = site_query(query, s)
            if s in self.gone:
                out[s] = Reply(s, schema.STATUS_DROPPED, reason="gone")
            elif action == schema.BATCH:
                parts = {n: (a, self.answer(s, p)) for n, (a, p) in schema.batch_parts(q).items()}
                out[s] = reply_from_payload(s, {"status": "ok", **schema.batch_payload(parts)})
            else:
                out[s] = reply_from_payload(s, self.answer(s, q))
        return out

    def answer(self, site: str, q: Mapping) -> dict:
        if q["x"] < 0:
            return {"status": "failed", "reason": "negative"}
        return {"status": "ok", "y": float(q["x"]) + self.sites.index(site)}


def echo_fit(rounds: int, sites: list[str], start: float = 0.0):
    def fit(lane: Transport) -> list[dict[str, float]]:
        got = []
        for r in range(rounds):
            replies = lane.ask(schema.COHORT_SUMS, {"x": start + r}, sites)
            got.append({s: rep.payload.get("y") for s, rep in replies.items()})
        return got
    return fit


def test_fits_in_step_take_the_rounds_of_the_longest_and_get_their_own_replies() -> None:
    sites = ["a", "b", "c"]
    transport = Echo(sites)
    fits = {"two": echo_fit(2, ["a", "b"], 100.0), "five": echo_fit(5, ["b", "c"], 200.0),
            "one": echo_fit(1, sites, 300.0)}
    out = in_step(transport, fits)
    assert len(transport.asks) == 5  # not 2 + 5 + 1
    assert out["two"] == [{"a": 100.0, "b": 101.0}, {"a": 101.0, "b": 102.0}]
    assert out["five"] == [{"b": 201.0 + r, "c": 202.0 + r} for r in range(5)]
    assert out["one"] == [{"a": 300.0, "b": 301.0, "c": 302.0}]
    first_action, first = transport.asks[0]
    assert first_action == schema.BATCH
    assert sorted(schema.batch_parts(first["a"])) == ["l0", "l2"]  # a is not in "five"
    # once only "five" is left its rounds go out as its own queries, not as batches
    assert [a for a, _ in transport.asks[2:]] == [schema.COHORT_SUMS] * 3


def test_a_dropped_site_reaches_every_fit_and_a_failed_part_only_its_own() -> None:
    transport = Echo(["a", "b"], gone=["b"])
    out = in_step(transport, {"f": echo_fit(1, ["a", "b"]), "g": echo_fit(1, ["a"], -5.0)})
    assert out["f"] == [{"a": 0.0, "b": None}]
    seen = {}

    def record(lane: Transport) -> None:
        seen.update(lane.ask(schema.COHORT_SUMS, {"x": 1.0}, ["a", "b"]))

    in_step(transport, {"r": record, "g": echo_fit(1, ["a"], -5.0)})
    assert seen["b"].status == schema.STATUS_DROPPED and seen["b"].reason == "gone"
    assert seen["a"].ok
    failed = {}

    def failing(lane: Transport) -> None:
        failed.update(lane.ask(schema.COHORT_SUMS, {"x": -1.0}, ["a"]))

    in_step(Echo(["a"]), {"ok": echo_fit(1, ["a"]), "bad": failing})
    assert failed["a"].status == "failed" and failed["a"].reason == "negative"


def test_an_error_in_one_fit_is_raised_after_the_others_end() -> None:
    transport = Echo(["a"])
    done = []

    def broken(lane: Transport) -> None:
        lane.ask(schema.COHORT_SUMS, {"x": 0.0}, ["a"])
        raise ValueError("broken fit")

    def long(lane: Transport) -> None:
        done.append(echo_fit(4, ["a"])(lane))

    with pytest.raises(ValueError, match="broken fit"):
        in_step(transport, {"long": long, "broken": broken})
    assert len(done[0]) == 4 and len(transport.asks) == 4


def test_loso_refits_in_step_equal_the_refits_one_after_the_other(tmp_path: Path) -> None:
    parts = cohort()
    folders = write_sites(tmp_path / "sites", parts, min_cell=1, features=True)
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label",
                         settings=stage_settings({"cv-folds": 3}))
    sites = ["site-1", "site-2", "site-3", "site-4"]
    train = sites[:3]

    def refit(held: str):
        return lambda lane: run_radiomics(lane, config, sites, holdout=[held],
                                          variant=f"loso-{held}")

    alone, rounds_alone = {}, {}
    for held in train:
        transport = Counting(InProcessTransport(folders))
        transport.handshake({"task": "label"})
        alone[held] = refit(held)(transport)
        rounds_alone[held] = len(transport.asks)
    together = Counting(InProcessTransport(folders))
    together.handshake({"task": "label"})
    stepped = in_step(together, {held: refit(held) for held in train})
    for held in train:
        assert json.dumps(stepped[held], sort_keys=True, default=str) == \
            json.dumps(alone[held], sort_keys=True, default=str)
        assert stepped[held]["rounds"]["lasso"] > 3  # a real multi-round fit
    assert len(together.asks) == max(rounds_alone.values())
    assert len(together.asks) < sum(rounds_alone.values()) / 2
    assert together.asks.count(schema.BATCH) > 10


def test_each_part_of_a_batch_is_audited_and_logged_as_its_own_message(tmp_path: Path) -> None:
    folders = write_sites(tmp_path / "sites", cohort(), min_cell=1)
    root = folders[0]
    query = schema.batch_payload({"l0": (schema.HANDSHAKE, {"task": "label"}),
                                  "l1": (schema.VALIDATION_RANGES,
                                         {"task": "label", "needs": "predictions"})})
    reply = serve(root, schema.BATCH, query, "run-7")
    assert reply["status"] == "ok"
    parts = schema.batch_parts(reply)
    assert [a for a, _ in parts.values()] == [schema.HANDSHAKE, schema.VALIDATION_RANGES]
    assert parts["l0"][1]["status"] == "ok" and parts["l0"][1]["site.site_id"] == "site-1"
    audit = [json.loads(line) for line in
             (root / "audit" / "egress.jsonl").read_text().splitlines()]
    assert [a["message_type"] for a in audit[-2:]] == ["query.handshake",
                                                       "query.validation_ranges"]
    wire: dict[str, list[dict]] = {}
    record_wire(wire, "site-1", schema.BATCH, reply_from_payload("site-1", reply))
    assert [(w["message_type"], w["sha256"]) for w in wire["site-1"]] == \
        [(a["message_type"], a["sha256"]) for a in audit[-2:]]


@pytest.mark.parametrize("query, problem", [
    ({schema.BATCH_PARTS: ["l0"], schema.BATCH_ACTIONS: []}, "same length"),
    ({schema.BATCH_PARTS: ["l0"], schema.BATCH_ACTIONS: [schema.BATCH]}, "no such query"),
    ({schema.BATCH_PARTS: ["l0"], schema.BATCH_ACTIONS: ["train.dsfr"]}, "no such query"),
    ({schema.BATCH_PARTS: ["../x"], schema.BATCH_ACTIONS: [schema.HANDSHAKE]}, "part name"),
    ({"x": np.zeros(2)}, "needs"),
])
def test_a_malformed_batch_is_failed_and_audited(tmp_path: Path, query: dict,
                                                  problem: str) -> None:
    root = write_sites(tmp_path / "sites", cohort(), min_cell=1)[0]
    reply = serve(root, schema.BATCH, query, "run-7")
    assert reply["status"] == "failed" and problem in reply["reason"]
    last = json.loads((root / "audit" / "egress.jsonl").read_text().splitlines()[-1])
    assert last["message_type"] == "query.batch" and last["status"] == "failed"
