"""Run site folders in Flower's Simulation Engine through `flwr run`, owning the lifecycle.

A private `flower-superlink --simulation` is started on free loopback ports with its own
FLWR_HOME (so nothing is left on the fixed `:local:` ports), `flwr run --stream` submits
this app with one simulated SuperNode per site folder, the streamed log is printed and saved
to OUT/run.log, and the SuperLink is stopped at the end, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
SUPERLINK_START_TIMEOUT = 60.0


class LaunchError(RuntimeError):
    """The Simulation Engine could not be started or the run did not finish."""


def site_folders(sites_dir: Path) -> list[Path]:
    if not sites_dir.is_dir():
        raise LaunchError(f"sites dir {sites_dir} does not exist")
    folders = sorted(p for p in sites_dir.iterdir() if (p / "site.yaml").is_file())
    if not folders:
        raise LaunchError(f"no site folders (with site.yaml) under {sites_dir}")
    return folders


def run_simulation(sites_dir: Path, out: Path, overrides: Mapping[str, str] | None = None,
                   *, num_cpus_per_site: float = 1, num_gpus_per_site: float = 0.0,
                   ray_address: str | None = None, echo: bool = True) -> int:
    """Run the study on every site folder under `sites_dir`; results land in `out`.
    Each simulated site gets `num_cpus_per_site` cores and `num_gpus_per_site` GPUs (Flower
    client resources; a fraction shares one GPU between sites). With `ray_address`
    (HOST:PORT of a running Ray head) Flower's Ray backend runs the sites on that cluster."""
    sites_dir, out = sites_dir.resolve(), out.resolve()
    folders = site_folders(sites_dir)
    if ray_address is not None:
        check_ray_address(ray_address)
    out.mkdir(parents=True, exist_ok=True)
    if not (APP_DIR / "pyproject.toml").is_file():
        raise LaunchError(f"the FedDLR app source (pyproject.toml) is not at {APP_DIR}")
    run_config = {"sites-dir": str(sites_dir), "out-dir": str(out), **(overrides or {})}
    home = Path(tempfile.mkdtemp(prefix="feddlr-flwr-"))
    port = free_port()
    env = flower_env(home)
    # Flower 1.42's simulation config has no Ray address; its backend calls ray.init(),
    # which joins the cluster RAY_ADDRESS names (the SuperLink passes its env on). Without
    # it, ray.init() would join the last `ray start` cluster of this machine, so a local
    # run says "local": a Ray instance of its own.
    env["RAY_ADDRESS"] = ray_address or "local"
    write_connection(home, port)
    superlink = start_superlink(port, env, out / "superlink.log")
    try:
        wait_healthy(port, superlink, out / "superlink.log")
        command = [_bin("flwr"), "run", str(APP_DIR), "feddlr", "--stream",
                   "--federation-config", f"num-supernodes={len(folders)}",
                   "--federation-config", f"client-resources-num-cpus={num_cpus_per_site}",
                   "--federation-config", f"client-resources-num-gpus={num_gpus_per_site}"]
        for key, value in run_config.items():
            command += ["--run-config", f"{key}={toml_value(value)}"]
        rc = stream(command, env, out / "run.log", echo)
    finally:
        stop(superlink)
        shutil.rmtree(home, ignore_errors=True)
    if not (out / "results.json").is_file():
        where = f" on the Ray cluster at {ray_address}" if ray_address else ""
        raise LaunchError(f"the run ended without results.json{where} (exit {rc}); see "
                          f"{out/'run.log'}")
    return rc


def check_ray_address(address: str) -> None:
    """A Ray head answers at HOST:PORT (its GCS port), or a LaunchError naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LaunchError(f"--ray-address {address!r}: expected HOST:PORT of a Ray head")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise LaunchError(f"no Ray cluster answers at {address} ({err.strerror or err}); "
                          "start one with `ray start --head --port PORT`") from None


def check_run_config(overrides: Mapping[str, str]) -> None:
    """Stop a run with a bad key or value before any site is contacted (ConfigError): an
    unknown key names the nearest known one; every value goes through shared/settings.py
    and the stages' own cross-key rules, as in the ServerApp."""
    from server.workflow import check_settings
    from shared.config import ConfigError, StudyConfig
    from shared.settings import check_keys

    check_keys(overrides)
    given = {}
    for key, value in overrides.items():
        try:
            given[key] = tomllib.loads(f"v = {toml_value(value)}")["v"]
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"run config {key}: {err}") from None
    check_settings(StudyConfig.from_run_config(given))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_connection(home: Path, port: int) -> None:
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "feddlr"\n\n[superlink.feddlr]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")


def start_superlink(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    command = [_bin("flower-superlink"), "--insecure", "--simulation",
               "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]
    log = log_path.open("wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_healthy(port: int, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SUPERLINK_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"flower-superlink exited with code {process.returncode}; "
                              f"see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise LaunchError(f"flower-superlink did not become healthy in {SUPERLINK_START_TIMEOUT:g}s")


def stream(command: list[str], env: dict[str, str], log_path: Path, echo: bool) -> int:
    """Run `command`; every line of its output goes to `log_path`, and (with `echo`) to the
    console as `simulation.console.Console` shows it (a live status line in a terminal,
    sparse lines in a pipe)."""
    from simulation.console import Console

    console = Console() if echo else None
    with log_path.open("w", encoding="utf-8") as log, subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        bufsize=1, cwd=APP_DIR,
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if console is not None:
                    console.write(line)
        finally:
            if console is not None:
                console.close()
        return proc.wait()


def stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink and everything it started (its session), then reap it."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def toml_value(value: object) -> str:
    """A run-config value as TOML: kept if it already is a TOML literal, else quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    try:
        parsed = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = None
    # Flower keeps integers in int64: a longer one (e.g. a Flower run id) is a string
    if parsed is not None and not (isinstance(parsed, int) and not -2**63 <= parsed < 2**63):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name

