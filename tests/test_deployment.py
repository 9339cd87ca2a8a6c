"""A real deployment on loopback: SuperLink and three SuperNodes as separate processes, TLS
from our own CA, SuperNode authentication, no runtime dependency installation — started with
exactly the `deploy/…` lines of the README section "Deploying across hospitals", in order.

One deployment serves every assertion (see the report for its run time on 2 cores):
- each hospital approves the checkout's app (README step 4; a SuperNode serves nothing else);
- a SuperNode whose key is not registered, one without a key and one without TLS are refused;
- run A (the README's run command: cohort + survival): site-3's SuperNode is shut down in
  the middle of cohort round 2; the site is `dropped`, the cohort tables are recomputed on
  the survivors (exact against scipy) and the survival stage runs on them;
- the SuperLink is stopped and started again (README), the SuperNodes reconnect by
  themselves, and the README's `resume=true` run takes run A's stages from the checkpoint
  without sending one of their queries again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from scipy import stats

from simulation.cohort import simulate_cohort
from simulation.launcher import APP_DIR, free_port
from tests.processes import processes

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2", "site-3")
NUMERIC = ("age", "tumour_size_mm", "ki67")
# tests/site_hooks/sitecustomize.py: test hooks in a SuperNode's own processes, not in the app
SITE_HOOKS = APP_DIR / "tests" / "site_hooks"
HELD = "site hook: holding the reply to cohort_squares for 120 s"
SCRIPTS = ["ca.sh", "superlink.sh", "node-key.sh", "register.sh", "approve.sh", "supernode.sh",
           "run.sh", "superlink.sh", "run.sh"]


def readme_commands() -> list[str]:
    """Every `deploy/…` line in the README section "Deploying across hospitals", in order,
    without its trailing comment."""
    text = (APP_DIR / "README.md").read_text(encoding="utf-8")
    section = text.split("## Deploying across hospitals", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("deploy/"):
                commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


class Processes:
    """Every process the test starts, each in its own session, all stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: str, env: dict[str, str],
              **kw: object) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(["bash", "-c", command], cwd=APP_DIR, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        proc = self.started.pop(name)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)

    def stop_all(self) -> None:
        for name in list(self.started):
            self.stop(name)


def ours(marker: str) -> list[tuple[int, str]]:
    """Processes whose command line names this test's folder or port (all started by us)."""
    return processes(marker)


def wait_healthy(port: int, ca: Path, timeout: float = 60) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2,
                                        context=context) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"SuperLink on port {port} did not become healthy")


def online_nodes(env: dict[str, str]) -> int:
    done = subprocess.run(["flwr", "supernode", "list", "feddlr", "--format", "json"],
                          cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=60)
    if "{" not in done.stdout:
        return 0
    nodes = json.loads(done.stdout[done.stdout.index("{"):])["nodes"]
    return sum(n["status"] == "online" for n in nodes)


def wait_online(env: dict[str, str], count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while online_nodes(env) < count:
        assert time.monotonic() < deadline, f"fewer than {count} SuperNodes online"
        time.sleep(0.5)


def run_study(command: str, env: dict[str, str], log: Path,
              seen: dict[str, float] | None = None) -> tuple[int, str]:
    """Run a `deploy/run.sh …` line to the end, streaming its log; `seen` maps texts to the
    monotonic time of the first line holding them (filled in)."""
    lines = []
    with subprocess.Popen(["bash", "-c", command], cwd=APP_DIR, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            for text in seen or {}:
                if text in line and not seen[text]:
                    seen[text] = time.monotonic()
        rc = proc.wait(timeout=300)
    log.write_text("".join(lines))
    return rc, "".join(lines)


def kill_when_held(procs: Processes, info: dict, done: threading.Event) -> threading.Thread:
    """SIGKILL site-3 (no sign-off: only its heartbeats stop) once its ClientApp holds the
    reply to cohort round 2 (the hook's line in its log), until `done` is set."""
    def watch() -> None:
        while not done.wait(0.05):
            if HELD in procs.log("site-3"):
                info["killed_at"] = time.monotonic()
                procs.stop("site-3", sig=signal.SIGKILL)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("deploy")
    commands = readme_commands()
    assert [c.split()[0] for c in commands] == [f"deploy/{s}" for s in SCRIPTS], commands
    ca_sh, superlink_sh, node_key_sh, register_sh, approve_sh, supernode_sh, run_a, \
        restart_sh, resume = commands
    simulate_cohort(root / "sites", n_sites=3, n_patients=60, seed=21, images=False)
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FEDDLR_", "FLWR_"))}
    base.update(PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
                FEDDLR_SUPERLINK=f"127.0.0.1:{port}", FEDDLR_LISTEN="127.0.0.1")
    coordinator = dict(base, FEDDLR_DEPLOY=str(root / "coordinator"),
                       FEDDLR_OUT=str(root / "out-a"),
                       FLWR_HOME=str(root / "coordinator" / "flwr-home"))
    hospitals = {}
    for site in [*SITES, "rogue"]:
        folder = root / "sites" / (site if site != "rogue" else "site-1")
        hospitals[site] = dict(base, FEDDLR_DEPLOY=str(root / site), FEDDLR_SITE=str(folder),
                               FEDDLR_NODE_NAME=site, FEDDLR_NODE_PORT=str(free_port()))
    procs = Processes(root)
    info: dict = {"root": root, "port": port, "procs": procs}
    try:
        # 1. coordinator: CA + SuperLink certificate, SuperLink
        subprocess.run(["bash", "-c", ca_sh], cwd=APP_DIR, env=coordinator, check=True,
                       capture_output=True)
        ca = root / "coordinator" / "tls" / "ca.crt"
        procs.start("superlink", superlink_sh, coordinator)
        # 2. hospitals: key pairs; public keys to the coordinator, ca.crt to the hospitals
        (root / "coordinator" / "supernodes").mkdir(parents=True)
        for site, env in hospitals.items():
            subprocess.run(["bash", "-c", node_key_sh], cwd=APP_DIR, env=env, check=True,
                           capture_output=True)
            (root / site / "tls").mkdir(parents=True)
            shutil.copy(ca, root / site / "tls" / "ca.crt")
            if site != "rogue":
                shutil.copy(root / site / "keys" / f"{site}.pub",
                            root / "coordinator" / "supernodes")
        wait_healthy(port, ca)
        # 3. coordinator: register the three hospitals' keys (not the rogue's)
        done = subprocess.run(["bash", "-c", register_sh], cwd=APP_DIR, env=coordinator,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        info["registered"] = done.stdout

        def approve() -> None:  # each hospital records the checkout's FAB (README step 4)
            for site in SITES:
                done = subprocess.run(["bash", "-c", approve_sh], cwd=APP_DIR,
                                      env=hospitals[site], capture_output=True, text=True,
                                      timeout=120)
                assert done.returncode == 0, done.stdout + done.stderr
                info.setdefault("approved", []).append(done.stdout.split()[0])
        # 4. hospitals: SuperNodes (site-3's processes with the test hook that holds its
        # reply in cohort round 2: tests/site_hooks); plus three that must be refused
        for site in SITES:
            hook = {}
            if site == "site-3":
                hook = {"FEDDLR_TEST_DELAY": "cohort_squares=120", "PYTHONPATH": os.pathsep.join(
                    p for p in (str(SITE_HOOKS), base.get("PYTHONPATH")) if p)}
            if site == "site-1":  # a hospital's own node config beside site-dir
                hook = {"FEDDLR_NODE_CONFIG": "max-query-bytes=1048576"}
            procs.start(site, supernode_sh, dict(hospitals[site], **hook))
        procs.start("rogue", supernode_sh, hospitals["rogue"])
        site_dir = root / "sites" / "site-1"
        procs.start("keyless", f"flower-supernode --superlink 127.0.0.1:{port} "
                    f"--root-certificates {ca} --node-config 'site-dir=\"{site_dir}\"' "
                    f"--port {free_port()} --max-retries 2", hospitals["rogue"])
        procs.start("insecure", f"flower-supernode --insecure --superlink 127.0.0.1:{port} "
                    f"--node-config 'site-dir=\"{site_dir}\"' --port {free_port()} "
                    "--max-retries 2", hospitals["rogue"])
        for name in ("rogue", "keyless", "insecure"):
            info[f"{name}_rc"] = procs.started[name].wait(timeout=60)
            info[f"{name}_log"] = procs.log(name)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            info["plain_http"] = "answered"
        except OSError as err:
            info["plain_http"] = f"refused: {type(err).__name__}"

        # 5. run A, the README's study run (round-timeout 600 s); site-3 is killed with
        # SIGKILL while its ClientApp holds its reply in round 2
        wait_online(coordinator, 3)
        # README step 4, done just before the run: the approval list is read at each run's
        # first message, and the checkout may change under a test (another edit, another hash)
        approve()
        started = time.monotonic()
        done = threading.Event()
        watcher = kill_when_held(procs, info, done)
        info["seen"] = {"site-3 dropped during cohort_squares": 0.0}
        info["a_rc"], info["a_log"] = run_study(run_a, coordinator, root / "run-a.log",
                                                seen=info["seen"])
        done.set()
        watcher.join()
        info["a_seconds"] = time.monotonic() - started
        info["site-3_log"] = procs.log("site-3")
        shutil.copy(root / "out-a" / "results.json", root / "results-a.json")

        # coordinator restart (README), site-3 back without the hook, resume into out-a
        started = time.monotonic()
        procs.stop("superlink")
        procs.start("superlink", restart_sh, coordinator)
        wait_healthy(port, ca)
        procs.start("site-3", supernode_sh, hospitals["site-3"])
        wait_online(coordinator, 3)
        approve()  # the same checkout: the same sha256, already on each list
        info["c_rc"], info["c_log"] = run_study(resume, coordinator, root / "run-c.log")
        info["c_seconds"] = time.monotonic() - started
    finally:
        procs.stop_all()
        marker = str(root)
        deadline = time.monotonic() + 20
        while ours(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid, _ in ours(marker):  # children of ours that outlived their parents
            os.kill(pid, signal.SIGKILL)
        info["left"] = ours(marker) + ours(f"127.0.0.1:{port}")
    return info


def results(info: dict, run: str) -> dict:
    """Run A's results (saved before run C resumed into the same out-dir) or C's."""
    path = {"a": "results-a.json", "c": "out-a/results.json"}[run]
    return json.loads((info["root"] / path).read_text())


def labelled_rows(root: Path, site: str) -> pd.DataFrame:
    rows = pd.read_csv(root / "sites" / site / "clinical.csv", dtype={"her2_ish": str})
    ish = rows.her2_ish.fillna("").str.lower()
    valid = rows.her2_ihc.isin([0, 1, 2, 3]) & ~((rows.her2_ihc == 2) & (ish == ""))
    rows["y"] = ((rows.her2_ihc == 3) | ((rows.her2_ihc == 2) & (ish == "positive"))).astype(int)
    return rows[valid].reset_index(drop=True)


def assert_cohort_exact(cohort: dict, root: Path, sites: tuple[str, ...]) -> None:
    """Pooled counts, means, sds and t-tests equal scipy's on the rows of exactly the sites
    that released each covariate (a site with a group below min_patients 10 does not)."""
    rows = {s: labelled_rows(root, s) for s in sites}
    data = pd.concat(rows.values(), ignore_index=True)
    assert cohort["n"]["pooled"] == [int((data.y == 0).sum()), int((data.y == 1).sum())]
    for name in NUMERIC:
        entry = cohort["covariates"][name]
        released = [s for s in sites if rows[s].y.value_counts().reindex([0, 1]).min() >= 10]
        assert sorted(entry["sites_missing"]) == sorted(set(sites) - set(released))
        part = pd.concat([rows[s] for s in released], ignore_index=True)
        g0, g1 = part.loc[part.y == 0, name], part.loc[part.y == 1, name]
        np.testing.assert_allclose(entry["mean"], [g0.mean(), g1.mean()], rtol=1e-12)
        np.testing.assert_allclose(entry["sd"], [g0.std(), g1.std()], rtol=1e-10)
        assert entry["t_test"]["p_value"] == pytest.approx(stats.ttest_ind(g0, g1).pvalue,
                                                           rel=1e-9)


def audit(info: dict, site: str, run_id: str) -> list[str]:
    lines = (info["root"] / "sites" / site / "audit" / "egress.jsonl").read_text().splitlines()
    return [r["message_type"] for r in map(json.loads, lines) if r["run_id"] == run_id]


def test_readme_section_is_what_this_test_runs() -> None:
    commands = readme_commands()
    assert [c.split()[0] for c in commands] == [f"deploy/{s}" for s in SCRIPTS]
    for script in set(SCRIPTS):
        assert os.access(APP_DIR / "deploy" / script, os.X_OK), script


def test_unregistered_keyless_and_plain_http_clients_are_refused(deployment: dict) -> None:
    assert deployment["rogue_rc"] != 0
    assert "Failed to activate SuperNode" in deployment["rogue_log"]
    assert deployment["keyless_rc"] != 0
    assert "Failed to initialize the connection" in deployment["keyless_log"]
    assert deployment["insecure_rc"] != 0
    assert "Failed to initialize the connection" in deployment["insecure_log"]
    assert deployment["plain_http"].startswith("refused")
    assert deployment["registered"].count("registered successfully") == 3


def test_each_hospital_approved_the_app_it_runs(deployment: dict) -> None:
    approved = deployment["approved"]  # each site, before run A and again before run C
    assert len(approved) == 2 * len(SITES) and all(len(d) == 64 for d in approved)
    for site in SITES:  # one line per distinct app (one, unless the checkout changed)
        listed = (deployment["root"] / "sites" / site / "approved_apps.txt").read_text()
        assert [line.split()[0] for line in listed.splitlines()] == list(dict.fromkeys(
            approved[i] for i in range(len(approved)) if i % len(SITES) == SITES.index(site)))


def test_run_a_goes_on_without_the_site_shut_down_mid_round(deployment: dict) -> None:
    assert deployment["a_rc"] == 0, deployment["a_log"][-3000:]
    out = results(deployment, "a")
    rows = {s["site_id"]: s for s in out["run"]["sites"]}
    assert list(rows) == list(SITES)  # all three authenticated and answered the handshake
    assert [rows[s]["status"] for s in ("site-1", "site-2")] == ["ok", "ok"]
    assert rows["site-3"]["status"] == "dropped"
    # the SuperLink answers for the node whose heartbeats stopped (Flower: none for
    # HEARTBEAT_PATIENCE × HEARTBEAT_DEFAULT_INTERVAL), long before round-timeout (600 s)
    assert "Node Unavailable" in rows["site-3"]["reason"]
    # killed while the test hook around Flower's ClientApp (tests/site_hooks), not the
    # app, held its reply to round 2
    assert HELD in deployment["site-3_log"] and "killed_at" in deployment
    dropped_after = deployment["seen"]["site-3 dropped during cohort_squares"] - \
        deployment["killed_at"]
    assert 0 < dropped_after <= HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 10, \
        dropped_after
    cohort = out["cohort"]
    assert cohort["sites_used"] == ["site-1", "site-2"]
    assert cohort["restarts"][0]["sites"] == list(SITES)
    assert list(cohort["restarts"][0]["dropped"]) == ["site-3"]
    assert_cohort_exact(cohort, deployment["root"], ("site-1", "site-2"))
    assert "site-3 dropped during cohort_squares; restarting on 2 site(s)" in deployment["a_log"]
    run_id = out["run"]["run_id"]
    for site in ("site-1", "site-2"):
        sent = audit(deployment, site, run_id)
        assert sent[:4] == ["query.handshake", "query.cohort_sums", "query.cohort_squares",
                            "query.cohort_squares"]  # round 2 again, around the new means
    # site-3 was killed holding its reply: the server never got one (its audit log may
    # hold the entry, written when the guard released the reply, before the kill)
    received = [e["message_type"] for e in out["run"]["wire"]["site-3"]]
    assert received == ["query.handshake", "query.cohort_sums"], received
    assert out["run"]["config"]["stages"] == ["cohort", "survival"]
    assert out["run"]["stages"]["survival"]["status"] == "ok"
    survival = out["survival"]  # on the survivors only: site-3 is out for the rest of run A
    assert list(survival["sites"]) == survival["cox"]["sites_used"] == ["site-1", "site-2"]
    kept = pd.concat([labelled_rows(deployment["root"], s) for s in ("site-1", "site-2")])
    assert (survival["cox"]["n"], survival["cox"]["events"]) == (len(kept),
                                                                 int(kept.dfs_event.sum()))
    assert survival["cox"]["converged"] is True
    superlink_log = (deployment["root"] / "superlink.log").read_text(errors="replace")
    assert "Uvicorn running on https://127.0.0.1" in superlink_log


def test_restarted_coordinator_resumes_from_the_checkpoint(deployment: dict) -> None:
    assert deployment["c_rc"] == 0, deployment["c_log"][-3000:]
    first, again = results(deployment, "a"), results(deployment, "c")
    assert again["run"]["run_id"] != first["run"]["run_id"]
    assert again["run"]["config"]["resume"] is True
    assert [s["status"] for s in again["run"]["sites"]] == ["ok"] * 3  # site-3 is back
    for stage in ("cohort", "survival"):
        assert again["run"]["stages"][stage]["resumed_from"] == first["run"]["run_id"]
        assert again[stage] == first[stage]
    for site in SITES:  # only the handshake went out in the resumed run
        assert audit(deployment, site, again["run"]["run_id"]) == ["query.handshake"]
    assert "[cohort] taken from the checkpoint" in deployment["c_log"]


def test_no_process_is_left(deployment: dict) -> None:
    assert deployment["left"] == [], deployment["left"]
