"""Test and bench hooks live outside the production ClientApp (issue 27, point 5): the app
reads no FEDDLR_TEST_DELAY / FEDDLR_TIMING; tests/site_hooks/sitecustomize.py, loaded by
the processes of a SuperNode whose PYTHONPATH starts with its folder, holds and times the
replies of the unchanged app around Flower's ClientApp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

from simulation.cohort import simulate_cohort
from wire import read_payload, to_records

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "tests" / "site_hooks"

ANSWER = """
import json, os, sys, time
from flwr.app import Context, Message, Metadata, RecordDict

def ask(message_type):
    from client.app import app
    from wire import read_payload, to_records

    metadata = Metadata(run_id=9, message_id="m", src_node_id=0, dst_node_id=2,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=60,
                        message_type=message_type)
    context = Context(run_id=9, node_id=2, node_config={"site-dir": sys.argv[1]},
                      state=RecordDict(), run_config={})
    started = time.monotonic()
    reply = app(Message(to_records({"task": "her2-positive"}), metadata=metadata), context)
    return read_payload(reply.content)["status"], time.monotonic() - started

pid = os.fork()  # the warm SuperNode forks each ClientApp: the child's start is its fork
if pid == 0:
    print(json.dumps([ask("query.handshake"), ask("query.cohort_sums")]), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hooks")
    simulate_cohort(root / "sites", n_sites=1, n_patients=40, seed=4, images=False)
    return root / "sites" / "site-1"


def answer_in_a_process(site: Path, **env: str) -> list[tuple[str, float]]:
    """The production app (client/app.py) answering a handshake and a cohort_sums query in
    a forked child of a fresh Python that starts with the hooks' folder on its path, as a
    SuperNode's ClientApp does in the deployment test, with `env` in its environment."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FEDDLR_")}
    environment.update(env, PYTHONPATH=os.pathsep.join([str(HOOKS), str(ROOT)]))
    done = subprocess.run([sys.executable, "-c", ANSWER, str(site)], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [tuple(r) for r in json.loads(done.stdout.splitlines()[-1])]


def test_the_production_app_reads_no_test_hook(site: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from client.app import app

    monkeypatch.setenv("FEDDLR_TEST_DELAY", "handshake=1.5")
    monkeypatch.setenv("FEDDLR_TIMING", str(site.parent / "timing.jsonl"))
    metadata = Metadata(run_id=9, message_id="m", src_node_id=0, dst_node_id=2,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=60,
                        message_type="query.handshake")
    context = Context(run_id=9, node_id=2, node_config={"site-dir": str(site)},
                      state=RecordDict(), run_config={})
    started = time.monotonic()
    reply = app(Message(to_records({"task": "her2-positive"}), metadata=metadata), context)
    assert read_payload(reply.content)["status"] == "ok"
    assert time.monotonic() - started < 1.0  # not held
    assert not (site.parent / "timing.jsonl").exists()
    assert ClientApp.__call__.__qualname__ == "ClientApp.__call__"  # Flower's, unwrapped


def test_the_hook_holds_and_times_the_unchanged_app(site: Path, tmp_path: Path) -> None:
    timing = tmp_path / "timing.jsonl"
    before = time.time()
    (hello, held), (sums, quick) = answer_in_a_process(
        site, FEDDLR_TEST_DELAY="handshake=1.5,cohort_sums=oops",
        FEDDLR_TIMING=str(timing))
    assert (hello, sums) == ("ok", "ok")  # a malformed item breaks no reply
    assert held >= 1.5 and quick < 1.0
    lines = [json.loads(line) for line in timing.read_text().splitlines()]
    assert [line["action"] for line in lines] == ["handshake", "cohort_sums"]
    for line in lines:
        assert before < line["process"] <= line["imported"] <= line["entered"] \
            <= line["replied"] < time.time()
        assert line["cpu"] > 0
    assert lines[0]["replied"] - lines[0]["entered"] >= 1.5
    assert len({line["pid"] for line in lines}) == 1

