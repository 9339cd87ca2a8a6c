"""A deployment starts a ClientApp process per message: a statistics query must not pay for
the training stack. In a fresh interpreter, answering the cohort, survival and radiomics
set-up queries imports neither torch, MONAI, scipy.stats nor pyradiomics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from simulation.cohort import simulate_cohort
from simulation.launcher import APP_DIR

HEAVY = ("torch", "monai", "scipy.stats", "radiomics", "sklearn")
ANSWER = """
import json, sys
from pathlib import Path
from client.app import answer  # noqa: F401  (what Flower loads)
from client.handlers import serve
root = Path(sys.argv[1])
statuses = [serve(root, action, {"task": "her2-positive"}, "1")["status"]
            for action in ("handshake", "cohort_sums", "survival_setup")]
print(json.dumps({"statuses": statuses, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def test_statistics_queries_import_no_training_stack(tmp_path: Path) -> None:
    simulate_cohort(tmp_path / "sites", n_sites=1, n_patients=30, seed=2, images=False)
    done = subprocess.run([sys.executable, "-c", ANSWER, str(tmp_path / "sites" / "site-1")],
                          cwd=APP_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["statuses"] == ["ok", "ok", "ok"], out
    assert out["heavy"] == [], out
