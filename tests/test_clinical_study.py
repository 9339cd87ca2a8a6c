"""A study over a hospital's Excel export of clinical.csv (issue 26, point 4): cohort and
survival in the Flower Simulation Engine on three sites of the demo cohort —

- site-1 as the simulator writes it;
- site-2 exported from Excel (tests/sites/realistic.py: BOM, `;`, CRLF, decimal commas,
  `#N/A`, `Positive` beside `positive`, `IHC 2+`) with its format declared in site.yaml;
- site-3 with decimal commas in a `,` file and no declaration (before: read without a word,
  each age a level of a categorical covariate, or the covariate dropped across sites).

The run must equal the same study on site-1 and site-2 written plainly (in-process): no
covariate dropped or made categorical, and site-3 refused with the setting to declare.
One Flower run (~30 s) serves all."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from server.workflow import run_study
from shared.config import StudyConfig
from simulation.cohort import simulate_cohort
from simulation.in_process import InProcessTransport
from simulation.launcher import run_simulation
from tests.sites.realistic import excel_export

pytestmark = pytest.mark.slow

OVERRIDES = {"stages": "cohort,survival", "stepwise": "none"}
# site-2 patients whose ki67 the export leaves `#N/A`: at least privacy.min_difference (10),
# else the site refuses a Cox cohort that differs from its whole cohort by so few patients
NA_PATIENTS = 12


def plain_values(frame: pd.DataFrame) -> pd.DataFrame:
    """site-2's true values: ages with a fraction (so the export writes decimal commas),
    ki67 missing for NA_PATIENTS patients of the task (IHC 0, 1+ or 3+), her2_ihc as
    numbers."""
    frame = frame.copy()
    frame["age"] = frame["age"].astype(float) + np.where(np.arange(len(frame)) % 2, 0.5, 0.25)
    frame["ki67"] = frame["ki67"].astype(float)
    in_task = frame.index[frame["her2_ihc"].astype(int) != 2]
    frame.loc[in_task[:NA_PATIENTS], "ki67"] = np.nan
    frame["her2_ihc"] = frame["her2_ihc"].astype(int)
    return frame


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("clinical-study")
    sites = root / "sites"
    simulate_cohort(sites, n_sites=3, n_patients=40, seed=7, images=False)
    plain = root / "plain"
    for s in ("site-1", "site-2"):
        shutil.copytree(sites / s, plain / s)
    frame = plain_values(pd.read_csv(sites / "site-2" / "clinical.csv",
                                     dtype={"patient_id": str, "her2_ish": str}))
    frame.to_csv(plain / "site-2" / "clinical.csv", index=False)
    excel_export(sites / "site-2", frame, capitalize=["hr_status", "lesion_type"])
    third = pd.read_csv(sites / "site-3" / "clinical.csv", dtype=str)
    third["age"] = [f"{a},5" for a in third["age"]]  # "63,5", quoted in a ',' file
    third.to_csv(sites / "site-3" / "clinical.csv", index=False)

    rc = run_simulation(sites, root / "out", OVERRIDES, echo=False)
    results = json.loads((root / "out" / "results.json").read_text(encoding="utf-8"))
    reference = run_study(
        InProcessTransport([plain / "site-1", plain / "site-2"]),
        StudyConfig.from_run_config({**OVERRIDES, "out-dir": str(root / "ref")}))
    return {"rc": rc, "results": results, "reference": reference, "root": root}


def test_the_undeclared_decimal_commas_refuse_their_site_naming_the_setting(runs) -> None:
    assert runs["rc"] == 0
    third = next(s for s in runs["results"]["run"]["sites"] if s["site_id"] == "site-3")
    assert third["status"] == "failed"
    assert re.search(r"site-3: clinical\.csv: column 'age': \d+ values use ',' as the decimal "
                     r"mark \(patient <patient>: '\d+,5'\)", third["reason"])
    assert "clinical_csv: {decimal: ','}" in third["reason"]


def test_the_excel_site_gives_the_plain_sites_cohort_table(runs) -> None:
    cohort, reference = runs["results"]["cohort"], runs["reference"]["cohort"]
    assert cohort["sites_used"] == ["site-1", "site-2"]
    assert set(cohort["covariates"]) == {"age", "tumour_size_mm", "ki67", "hr_status",
                                         "lesion_type"}  # none dropped
    for name in ("age", "tumour_size_mm", "ki67"):
        assert cohort["covariates"][name]["type"] == "numeric", name
        assert cohort["covariates"][name]["n"] == reference["covariates"][name]["n"]
        np.testing.assert_allclose(cohort["covariates"][name]["mean"],
                                   reference["covariates"][name]["mean"], rtol=1e-12)
    n = {name: sum(cohort["covariates"][name]["n"]) for name in ("age", "ki67")}
    assert n["age"] - n["ki67"] == NA_PATIENTS  # `#N/A`: missing, not a level
    for name in ("hr_status", "lesion_type"):  # `Positive` and `positive`: one level
        assert cohort["covariates"][name] == reference["covariates"][name]
        assert all(level == level.lower() for level in cohort["covariates"][name]["levels"])


def test_the_excel_site_gives_the_plain_sites_cox_model(runs) -> None:
    surv, reference = runs["results"]["survival"], runs["reference"]["survival"]
    assert surv["design"]["left_out"] == {} and surv["design"]["sites_without"] == {}
    model, expected = surv["cox"], reference["cox"]
    assert model["covariates"] == expected["covariates"]
    assert "age" in model["covariates"] and "ki67" in model["covariates"]  # numeric, 1 column
    assert model["sites_used"] == ["site-1", "site-2"]
    assert model["converged"] is True
    assert model["n"] == expected["n"]
    np.testing.assert_allclose([model["coef"][c] for c in model["covariates"]],
                               [expected["coef"][c] for c in model["covariates"]], rtol=1e-9)
    assert all(np.isfinite(model["hazard_ratio"][c]) for c in model["covariates"])
