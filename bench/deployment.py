"""Rounds across hospitals: a loopback deployment started as `deploy/` starts it, against the
Simulation Engine, in one run.

The deployment is the README's: a CA and SuperLink certificate (`deploy/ca.sh`), the
SuperLink with TLS and SuperNode authentication (`deploy/superlink.sh`), one key pair per
hospital (`deploy/node-key.sh`, `deploy/register.sh`) and one SuperNode per site
(`deploy/supernode.sh`), in their default (warm) configuration, or with `--stock` Flower's
plain commands (`FEDDLR_FAST=0`).
The study is submitted with `flwr run` from a copy of the app whose ServerApp is
`bench/timed_app.py` (every round timed at the server, a few empty rounds after the
handshake). The same study then runs in the Simulation Engine (`feddlr run`'s launcher).

Figures:
- median seconds of an empty round (the handshake query again), of a statistics round
  (cohort, radiomics, survival) and, unless `--no-cnn`, of a CNN training round, first
  round of each kind excepted;
- where a statistics round's time goes (medians over rounds and sites): the server's push
  until the SuperNode pulls the message, until the ClientApp process exists, until its
  modules are imported, until the message reaches the app, the work, until the SuperNode
  has sent the reply, until the server holds every reply. From the SuperNodes' log lines
  (time-stamped as they are read) and the `FEDDLR_TIMING` lines of the hook around each
  SuperNode's ClientApp (tests/site_hooks);
- the study (stages `--stages` on `--sites` × `--patients` sites with a features.csv of
  `--features` columns) in deployment ÷ in simulation: the ServerApp's study seconds, and
  the rounds each needed (equal: same study, same answers).

    .venv/bin/python bench/deployment.py
    .venv/bin/python bench/deployment.py --quick --no-cnn
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from bench.figures import Figures, machine
from bench.flower_rounds import feature_sites, run_once, timed_app
from deploy.warm_supernode import READY
from simulation.cohort import simulate_cohort
from simulation.launcher import free_port, toml_value

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SITE_HOOKS = REPO / "tests" / "site_hooks"
STATISTICS = ("cohort_", "radiomics_", "survival_")
# Three hospitals share this machine: each gets one core's worth of threads, as each site of
# the Simulation Engine gets `client-resources-num-cpus=1` (Ray sets OMP_NUM_THREADS=1 for
# it); with torch's default (one thread per core) three trainings would spin on two cores.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Issue 14's demo study: `make demo` as it was before the paper-1 design (issue 15), three
# training sites with leave-one-site-out validation, kept so the ratio stays comparable.
DEMO = {"validation": "loso", "survival-group": "label,predicted:dlr"}
CNN = {"stages": "deep", "deep-models": "dl_mri", "rounds": "3", "local-epochs": "dl_mri=1",
       "cnn-width": "0.0625", "mri-size": "16", "deep-cv-folds": "2", "cv-folds": "2",
       "gradcam-patients": "0", "seed": "4"}


class Loopback:
    """SuperLink and one SuperNode per site on 127.0.0.1, each started by its deploy/
    script in its own session, their output time-stamped line by line."""

    def __init__(self, root: Path, sites: list[Path], fast: bool) -> None:
        self.root, self.sites, self.fast = root, sites, fast
        self.port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("FEDDLR_", "FLWR_"))}
        base.update(PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
                    FEDDLR_SUPERLINK=f"127.0.0.1:{self.port}", FEDDLR_LISTEN="127.0.0.1")
        base["FEDDLR_FAST"] = "1" if fast else "0"
        self.coordinator = dict(base, FEDDLR_DEPLOY=str(root / "coordinator"))
        # FEDDLR_TIMING is read by tests/site_hooks/sitecustomize.py around Flower's
        # ClientApp in each SuperNode's processes (the app itself times nothing)
        hooks = os.pathsep.join(p for p in (str(SITE_HOOKS), base.get("PYTHONPATH")) if p)
        self.hospitals = {s.name: dict(base, FEDDLR_DEPLOY=str(root / s.name),
                                       FEDDLR_SITE=str(s), FEDDLR_NODE_NAME=s.name,
                                       FEDDLR_NODE_PORT=str(free_port()),
                                       FEDDLR_TIMING=str(root / f"{s.name}.timing.jsonl"),
                                       PYTHONPATH=hooks,
                                       **THREADS)
                          for s in sites}
        self.procs: dict[str, subprocess.Popen] = {}
        self.threads: list[threading.Thread] = []

    def script(self, name: str, env: dict[str, str]) -> None:
        subprocess.run(["bash", str(DEPLOY / name)], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=180)

    def start_process(self, name: str, script: str, env: dict[str, str]) -> None:
        proc = subprocess.Popen(["bash", str(DEPLOY / script)], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        log = (self.root / f"{name}.log").open("w", encoding="utf-8")

        def copy() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(f"{time.time():.6f} {line}")
                log.flush()
            log.close()

        thread = threading.Thread(target=copy, daemon=True)
        thread.start()
        self.threads.append(thread)

    def start(self) -> None:
        self.script("ca.sh", self.coordinator)
        self.start_process("superlink", "superlink.sh", self.coordinator)
        ca = self.root / "coordinator" / "tls" / "ca.crt"
        inbox = self.root / "coordinator" / "supernodes"
        inbox.mkdir(parents=True, exist_ok=True)
        for name, env in self.hospitals.items():
            self.script("node-key.sh", env)
            (self.root / name / "tls").mkdir(parents=True, exist_ok=True)
            shutil.copy(ca, self.root / name / "tls" / "ca.crt")
            shutil.copy(self.root / name / "keys" / f"{name}.pub", inbox)
        self.wait(lambda: "Uvicorn running" in self.log("superlink"), 60, "SuperLink up")
        self.script("register.sh", self.coordinator)
        for name, env in self.hospitals.items():
            self.start_process(name, "supernode.sh", env)
        self.wait(lambda: self.online() >= len(self.sites), 90, "every SuperNode online")
        if self.fast:  # warm SuperExecs: libraries loaded
            self.wait(lambda: all(READY in self.log(n) for n in self.hospitals), 120,
                      "every SuperExec ready")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def online(self) -> int:
        done = subprocess.run(["flwr", "supernode", "list", "feddlr", "--format", "json"],
                              cwd=REPO, env=self.flwr_env(), capture_output=True, text=True,
                              timeout=60)
        if "{" not in done.stdout:
            return 0
        nodes = json.loads(done.stdout[done.stdout.index("{"):])["nodes"]
        return sum(n["status"] == "online" for n in nodes)

    def flwr_env(self) -> dict[str, str]:
        home = self.root / "coordinator" / "flwr-home"
        return dict(self.coordinator, FLWR_HOME=str(home))

    @staticmethod
    def wait(ready: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise SystemExit(f"deployment: timed out waiting for {what}")
            time.sleep(0.5)

    def run(self, app: Path, out: Path, config: dict[str, str]) -> dict:
        pairs = " ".join(f"{k}={toml_value(v)}"
                         for k, v in {**config, "out-dir": str(out)}.items())
        for env in self.hospitals.values():  # a SuperNode serves only an app its site approved
            subprocess.run(["bash", str(DEPLOY / "approve.sh"), str(app)], cwd=REPO, env=env,
                           check=True, capture_output=True, timeout=180)
        cpu_before = cpu_seconds()
        started = time.perf_counter()
        done = subprocess.run(["flwr", "run", str(app), "feddlr", "--stream",
                               "--run-config", pairs], cwd=REPO, env=self.flwr_env(),
                              capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - started
        cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_seconds().items()}
        (out.parent / f"{out.name}.flwr-run.log").write_text(done.stdout + done.stderr)
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        timing = json.loads((out / "bench_rounds.json").read_text(encoding="utf-8"))
        return {"rc": done.returncode, "wall": wall, "results": results, "timing": timing,
                "cpu": cpu}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for thread in self.threads:
            thread.join(timeout=5)


PROCESS_KINDS = (("warm_supernode.py --superexec", "SuperExec + ClientApps (per site)"),
                 ("warm_supernode.py", "SuperNode (per site)"),
                 ("flower-supernode", "SuperNode (per site)"),
                 ("flwr-clientapp", "SuperExec + ClientApps (per site)"),
                 ("flower-superexec --plugin-type clientapp", "SuperExec + ClientApps (per site)"),
                 ("flower-superlink", "SuperLink"), ("warm_superlink.py", "SuperLink"),
                 ("flwr-serverapp", "ServerApp"),
                 ("flower-superexec", "flower-superexec (the SuperLink's; with --stock also "
                  "each SuperNode's, with its flwr-clientapp children)"),
                 ("flwr run", "flwr run --stream"))


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system, with reaped children) of the deployment's processes by
    kind, summed over processes; read from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        kind = next((k for mark, k in PROCESS_KINDS if mark in command), None)
        if kind:
            own = (int(fields[11]) + int(fields[12])) / tick  # utime stime
            reaped = (int(fields[13]) + int(fields[14])) / tick  # cutime cstime
            out[kind] = out.get(kind, 0.0) + own
            if reaped:
                out[f"{kind}: reaped children"] = out.get(f"{kind}: reaped children",
                                                          0.0) + reaped
    return out


# --------------------------------------------------------------------------- the breakdown

SEGMENTS = ("server push → SuperNode pulls it", "SuperNode pulls → has the message",
            "has it → ClientApp process started", "process started → app imported",
            "app imported → message in the app", "the site's work",
            "reply ready → SuperNode sent it", "last SuperNode sent → server holds the replies")


def node_events(log: str) -> dict[str, list[float]]:
    """Times of the SuperNode's 'Receiving:' and 'Sent successfully' lines."""
    events: dict[str, list[float]] = {"receiving": [], "received": [], "sent": []}
    for line in log.splitlines():
        stamp, _, text = line.partition(" ")
        for key, mark in (("receiving", "Receiving:"), ("received", "Received successfully"),
                          ("sent", "Sent successfully")):
            if mark in text:
                events[key].append(float(stamp))
    return events


def breakdown(rounds: list[dict], loopback: Loopback) -> dict[str, float]:
    """Median seconds of each segment of `rounds` (server entries with `sent`, `seconds`),
    over rounds and sites; the last segment once per round, after the last site's reply."""
    parts: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    logs = {name: (node_events(loopback.log(name)), _timing(loopback, name))
            for name in loopback.hospitals}
    for r in rounds:
        t0, t1 = r["sent"], r["sent"] + r["seconds"]
        last = None
        for events, apps in logs.values():
            pulling = _first_in(events["receiving"], t0, t1)
            pulled = _first_in(events["received"], t0, t1)
            app = next((a for a in apps if t0 <= a["entered"] <= t1), None)
            if pulling is None or pulled is None or app is None or app["process"] is None:
                continue
            sent = _first_in(events["sent"], app["replied"], t1 + 0.5)
            if sent is None:
                continue
            last = max(last or sent, sent)
            spans = [pulling - t0, pulled - pulling, app["process"] - pulled,
                     app["imported"] - app["process"], app["entered"] - app["imported"],
                     app["replied"] - app["entered"], sent - app["replied"]]
            for segment, span in zip(SEGMENTS, spans, strict=False):
                parts[segment].append(span)
        if last is not None:
            parts[SEGMENTS[-1]].append(t1 - last)
    return {s: statistics.median(v) for s, v in parts.items() if v}


def _timing(loopback: Loopback, name: str) -> list[dict]:
    path = Path(loopback.hospitals[name]["FEDDLR_TIMING"])
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _first_in(times: list[float], lo: float, hi: float) -> float | None:
    return next((t for t in times if lo <= t <= hi), None)


# --------------------------------------------------------------------------- the figures


def statistics_rounds(timing: dict) -> list[dict]:
    return [r for r in timing["rounds"] if r["action"].startswith(STATISTICS)]


def median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def study_seconds(timing: dict) -> float:
    """The study as the ServerApp timed it, without the bench's empty rounds."""
    return timing["study_seconds"] - sum(e["seconds"] for e in timing["empty"])


def demo_study(root: Path, fast: bool, figures: Figures) -> bool:
    """Issue 14's demo study (`make demo` before the paper-1 design: 3 training sites,
    `validation=loso`) on the loopback deployment, then
    in the Simulation Engine, each on its own copy of the freshly simulated site folders
    (no cache carried over): the ServerApp's study seconds and rounds, deployment ÷
    simulation."""
    simulate_cohort(root / "demo-sites", n_sites=3, n_patients=40, seed=7, effect_size=1.5)
    copies = {}
    for engine in ("deploy", "sim"):
        copies[engine] = root / f"demo-sites-{engine}"
        shutil.copytree(root / "demo-sites", copies[engine])
    app = timed_app(root / "timed-demo")
    folders = sorted(p for p in copies["deploy"].iterdir() if (p / "site.yaml").is_file())
    loopback = Loopback(root / "deploy-demo", folders, fast)
    (root / "deploy-demo").mkdir(parents=True, exist_ok=True)
    try:
        loopback.start()
        deployed = loopback.run(app, root / "out-demo-deploy",
                                {**DEMO, "sites-dir": str(copies["deploy"]),
                                 "bench-empty-rounds": "0"})
    finally:
        loopback.stop()
    simulated = run_once(app, copies["sim"], root / "out-demo-sim", "", 1.0, 0, DEMO)
    d, s = study_seconds(deployed["timing"]), study_seconds(simulated["timing"])
    stages = {k: v["status"] for k, v in deployed["results"]["run"]["stages"].items()}
    figures.add("demo_deploy_s", d, f"the 3-site demo study on the deployment (stages {stages})")
    figures.add("demo_simulation_s", s, "the same study in the Simulation Engine")
    figures.add("demo_deploy_over_simulation", d / s, "deployment ÷ simulation")
    figures.add("demo_rounds", len(deployed["timing"]["rounds"]),
                f"rounds on the deployment (simulation: {len(simulated['timing']['rounds'])})")
    return deployed["rc"] == 0 and simulated["rc"] == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--stages", default="cohort,radiomics,survival")
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--empty-rounds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--no-cnn", action="store_true", help="skip the CNN training round")
    parser.add_argument("--no-simulation", action="store_true",
                        help="skip the same study in the Simulation Engine")
    parser.add_argument("--stock", action="store_true",
                        help="Flower's plain flower-superlink / flower-supernode "
                             "(FEDDLR_FAST=0) instead of the warm launchers")
    parser.add_argument("--quick", action="store_true", help="stages cohort,survival only")
    parser.add_argument("--demo", action="store_true",
                        help="also the 3-site demo study (make demo before the paper-1 "
                             "design), deployment ÷ simulation (long)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    stages = "cohort,survival" if args.quick else args.stages
    root = args.out or Path(tempfile.mkdtemp(prefix="feddlr-bench-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    fast = not args.stock
    folders = feature_sites(root / "sites", args.sites, args.patients, args.features,
                            args.seed)
    if not args.no_cnn:
        simulate_cohort(root / "cnn-sites", n_sites=args.sites, n_patients=20, seed=8,
                        effect_size=2.0, image_size=24)
    app = timed_app(root / "timed")
    extra = {"cv-folds": str(args.cv_folds), "stepwise": "none", "stages": stages,
             "sites-dir": str(root / "sites"), "bench-empty-rounds": str(args.empty_rounds)}
    figures = Figures()
    print(f"deployment: {args.sites} SuperNodes on loopback (TLS, node authentication), "
          f"{args.patients} patients per site, stages {stages}, "
          f"{'stock Flower' if args.stock else 'warm launchers'}", flush=True)
    loopback = Loopback(root / "deploy", folders, fast)
    (root / "deploy").mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        loopback.start()
        print(f"# deployment up in {time.perf_counter() - started:.1f} s", flush=True)
        deployed = loopback.run(app, root / "out-deploy", extra)
        deployed["breakdown"] = breakdown(statistics_rounds(deployed["timing"])[1:], loopback)
        cnn = None
        if not args.no_cnn:
            cnn_loop = Loopback(root / "deploy-cnn", sorted(
                p for p in (root / "cnn-sites").iterdir() if (p / "site.yaml").is_file()),
                fast)
            (root / "deploy-cnn").mkdir(parents=True, exist_ok=True)
            loopback.stop()
            loopback = cnn_loop
            loopback.start()
            cnn = loopback.run(app, root / "out-cnn",
                               {**CNN, "sites-dir": str(root / "cnn-sites"),
                                "bench-empty-rounds": "0"})
    finally:
        loopback.stop()
    report(figures, deployed, cnn)
    simulated = None
    if not args.no_simulation:
        simulated = run_once(app, root / "sites", root / "out-sim", stages, 1.0,
                             args.empty_rounds, {k: v for k, v in extra.items()
                                                 if k not in ("stages", "sites-dir",
                                                              "bench-empty-rounds")})
        compare(figures, deployed, simulated)
    ok = deployed["rc"] == 0 and (simulated is None or simulated["rc"] == 0)
    if args.demo:
        ok = demo_study(root, fast, figures) and ok
    figures.dump(args.json, machine=machine(), args={k: str(v) for k, v in vars(args).items()})
    print(f"written under {root}")
    return 0 if ok else 1


def report(figures: Figures, deployed: dict, cnn: dict | None) -> None:
    timing = deployed["timing"]
    empty = [e["seconds"] for e in timing["empty"]]
    stats = [r["seconds"] for r in statistics_rounds(timing)]
    figures.add("deploy_empty_round_s", median_after_first(empty),
                "median seconds of an empty round (handshake query again), first excepted")
    figures.add("deploy_statistics_round_s", median_after_first(stats),
                f"median seconds of a statistics round ({len(stats)} rounds), first excepted")
    for prefix in STATISTICS:
        rounds = [r["seconds"] for r in statistics_rounds(timing)
                  if r["action"].startswith(prefix)]
        if rounds:
            figures.add(f"deploy_{prefix.rstrip('_')}_round_s", median_after_first(rounds),
                        f"median seconds of a {prefix.rstrip('_')} round ({len(rounds)})")
    if cnn is not None:
        train = [r["seconds"] for r in cnn["timing"]["rounds"]
                 if r["action"].startswith("train")]
        if train:
            figures.add("deploy_cnn_round_s", median_after_first(train),
                        f"median seconds of a CNN training round ({len(train)} rounds)")
    for segment, seconds in deployed["breakdown"].items():
        figures.add(f"deploy_segment: {segment}", seconds,
                    "median seconds of this part of a statistics round")
    rounds = len(timing["rounds"]) + len(timing["empty"]) + 1
    for kind, seconds in sorted(deployed["cpu"].items()):
        figures.add(f"deploy_cpu_per_round: {kind}", seconds / rounds,
                    f"CPU seconds per round ({rounds} rounds with the handshake), all sites")


def compare(figures: Figures, deployed: dict, simulated: dict) -> None:
    d, s = study_seconds(deployed["timing"]), study_seconds(simulated["timing"])
    figures.add("study_deploy_s", d, "the study in deployment, ServerApp seconds")
    figures.add("study_simulation_s", s, "the same study in the Simulation Engine")
    figures.add("study_deploy_over_simulation", d / s, "deployment ÷ simulation")
    rd, rs = len(deployed["timing"]["rounds"]), len(simulated["timing"]["rounds"])
    figures.add("study_rounds_deploy", rd, f"rounds in deployment (simulation: {rs})")


if __name__ == "__main__":
    raise SystemExit(main())
