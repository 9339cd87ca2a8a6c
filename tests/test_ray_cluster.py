"""`feddlr run --ray-address`: the simulated sites run on an existing Ray cluster through
Flower's Ray backend, with the same results as a local run (issue 13).

A real Ray head is started on loopback (`ray start --head --block`, in its own session and
temp dir) and stopped by its own process group; the test checks that the study's driver
joined that cluster (a new driver log in the head's session) and that a wrong address
fails with an error naming it. Long-ish: a Ray head and two Simulation Engine runs (~1.5
min on 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulation.cohort import simulate_cohort
from simulation.launcher import free_port

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict]:
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    log = (temp / "head.log").open("wb")
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
         str(port), "--num-cpus", "2", "--include-dashboard=false", "--temp-dir", str(temp),
         "--block"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(temp.glob("session_*/logs/gcs_server.out")):
            assert process.poll() is None, (temp / "head.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "Ray head did not start in 120 s"
            time.sleep(1)
        time.sleep(3)
        yield {"address": f"127.0.0.1:{port}", "temp": temp}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def feddlr_run(sites: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "feddlr"), "run", "--sites-dir", str(sites), "--out",
                           str(out), "-c", "stages=cohort", *extra],
                          capture_output=True, text=True, timeout=240)


def drivers(temp: Path) -> set[Path]:
    return set(temp.glob("session_*/logs/python-core-driver-*.log"))


def test_a_study_runs_on_a_ray_cluster_as_it_does_locally(ray_head: dict,
                                                          tmp_path: Path) -> None:
    simulate_cohort(tmp_path / "sites", n_sites=3, n_patients=30, seed=6, images=False)
    before = drivers(ray_head["temp"])
    on_ray = feddlr_run(tmp_path / "sites", tmp_path / "ray", "--ray-address",
                        ray_head["address"])
    assert on_ray.returncode == 0, on_ray.stdout[-3000:] + on_ray.stderr[-2000:]
    drivers_after = drivers(ray_head["temp"])
    assert drivers_after - before, "the study's driver did not join the cluster"
    local = feddlr_run(tmp_path / "sites", tmp_path / "local")  # a head is up: stays local
    assert local.returncode == 0, local.stdout[-3000:]
    assert not drivers(ray_head["temp"]) - before - drivers_after, "the local run joined"
    read = [json.loads((tmp_path / d / "results.json").read_text(encoding="utf-8"))
            for d in ("ray", "local")]
    assert read[0]["cohort"] == read[1]["cohort"]
    assert read[0]["run"]["status"] == "ok"


def test_a_wrong_ray_address_fails_naming_it(tmp_path: Path) -> None:
    simulate_cohort(tmp_path / "sites", n_sites=2, n_patients=20, seed=6, images=False)
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    done = feddlr_run(tmp_path / "sites", tmp_path / "o", "--ray-address", address)
    assert done.returncode == 1
    assert f"no Ray cluster answers at {address}" in done.stderr
    assert "Traceback" not in done.stderr
