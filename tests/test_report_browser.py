"""report.html opens in a real browser and every figure in it loads.

Renders a full report (cohort, fusion, validation, survival, contribution, privacy) and loads it
in headless Chromium: the page's own script counts the <img> elements that decoded
(`body[data-figures="loaded/total"]`), read back from the dumped DOM; a screenshot must be a
valid PNG that is not blank.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.report.page import write_report
from tests.test_report_validation import SITES, realistic_results

TIMEOUT = 60  # seconds per Chromium call


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); "
                    "the browser check of report.html needs it")
    return path


def _run_chromium(binary: str, profile: Path, *args: str) -> str:
    """Run headless Chromium in its own process group; kill the whole group on timeout."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {TIMEOUT} s: {' '.join(args)}")
    finally:
        # helpers (zygote, renderer) a finished browser may have left in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-2000:]
    return stdout


def _cohort() -> dict[str, Any]:
    sites = {"site-1": [120, 80], "site-2": [110, 90], "site-3": [100, 69]}
    return {
        "task": "her2-positive", "groups": ["HER2-negative", "HER2-positive"],
        "n": {"pooled": [330, 239], "sites": {**sites, "site-4": None}},
        "covariates": {
            "age": {"type": "numeric", "mean": [52.1, 49.8], "sd": [10.2, 11.0],
                    "n": [330, 239], "t_test": {"p_value": 0.011}, "sites": {},
                    "sites_missing": ["site-4"]},
            "lesion_type": {"type": "categorical", "levels": ["mass", "non-mass"],
                            "counts": [[250, 170], [80, 69]], "chi2": {"p_value": 0.21},
                            "sites": {}, "sites_missing": []},
        },
        "sites": {s: {"status": "ok"} for s in SITES},
    }


def _survival() -> dict[str, Any]:
    curves = {}
    for label, hazard in (("label=0", 0.02), ("label=1", 0.035)):
        time = np.arange(0, 61, 3.0)
        survival = np.exp(-hazard * time)
        at_risk = np.round(250 * survival).astype(int)
        curves[label] = {"time": time.tolist(), "survival": survival.tolist(),
                         "ci_lower": (survival * 0.93).tolist(),
                         "ci_upper": np.minimum(survival * 1.05, 1).tolist(),
                         "at_risk": at_risk.tolist(), "events": [0] * len(time),
                         "n": 250, "n_events": 40}
    return {"task": "her2-positive", "time_unit": "months", "time_bin": 1.0, "km": curves,
            "logrank": {"groups": ["label=0", "label=1"], "statistic": 5.2, "df": 1,
                        "p_value": 0.023},
            "sites": {s: {"status": "ok"} for s in SITES}}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = realistic_results()
    results["cohort"] = _cohort()
    results["survival"] = _survival()
    results["run"]["config"]["stages"] = ["cohort", "fusion", "validation", "survival"]
    return write_report(results, tmp_path_factory.mktemp("report"))


def test_every_figure_loads_in_chromium(report: Path, tmp_path: Path) -> None:
    binary = _chromium()
    page = report.read_text(encoding="utf-8")
    images = re.findall(r"<img src='([^']+)'", page)
    assert len(images) >= 9  # cohort, 2 validation overviews, 4 models, LOSO, KM
    dom = _run_chromium(binary, tmp_path / "profile", "--dump-dom", report.as_uri())
    assert "<h2>Validation</h2>" in dom and "<h2>Privacy summary</h2>" in dom
    found = re.search(r'data-figures="(\d+)/(\d+)"', dom)
    assert found, "the page's load script did not run"
    assert (int(found[1]), int(found[2])) == (len(images), len(images)), \
        f"{found[1]} of {found[2]} figures loaded ({len(images)} <img> tags)"


def test_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    binary = _chromium()
    from PIL import Image

    shot = tmp_path / "report.png"
    _run_chromium(binary, tmp_path / "profile", f"--screenshot={shot}",
                  "--window-size=1200,2400", report.as_uri())
    with Image.open(shot) as image:
        image.verify()
    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        low, high = image.convert("L").getextrema()
        assert low < 100 < high  # dark text on a light page, not one flat colour
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50  # figures, not just text
    keep = os.environ.get("FEDDLR_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
