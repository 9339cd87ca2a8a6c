"""A training run killed mid-round (SIGKILL of the server process, after one site has
already trained the round) resumes from its last checkpoint with `resume=true` and ends
with exactly the same weights as an uninterrupted run with the same seed — with FedProx,
FedBN (each site's own normalization layers, kept on its disk) and bfloat16 on the wire."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulation.cohort import simulate_cohort
from simulation.launcher import APP_DIR

pytestmark = pytest.mark.slow

EXTRA = {"deep-models": "dl_mri", "rounds": 4, "cnn-width": 0.0625, "mri-size": 16,
         "deep-cv-folds": 2, "batch-size": 4, "strategy": "fedprox", "proximal-mu": 0.1,
         "fedbn": True, "wire-dtype": "bfloat16", "gradcam-patients": 0, "seed": 9}

SCRIPT = """
import json, os, signal, sys
from pathlib import Path
from simulation.in_process import InProcessTransport
from server.workflow import run_study
from shared.config import StudyConfig, stage_settings

sites, out, kill_round, resume = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]


class Transport(InProcessTransport):
    def ask(self, action, query, names):
        names = list(names)
        if action == "train.dl_mri" and query.get("round") == kill_round:
            super().ask(action, query, names[:1])  # the first site trains this round...
            os.kill(os.getpid(), signal.SIGKILL)  # ...and the server dies mid-round
        return super().ask(action, query, names)


folders = sorted(p for p in sites.iterdir() if (p / "site.yaml").is_file())
config = StudyConfig(sites_dir=str(sites), out_dir=out, stages=("deep",),
                     resume=resume == "resume", settings=stage_settings(json.loads(sys.argv[5])))
run_study(Transport(folders), config, run_id=sys.argv[6])
"""


def study(sites: Path, out: Path, kill_round: int, resume: bool, run_id: str,
          script: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), str(sites), str(out), str(kill_round),
         "resume" if resume else "fresh", json.dumps(EXTRA), run_id],
        cwd=APP_DIR, capture_output=True, text=True, timeout=600)


def weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    script = tmp_path / "study.py"
    script.write_text(SCRIPT)
    simulate_cohort(tmp_path / "a", n_sites=2, n_patients=24, seed=6, image_size=16)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the uninterrupted run's own sites

    killed = study(tmp_path / "a", tmp_path / "out-a", 3, False, "run-1", script)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = tmp_path / "out-a" / "training" / "dl_mri"
    assert json.loads((folder / "checkpoint.json").read_text())["round"] == 2
    assert not (folder / "final.npz").exists()

    resumed = study(tmp_path / "a", tmp_path / "out-a", 0, True, "run-2", script)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = study(tmp_path / "b", tmp_path / "out-b", 0, False, "run-3", script)
    assert straight.returncode == 0, straight.stderr[-3000:]

    a, b = weights(folder / "final.npz"), weights(tmp_path / "out-b" / "training" / "dl_mri"
                                                  / "final.npz")
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # FedBN: each site's own normalization layers after the last round are identical too
    for site in ("site-1", "site-2"):
        local_a = sorted((tmp_path / "a" / site / "cache" / "training").glob("*/dl_mri-f0-r4.npz"))
        local_b = sorted((tmp_path / "b" / site / "cache" / "training").glob("*/dl_mri-f0-r4.npz"))
        assert len(local_a) == len(local_b) == 1
        for key, value in weights(local_a[0]).items():
            np.testing.assert_array_equal(value, weights(local_b[0])[key])

    result = json.loads((tmp_path / "out-a" / "results.json").read_text())["deep"]["models"]
    model = result["dl_mri"]
    assert model["resume"]["from_round"] == 2
    assert [r["round"] for r in model["rounds"]] == [1, 2, 3, 4]
    other = json.loads((tmp_path / "out-b" / "results.json").read_text())["deep"]["models"]
    assert model["validation"]["4"]["pooled"]["loss"] == other["dl_mri"]["validation"]["4"][
        "pooled"]["loss"]
    assert model["auc"]["train_oof"] == other["dl_mri"]["auc"]["train_oof"]
