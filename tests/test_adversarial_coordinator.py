"""A hostile coordinator against a default-policy site (issue 25): the index of the attacks.

Each attack class is a module `tests/adversarial/test_attack_<kind>.py`, written as it ran
against the code before issue 25 (its docstring says what it recovered at 862bbee) and
asserting that the attacker now learns nothing patient-level, compared with the site's
clinical.csv, features, images or score files. They are modules of their own because each
builds its own site (fixtures of one name, `site`, that differ). `pytest tests/adversarial`
runs them all; this module checks that every attack class of the issue has its module and
tests, so none is dropped unnoticed.

1. the clinical table from crafted Cox queries — test_attack_survival
2. feature rows and labels from the GLM rounds — test_attack_glm
3. cohort histograms (cell ends, nested grids) — test_attack_cohort
4. validation grids, moments and refinement — test_attack_validation
5. ledger bypasses (ignored keys, covariate completeness, run ids) — in 1, 2, 4 and 6, and
   tests/test_query_declarations.py
6. CNN rounds (batch 1, zeroed head, server-announced DP) — test_attack_training
7. paths and sizes from the run config — test_attack_paths (sizes: test_attack_survival)
8. an app the site did not approve — test_attack_sovereignty
"""

from __future__ import annotations

import importlib

import pytest

ATTACKS = {1: "survival", 2: "glm", 3: "cohort", 4: "validation", 6: "training",
           7: "paths", 8: "sovereignty"}
LEDGER_BYPASSES = {"survival": "completeness", "glm": "fold", "validation": "run",
                   "training": "train_id"}  # class 5, within the stage it targets


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_class_has_its_tests(attack: int) -> None:
    module = importlib.import_module(f"tests.adversarial.test_attack_{ATTACKS[attack]}")
    tests = [n for n in vars(module) if n.startswith("test_")]
    assert tests, f"attack class {attack} has no test"
    assert "862bbee" in (module.__doc__ or "") + "".join(
        getattr(module, n).__doc__ or "" for n in tests), \
        f"attack class {attack}: say what it recovered before issue 25"

