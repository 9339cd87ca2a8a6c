"""The site's policy holds against the server: queries that ask too much, sent through the
real handlers (`client.handlers.serve`) and through the ClientApp's message edge, are
refused piece by piece with a reason, and each refusal is in the site's audit log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import app
from client.handlers import serve
from client.site.session import clear_sessions
from shared import schema
from simulation.cohort import simulate_cohort
from wire import read_payload, to_records

IDS = [f"pt-{i:05d}" for i in range(13)]


def make_site(root: Path, *, min_patients: int = 10, min_cell_count: int = 3) -> Path:
    """13 patients: 10 with label 0 and 3 with label 1; grade has a cell of 1."""
    folder = root / "site-a"
    folder.mkdir(parents=True)
    (folder / "site.yaml").write_text(yaml.safe_dump({
        "site_id": "site-a", "roles": ["train"], "time_unit": "days",
        "privacy": {"min_patients": min_patients, "min_cell_count": min_cell_count}}))
    pd.DataFrame({
        "patient_id": IDS,
        "label": [0] * 10 + [1] * 3,
        "age": [40 + i for i in range(13)],
        "grade": ["A"] * 5 + ["B"] * 5 + ["A", "A", "B"],
        "site_group": ["x"] * 13,
    }).to_csv(folder / "clinical.csv", index=False)
    clear_sessions()
    return folder


def audit(folder: Path) -> list[dict]:
    lines = (folder / "audit" / "egress.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


QUERY = {"task": "label", "covariates": ["age", "grade", "site_group"]}
# what a server might add to talk the site out of its policy: keys no query declares
LOWERING = {"min_patients": 1, "min_cell_count": 1, "privacy.min_patients": 1,
            "privacy.min_cell_count": 1, "policy": "off"}


def test_a_query_that_tries_to_lower_the_policy_gets_nothing(tmp_path: Path) -> None:
    """Undeclared keys are refused, not ignored: the whole query, audited, before any
    statistic is computed."""
    folder = make_site(tmp_path)
    for action, query in ((schema.COHORT_SUMS, {**QUERY, **LOWERING}),
                          (schema.HANDSHAKE, {"task": "label", **LOWERING})):
        reply = serve(folder, action, query, "r0")
        assert reply["status"] == "refused"
        assert set(reply) - {"site.site_id"} == {"status", "reason"}
        assert "unknown query key(s) 'min_cell_count'" in reply["reason"]
        record = audit(folder)[-1]
        assert record["status"] == "refused" and not any(k.startswith(("numeric", "counts"))
                                                         for k in record["keys"])


def test_statistic_over_3_patients_is_refused_and_logged(tmp_path: Path) -> None:
    folder = make_site(tmp_path)
    reply = serve(folder, schema.COHORT_SUMS, QUERY, "r1")
    assert reply["status"] == "ok"
    assert reply["numeric.age.g0.n"] == 10 and reply["numeric.age.g0.sum"] == sum(range(40, 50))
    assert "numeric.age.g1.sum" not in reply and "numeric.age.g1.n" not in reply
    reason = reply["refused.numeric.age.g1"]
    assert reason == "computed over fewer than min_patients (10) patients"
    record = audit(folder)[-1]
    assert record["message_type"] == "query.cohort_sums" and record["run_id"] == "r1"
    assert record["refused"]["numeric.age.g1"] == reason
    assert not any(k.startswith("numeric.age.g1.") for k in record["keys"])

    squares = serve(folder, schema.COHORT_SQUARES,
                    {**QUERY, "means.age": np.array([45.0, 50.0])}, "r1")
    assert "squares.age.g0.ss" in squares and "squares.age.g1.ss" not in squares
    assert squares["refused.squares.age.g1"] == reason
    assert audit(folder)[-1]["refused"] == {"squares.age.g1": reason}


def test_histogram_with_a_cell_of_1_is_refused_and_logged(tmp_path: Path) -> None:
    folder = make_site(tmp_path)
    reply = serve(folder, schema.COHORT_SUMS, QUERY, "r2")
    # grade × label = [[5, 2], [5, 1]]: cells of 2 and 1 are below min_cell_count 3
    assert "categorical.grade.table" not in reply
    reason = reply["refused.categorical.grade"]
    assert reason == "count table 'table' has a non-zero cell below min_cell_count (3)"
    # a table whose only non-zero cells are large enough is released (zeros are fine)
    assert reply["categorical.site_group.table"].tolist() == [[10, 3]]
    assert audit(folder)[-1]["refused"]["categorical.grade"] == reason
    # label counts: the 3 positives are exactly min_cell_count, so they are released
    assert reply["labels.n"].tolist() == [10, 3]


def test_small_handshake_counts_are_suppressed(tmp_path: Path) -> None:
    folder = make_site(tmp_path, min_cell_count=5)
    reply = serve(folder, schema.HANDSHAKE, {"task": "label"}, "r3")
    assert reply["counts.label_counts"].tolist() == [10, -1]  # 3 < 5: suppressed
    assert reply["counts.n_patients"].tolist() == [13]
    labels = serve(folder, schema.COHORT_SUMS, {"task": "label", "covariates": []}, "r3")
    assert "labels.n" not in labels and "min_cell_count (5)" in labels["refused.labels"]


def test_the_edge_applies_the_same_policy_to_a_real_message(tmp_path: Path) -> None:
    folder = make_site(tmp_path)
    context = Context(run_id=5, node_id=2, node_config={"site-dir": str(folder)},
                      state=RecordDict(), run_config={})
    metadata = Metadata(run_id=5, message_id="m1", src_node_id=0, dst_node_id=2,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=60,
                        message_type=f"query.{schema.COHORT_SUMS}")
    message = Message(to_records(QUERY), metadata=metadata)
    reply = read_payload(app(message, context).content)
    assert reply["status"] == "ok"
    assert set(k for k in reply if k.startswith("refused.")) == {
        "refused.numeric.age.g1", "refused.categorical.grade"}
    record = audit(folder)[-1]
    assert record["run_id"] == "5" and set(record["refused"]) == {"numeric.age.g1",
                                                                  "categorical.grade"}
    assert not any(i in json.dumps(reply, default=str) for i in IDS)


def test_a_query_the_policy_refuses_entirely_says_so(tmp_path: Path) -> None:
    folder = make_site(tmp_path, min_patients=100)
    reply = serve(folder, schema.COHORT_SUMS, QUERY, "r4")
    assert reply["status"] == "ok"
    assert not any(k.startswith("numeric.") for k in reply)
    refused = {k for k in reply if k.startswith("refused.numeric.")}
    assert refused == {"refused.numeric.age.g0", "refused.numeric.age.g1"}
    assert all("min_patients (100)" in reply[k] for k in refused)
    assert ConfigRecord(  # the reply is still a valid wire payload
        {k: v for k, v in reply.items() if not isinstance(v, np.ndarray)})


def feature_site(root: Path, n: int = 30, p: int = 12, ratio: float = 0.33) -> Path:
    """A site with features.csv: n patients, p features, max_feature_ratio `ratio`."""
    folder = root / "site-f"
    folder.mkdir(parents=True)
    (folder / "site.yaml").write_text(yaml.safe_dump({
        "site_id": "site-f", "roles": ["train"], "time_unit": "days",
        "privacy": {"min_patients": 10, "min_cell_count": 3, "max_feature_ratio": ratio}}))
    rng = np.random.default_rng(1)
    ids = [f"fx-{i:04d}" for i in range(n)]
    pd.DataFrame({"patient_id": ids, "label": [0, 1] * (n // 2)}).to_csv(
        folder / "clinical.csv", index=False)
    features = pd.DataFrame(rng.normal(size=(n, p)), columns=[f"original_f{j}" for j in range(p)])
    features.insert(0, "patient_id", ids)
    features.to_csv(folder / "features.csv", index=False)
    clear_sessions()
    return folder


def test_p_by_p_matrix_above_max_feature_ratio_is_refused_and_logged(tmp_path: Path) -> None:
    folder = feature_site(tmp_path)  # 12 features > 0.33 × 30 patients
    context = {"task": "label", "radiomics-params": "", "workers": 1}
    names = serve(folder, schema.RADIOMICS_EXTRACT, context, "rx")["features.names"]
    assert len(names) == 12
    setup = serve(folder, schema.RADIOMICS_COLUMNS,
                  {**context, "names": names, "cv-folds": 3, "seed": 0}, "rx")
    assert setup["status"] == "ok"
    step = {**context, "solvers": ["fit"], "q.fit.step": "glm.terms", "q.fit.loss": "logistic",
            "q.fit.points": np.zeros((1, 13)), "q.fit.rows": "train"}
    reply = serve(folder, schema.RADIOMICS_STEP, {**step, "q.fit.hessian": True}, "rx")
    assert reply["status"] == "ok" and "fit.hessian" not in reply
    assert reply["refused.fit"] == ("p×p matrix refused: 12 features > 0.33 × 30 patients "
                                    "(max_feature_ratio)")
    assert audit(folder)[-1]["refused"] == {"fit": reply["refused.fit"]}
    raising = {"max_feature_ratio": 10.0, "q.fit.max_feature_ratio": 10.0}
    reply = serve(folder, schema.RADIOMICS_STEP, {**step, **raising, "q.fit.hessian": True},
                  "rx")
    assert reply["status"] == "refused" and not any(k.startswith("fit.") for k in reply)
    gradient = serve(folder, schema.RADIOMICS_STEP, {**step, "q.fit.hessian": False}, "rx")
    assert gradient["fit.gradient"].shape == (1, 13)  # the gradient-only round is answered
    assert not any(k.startswith("refused.") for k in gradient)


@pytest.mark.parametrize("ask", [{"time_bin": 0.0}, {"exact_times": True}, {"time_bin": 7.0}],
                         ids=["time-bin-0", "exact-times", "finer-bin"])
def test_raw_survival_times_are_refused_when_the_site_bins_them(tmp_path: Path,
                                                               ask: dict) -> None:
    simulate_cohort(tmp_path / "sites", n_sites=1, n_patients=40, seed=2, images=False)
    folder = tmp_path / "sites" / "site-1"  # its policy: time_bin 30
    clear_sessions()
    query = {"task": "her2-positive", "needs": "survival", "covariates": ["age"]}
    granted = serve(folder, schema.SURVIVAL_SETUP, {**query, "time_bin": 30.0}, "rt")
    assert granted["status"] == "ok"
    reply = serve(folder, schema.SURVIVAL_SETUP, {**query, **ask}, "rt")
    assert reply["status"] == "refused"
    assert "this site's policy releases survival times only rounded up to time_bin 30" \
        in reply["reason"]
    assert set(reply) == {"status", "reason"}  # nothing else leaves
    record = audit(folder)[-1]
    assert record["status"] == "refused" and record["message_type"] == "query.survival_setup"
