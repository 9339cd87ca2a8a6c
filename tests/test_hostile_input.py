"""Hostile input at the edge: malformed, oversized, unknown-type and wrong-schema messages get
a `failed` reply with a reason and the node keeps serving; property-based fuzzing (hypothesis)
over message contents and over site folders finds no crash (always a payload with `status`)
and no leak (no patient id in any reply)."""

from __future__ import annotations

import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from client.app import app
from client.handlers import serve
from client.site.session import clear_sessions
from shared import schema
from simulation.cohort import simulate_cohort
from wire import read_payload, to_records

STATUSES = {schema.STATUS_OK, schema.STATUS_REFUSED, schema.STATUS_FAILED}
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    simulate_cohort(root / "sites", n_sites=1, n_patients=40, seed=4, images=False)
    return root / "sites" / "site-1"


def patient_ids(folder: Path) -> list[str]:
    with (folder / "clinical.csv").open() as fh:
        return [row["patient_id"] for row in csv.DictReader(fh) if row.get("patient_id")]


def context(folder: Path | None, **node: object) -> Context:
    config = {"site-dir": str(folder)} if folder else {}
    return Context(run_id=9, node_id=2, node_config={**config, **node}, state=RecordDict(),
                   run_config={})


def message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(run_id=9, message_id="m", src_node_id=0, dst_node_id=2,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=60,
                        message_type=message_type)
    return Message(content, metadata=metadata)


def reply_of(msg: Message, ctx: Context) -> dict:
    out = app(msg, ctx)
    assert not out.has_error(), out.error
    assert out.metadata.reply_to_message_id == "m"
    payload = read_payload(out.content)
    assert payload["status"] in STATUSES
    return payload


def assert_no_leak(reply: dict, ids: list[str]) -> None:
    text = json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v
                       for k, v in reply.items()}, default=repr)
    leaked = [i for i in ids if i in text]
    assert leaked == [], f"patient ids in a reply: {leaked[:3]}"


# --------------------------------------------------------------------------- at the edge

GOOD = RecordDict({schema.ARRAYS: ArrayRecord({}),
                   schema.CONFIG: ConfigRecord({"task": "her2-positive"})})


@pytest.mark.parametrize(("message_type", "content", "node", "expected"), [
    ("query.drop_tables", GOOD, {}, "unknown message type 'query.drop_tables'"),
    ("train", GOOD, {}, "unknown message type 'train'"),
    ("evaluate.default", GOOD, {}, "unknown message type 'evaluate.default'"),
    ("query.cohort_sums", RecordDict({schema.ARRAYS: ArrayRecord(
        {"x": Array(np.zeros(1000))})}), {"max-query-bytes": 4096},
     "query of 8128 bytes is larger than this site's max-query-bytes (4096); not read"),
    ("query.cohort_sums", RecordDict({"payload": ConfigRecord({"a": 1})}), {},
     "malformed query: SchemaError: unexpected record(s) ['payload']"),
    ("query.cohort_sums", RecordDict({schema.CONFIG: MetricRecord({"a": 1})}), {},
     "malformed query: SchemaError: record 'config' is not a ConfigRecord"),
    ("query.cohort_sums", RecordDict({schema.CONFIG: ConfigRecord({"task": b"\x00\xff"})}), {},
     "malformed query: SchemaError: payload key 'task' has unsupported type bytes"),
    ("query.cohort_sums", RecordDict({schema.ARRAYS: ArrayRecord({"a": Array(
        dtype="float64", shape=(4,), stype="numpy.ndarray", data=b"not an npy file")})}), {},
     "malformed query: "),
    ("query.cohort_sums", RecordDict({schema.ARRAYS: ArrayRecord({"k": Array(np.ones(2))}),
                                      schema.CONFIG: ConfigRecord({"k": 1})}), {},
     "malformed query: SchemaError: keys in both records: ['k']"),
])
def test_bad_messages_get_a_failed_reply_and_the_node_keeps_serving(
        site: Path, message_type: str, content: RecordDict, node: dict, expected: str) -> None:
    before = len((site / "audit" / "egress.jsonl").read_text().splitlines()) \
        if (site / "audit" / "egress.jsonl").exists() else 0
    reply = reply_of(message(content, message_type), context(site, **node))
    assert reply["status"] == "failed" and reply["reason"].startswith(expected), reply
    records = (site / "audit" / "egress.jsonl").read_text().splitlines()
    assert len(records) == before + 1 and json.loads(records[-1])["status"] == "failed"
    # the same app object answers the next good query as usual
    good = reply_of(message(GOOD, "query.handshake"), context(site, **node))
    assert good["status"] == "ok" and good["site.site_id"] == "site-1"


def test_a_node_without_a_site_folder_still_replies(site: Path) -> None:
    reply = reply_of(message(GOOD, "query.handshake"), context(None))
    assert reply["status"] == "failed"
    assert reply["reason"].startswith("this node has no usable site folder")


# --------------------------------------------------------------------------- fuzz: contents

KEYS = st.one_of(
    st.sampled_from(["task", "covariates", "needs", "means.age", "means.ki67",
                     "means.hr_status", "means.tumour_size_mm", "min_patients", "step"]),
    st.text(min_size=1, max_size=24))
SCALARS = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(),
                    st.text(max_size=40),
                    st.sampled_from(["her2-positive", "her2-low", "label", "age,ki67",
                                     "clinical,survival", "images", "mri"]))
ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.float32, np.int64, np.int8, np.uint8, np.bool_,
                           np.complex128]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
VALUES = st.one_of(SCALARS, ARRAYS,
                   st.lists(st.integers(-10, 10), max_size=5),
                   st.lists(st.floats(), max_size=5),
                   st.lists(st.sampled_from(["age", "ki67", "hr_status", "nope", ""]),
                            max_size=6))
ACTIONS = st.one_of(st.sampled_from(schema.query_actions()), st.text(max_size=12))


@FUZZ
@given(action=ACTIONS, query=st.dictionaries(KEYS, VALUES, max_size=6))
def test_fuzz_serve_with_random_queries(site: Path, action: str, query: dict) -> None:
    reply = serve(site, action, query, "fuzz")
    assert isinstance(reply, dict) and reply["status"] in STATUSES
    to_records(reply)  # what a site sends is always a valid wire payload
    assert_no_leak(reply, patient_ids(site))


CONFIG_VALUES = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(), st.text(max_size=30),
    st.binary(max_size=30), st.lists(st.integers(-5, 5), max_size=4),
    st.lists(st.text(max_size=8), max_size=4), st.lists(st.floats(), max_size=4))
RECORD_NAMES = st.one_of(st.sampled_from([schema.ARRAYS, schema.CONFIG]),
                         st.text(min_size=1, max_size=10))


@st.composite
def records(draw) -> RecordDict:
    content = RecordDict()
    for name in draw(st.lists(RECORD_NAMES, max_size=3, unique=True)):
        kind = draw(st.sampled_from(["array", "config", "metric"]))
        keys = st.one_of(KEYS, st.text(min_size=1, max_size=10))
        if kind == "array":
            arrays = draw(st.dictionaries(keys, ARRAYS.filter(lambda a: a.dtype != np.complex128),
                                          max_size=3))
            record = {k: Array(v) for k, v in arrays.items()}
            if draw(st.booleans()):
                record["junk"] = Array(dtype="float64", shape=(2,), stype="numpy.ndarray",
                                       data=draw(st.binary(max_size=40)))
            content[name] = ArrayRecord(record)
        elif kind == "config":
            content[name] = ConfigRecord(draw(st.dictionaries(keys, CONFIG_VALUES,
                                                              max_size=5)))
        else:
            content[name] = MetricRecord(draw(st.dictionaries(
                keys, st.one_of(st.integers(-100, 100), st.floats(allow_nan=False)),
                max_size=3)))
    return content


MESSAGE_TYPES = st.one_of(
    st.sampled_from([f"query.{a}" for a in schema.query_actions()]),
    st.sampled_from(["query.unknown", "train", "evaluate", "query", "train.weights"]),
    st.from_regex(r"\A(query|train|evaluate)\.[a-z_]{1,12}\Z"))


@FUZZ
@given(content=records(), message_type=MESSAGE_TYPES,
       limit=st.sampled_from([None, 64, 4096]))
def test_fuzz_client_app_with_random_messages(site: Path, content: RecordDict,
                                              message_type: str, limit: int | None) -> None:
    node = {} if limit is None else {"max-query-bytes": limit}
    reply = reply_of(message(content, message_type), context(site, **node))
    assert_no_leak(reply, patient_ids(site))


# --------------------------------------------------------------------------- fuzz: folders

IDS = st.from_regex(r"\AP[0-9]{7}\Z")
CELLS = {
    "her2_ihc": st.sampled_from(["0", "1", "2", "3", "7", "-1", "", "abc", "2.0", "3+"]),
    "her2_ish": st.sampled_from(["positive", "negative", "", "maybe", "POSITIVE"]),
    "label": st.sampled_from(["0", "1", "", "2", "yes"]),
    "dfs_time": st.one_of(st.floats(-10, 5000).map(str), st.sampled_from(["", "x", "-1"])),
    "dfs_event": st.sampled_from(["0", "1", "", "2"]),
    "age": st.one_of(st.floats(0, 100).map(lambda v: f"{v:.1f}"), st.sampled_from(["", "NA"])),
    "ki67": st.one_of(st.integers(0, 100).map(str), st.just("")),
    "hr_status": st.sampled_from(["positive", "negative", ""]),
    "lesion_type": st.sampled_from(["mass", "non-mass", ""]),
}


@st.composite
def site_folders(draw) -> tuple[dict, list[str], list[dict], list[str]]:
    """(site.yaml content, columns, rows, patient ids) of a random site folder: mostly a
    valid site.yaml and the task columns (so the handlers run), sometimes a broken one."""
    privacy = {"min_patients": draw(st.sampled_from([1, 3, 10])),
               "min_cell_count": draw(st.sampled_from([1, 3, 5])),
               "time_bin": draw(st.sampled_from([0, 30])),
               "max_feature_ratio": draw(st.sampled_from([0.33, 1.0])),
               "allow_event_queries": draw(st.booleans())}
    config = {"site_id": "site-z", "roles": ["train"], "time_unit": "days", "privacy": privacy}
    if draw(st.integers(0, 4)) == 4:  # one broken field
        key, value = draw(st.sampled_from([
            ("site_id", ""), ("site_id", "Site Z"), ("roles", "train"), ("roles", ["bogus"]),
            ("time_unit", "fortnights"), ("privacy", {"min_patients": -1}),
            ("privacy", {"min_cell_count": "y"}), ("privacy", {"surprise": 1}),
            ("extra", 1)]))
        config[key] = value
    wanted = ["her2_ihc", "her2_ish", "label"]
    columns = ["patient_id", *[c for c in wanted if draw(st.integers(0, 9)) < 9],
               *draw(st.lists(st.sampled_from(sorted(set(CELLS) - set(wanted))), unique=True,
                              max_size=len(CELLS)))]
    if draw(st.integers(0, 19)) == 19:
        columns.remove("patient_id")
    ids = draw(st.lists(IDS, min_size=0, max_size=30))
    rows = []
    for patient in ids:
        row = {c: draw(CELLS[c]) for c in columns if c != "patient_id"}
        row["patient_id"] = patient
        if "hr_status" in row and draw(st.integers(0, 7)) == 0:
            row["hr_status"] = draw(st.sampled_from(ids))  # an id where text is expected
        rows.append(row)
    if ids and draw(st.booleans()):
        rows.append(dict(rows[0]))  # a duplicate id
    return config, columns, rows, ids


@FUZZ
@given(folder=site_folders(), covariates=st.lists(st.sampled_from(
    ["age", "ki67", "hr_status", "lesion_type", "label", "patient_id", "nope"]), max_size=4),
       task=st.sampled_from(["her2-positive", "her2-low", "label"]))
def test_fuzz_random_site_folders(folder: tuple, covariates: list[str], task: str) -> None:
    config, columns, rows, ids = folder
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "site-z"
        root.mkdir()
        (root / "site.yaml").write_text(yaml.safe_dump(config))
        with (root / "clinical.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        clear_sessions()
        means = {f"means.{c}": np.array([50.0, 40.0]) for c in covariates}
        for action, query in [
            (schema.HANDSHAKE, {"task": task}),
            (schema.COHORT_SUMS, {"task": task, "covariates": covariates}),
            (schema.COHORT_SQUARES, {"task": task, "covariates": covariates, **means}),
        ]:
            reply = serve(root, action, query, "fuzz")
            assert reply["status"] in STATUSES, reply
            to_records(reply)
            assert_no_leak(reply, ids)
        for line in (root / "audit" / "egress.jsonl").read_text().splitlines():
            assert_no_leak(json.loads(line), ids)  # the audit log's keys name no patient
