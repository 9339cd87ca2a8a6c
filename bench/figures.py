"""Shared by the bench scripts: figure lines, machine description, process memory.

Every figure is printed as `name: value  (what it means)` and kept, so a script run with
`--json FILE` also writes {name: {"value", "meaning"}} for `bench/run.py` to collect.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any


class Figures:
    """The figures of one script, in the order printed."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}

    def add(self, name: str, value: Any, meaning: str, shown: str | None = None) -> None:
        if isinstance(value, float):
            value = round(value, 6)
        self.items[name] = {"value": value, "meaning": meaning}
        text = shown if shown is not None else _show(value)
        print(f"{name}: {text}  ({meaning})", flush=True)

    def dump(self, path: Path | None, **extra: Any) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"figures": self.items, **extra}, indent=1, default=str),
                        encoding="utf-8")


def _show(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        info["flwr"] = version("flwr")
    except Exception:
        pass
    return info


class PeakMemory:
    """Polls /proc (Linux) for processes whose command line contains one of `patterns` and
    keeps each one's peak resident set (VmHWM, the kernel's own high-water mark, so the poll
    only has to see a process once before it exits)."""

    def __init__(self, patterns: dict[str, str], interval: float = 0.5,
                 root_pid: int | None = None) -> None:
        self.patterns = patterns  # label -> substring of the command line
        self.interval = interval
        # only descendants of this process (not another user's simulation on the machine)
        self.root_pid = os.getpid() if root_pid is None else root_pid
        self.peaks: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
                label = next((k for k, v in self.patterns.items() if v in cmdline), None)
                if label is None:
                    continue
                hwm = _status_kib(entry / "status", "VmHWM")
            except (OSError, StopIteration):
                continue
            pid = int(entry.name)
            if hwm is None or not _descends(pid, self.root_pid):
                continue
            old = self.peaks.get(pid, {"peak_mib": 0.0})
            self.peaks[pid] = {"label": label, "peak_mib": max(old["peak_mib"], hwm / 1024),
                               "cmd": cmdline[:120], "seen": time.time()}

    def max_by_label(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for info in self.peaks.values():
            out[info["label"]] = max(out.get(info["label"], 0.0), info["peak_mib"])
        return out


def _descends(pid: int, root: int) -> bool:
    """Whether `root` is among the ancestors of `pid` (via /proc/<pid>/stat)."""
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        seen += 1
    return pid == root


def _status_kib(path: Path, key: str) -> int | None:
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None
