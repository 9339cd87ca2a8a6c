"""Every query a site answers is declared once (shared/queries), and the site holds the
coordinator to it: an undeclared key, a value of another type or one outside its bound is
refused whole, audited, before anything is computed — whatever the action, key or value."""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from client.handlers import serve
from shared import disclosure, queries, schema
from tests.test_policy_refusals import IDS, QUERY, audit, make_site

ACTIONS = sorted(queries.QUERIES)
KEY_TEXT = st.text(string.ascii_letters + string.digits + "._-:", min_size=1, max_size=30)
# What a hostile coordinator puts in a value: every type the wire carries
VALUES = st.one_of(
    st.integers(-2**62, 2**62), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=50), st.lists(st.integers(-10, 10), max_size=5),
    st.lists(st.text(max_size=8), max_size=5),
    st.builds(lambda n: np.full(n, 1e300), st.integers(0, 5)))
FIXTURE = [HealthCheck.function_scoped_fixture]  # one site for every example: read-only
PATIENT_FIELDS = ("numeric", "categorical", "labels", "counts", "moments", "hist")


def test_every_action_is_declared_and_every_parameter_says_what_it_is() -> None:
    answered = {a for a in (*schema.query_actions(), *schema.TRAIN_ACTIONS) if a != schema.BATCH}
    assert set(queries.QUERIES) == answered
    for declaration in queries.QUERIES.values():
        keys = [p.key for p in declaration.params]
        assert len(keys) == len(set(keys)), declaration.action
        assert all(p.meaning.strip() for p in declaration.params), declaration.action


def _leaks_nothing(reply: dict) -> bool:
    """A whole refusal: a status, a reason, on a handshake the site's name — no statistic."""
    return set(reply) - {"site.site_id"} <= {"status", "reason"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    return make_site(tmp_path_factory.mktemp("declared"))


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE)
@given(action=st.sampled_from(ACTIONS), key=KEY_TEXT, value=VALUES)
def test_an_undeclared_key_refuses_the_whole_query(site, action: str, key: str,
                                                   value: object) -> None:
    assume(queries.QUERIES[action].param(key) is None)  # declared: the next test's subject
    reply = serve(site, action, {"task": "label", key: value}, "hyp")
    assert reply["status"] == "refused", reply
    assert _leaks_nothing(reply) and "unknown query key" in reply["reason"]
    assert audit(site)[-1]["status"] == "refused"


@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURE)
@given(data=st.data(), action=st.sampled_from(ACTIONS), value=VALUES)
def test_any_value_of_a_declared_key_never_crashes_the_site(site, data, action: str,
                                                            value: object) -> None:
    """Every reply has a status; a value outside its declaration is refused whole; the
    reason never carries a traceback or a patient id."""
    declaration = queries.QUERIES[action]
    param = data.draw(st.sampled_from(declaration.params))
    key = param.key.replace("*", data.draw(st.sampled_from(["age", "f0", "m0.r0", "x"])))
    query = {"task": "label", "covariates": ["age"], key: value}
    try:
        declaration.check(query)
        valid = True
    except queries.QueryRejected:
        valid = False
    reply = serve(site, action, query, "hyp")
    assert reply["status"] in (schema.STATUS_OK, schema.STATUS_REFUSED, schema.STATUS_FAILED)
    if not valid:
        assert reply["status"] == "refused" and _leaks_nothing(reply)
    text = " ".join(str(v) for v in reply.values())
    assert "Traceback" not in text and not any(i in text for i in IDS)


def test_a_key_no_statistic_depends_on_cannot_make_a_new_family(tmp_path) -> None:
    """The ledger bypass of a fresh family: the same sum asked again with a key that changes
    nothing (an earlier run's files) is the same family; an undeclared nonce is refused."""
    family = disclosure.query_family("cohort", {**QUERY})
    assert disclosure.query_family("cohort", {**QUERY, "runs": ["x"], "needs": "mri"}) == family
    assert disclosure.query_family("cohort", {**QUERY, "covariates": ["age"]}) != family
    folder = make_site(tmp_path)
    reply = serve(folder, schema.COHORT_SUMS, {**QUERY, "nonce": 1}, "r1")
    assert reply["status"] == "refused" and not any(
        k.startswith(PATIENT_FIELDS) for k in reply)
