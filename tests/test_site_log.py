"""What loading a site folder did reaches the site's own log during a run, `audit/site.log`,
beside the exclusions (issue 26): clinical.csv's levels normalized with the mapping, a mask
resampled from another grid. Before, these notes reached `feddlr check-site`'s output only;
a stage's session logged the exclusions alone."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from client.site.session import AUDIT_DIR, SITE_LOG, clear_sessions, open_session
from tests.sites import realistic

LEVELS = ("realistic: clinical.csv: note: column 'hr_status': levels normalized (case, "
          "spaces): 'Positive' -> 'positive' (1)")
RESAMPLED = ("realistic: images/prone/mri_mask.nrrd: patient prone: note: reader-1 mask is on "
             "another grid over mri.nrrd's region (size (45, 120, 21), spacing 0.664 x 0.664 x "
             "2.1 mm, orientation RAS): resampled onto its grid by nearest neighbour")


def test_loading_notes_reach_the_site_log(tmp_path: Path) -> None:
    root = realistic.realistic_site(tmp_path / "realistic", ("plain", "prone"))
    frame = pd.DataFrame({"patient_id": ["plain", "prone"], "her2_ihc": [3, 3],
                          "her2_ish": [math.nan, math.nan],
                          "hr_status": ["positive", "positive"]})
    realistic.excel_export(root, frame, capitalize=["hr_status"])  # `Positive` on row 2
    clear_sessions()
    session = open_session(str(root), "her2-positive", ("clinical", "mri"))
    assert session.site.n_patients == 2 and session.site.excluded == {}
    assert session.site.clinical["hr_status"].tolist() == ["positive", "positive"]
    lines = (root / AUDIT_DIR / SITE_LOG).read_text(encoding="utf-8").splitlines()
    logged = [line.split(" INFO ", 1)[1] for line in lines]
    assert logged[0].endswith("2 patients included, 0 excluded")
    assert LEVELS in logged
    assert RESAMPLED in logged
    assert not [line for line in logged if "patient plain" in line]  # a plain mask: no note
