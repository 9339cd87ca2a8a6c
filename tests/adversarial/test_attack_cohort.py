"""Issue 25, attack class 3 (cohort histograms): a hostile coordinator calls a default-policy
site's handlers (`client.handlers.serve`) directly and reads its patients' (age, HER2 class)
pairs out of the cohort stage's histogram round.

The site: `simulation.cohort` (38 patients, seed 4), its site.yaml's privacy block empty
(min_patients 10, min_cell_count 3, min_difference 10). What an attacker learns is
compared with clinical.csv, not with refusal strings.

The attack: a chain of nested unit-bin grids of age, the k-th starting its unit bins at
age 20 + k (every grid a coarsening of the first, which the ledger let pass). In each
grid the first bin is (−∞, cut): when a label group has ≥ min_cell_count patients below
the cut, its first cell is that bin alone and its count is the number of patients of the
group younger than the cut. The chain gives each group's age distribution at every cut,
so the count of each age in each group: the HER2 class of every patient with an age no
one else at the site has.

Before the fix (commit 862bbee, rerun in a worktree) it recovered the HER2 class of 5 of
the 14 patients with a unique age, every one it named right (a cut is read only where a
group has ≥ 3 patients on each side). A second attack read each merged cell's first and
last bin, the ages of its youngest and oldest patient: 22 (age, class) pairs from one
grid, all 22 real patients'.

After the fix: a site bins in at most n / min_cell_count bins (`shared.roc.site_edges`),
a merged cell reports its edges (`shared.roc.tile`), and over the same patients the
ledger releases one grid only (`client.stages.validation.pinned`): 0 classes, 0 pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.handlers import serve
from client.site.session import clear_sessions
from shared import schema
from shared.labels import LabelError, task_label
from tests.adversarial import simulated_site

TASK = "her2-positive"
YOUNGEST, OLDEST = 20, 90


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    return simulated_site(tmp_path)


def truth(site: Path) -> pd.DataFrame:
    """clinical.csv's (age, label) of every patient with a HER2-positive label."""
    rows = pd.read_csv(site / "clinical.csv", dtype={"her2_ish": str})

    def label(ihc: object, ish: object) -> float:
        try:
            return float(task_label(TASK, ihc, None if pd.isna(ish) else ish, None))
        except LabelError:
            return np.nan

    rows["label"] = [label(i, s) for i, s in zip(rows.her2_ihc, rows.her2_ish, strict=True)]
    return rows.dropna(subset=["label"]).astype({"label": int})


def histogram(site: Path, edges: np.ndarray) -> dict | None:
    reply = serve(site, schema.COHORT_HISTOGRAMS,
                  {"task": TASK, "covariates": ["age"], "edges.age": list(edges)}, "attack")
    return reply if reply.get("status") == schema.STATUS_OK else None


def cells(reply: dict, g: int) -> list[tuple[int, int, int]]:
    keys = [f"hist.age.g{g}.{k}" for k in ("first", "last", "count")]
    if not all(k in reply for k in keys):
        return []
    return list(zip(*(np.asarray(reply[k]).tolist() for k in keys), strict=True))


def chain_attack(site: Path) -> dict[int, dict[int, int]]:
    """Per label group, the number of patients of each age the chain of grids gives."""
    below: list[dict[int, int]] = [{}, {}]  # per group: cut → patients younger than it
    for cut in range(YOUNGEST, OLDEST + 1):
        edges = np.r_[-np.inf, np.arange(cut - 0.5, OLDEST + 1), np.inf]
        reply = histogram(site, edges)
        for g in (0, 1):
            for first, last, count in cells(reply or {}, g):
                if first == 0 and last == 0:  # the cell is (−∞, cut) alone
                    below[g][cut] = count
    return [{a: below[g][a + 1] - below[g][a] for a in below[g] if a + 1 in below[g]}
            for g in (0, 1)]


def classes_learned(counts: list[dict[int, int]], rows: pd.DataFrame) -> tuple[int, int, int]:
    """(right, wrong, unique): of the patients whose age no one else at the site has, how
    many the attacker gives the right and the wrong class (an age found in one group only)."""
    unique = rows[~rows.age.duplicated(keep=False)]
    right = wrong = 0
    for age, label in zip(unique.age, unique.label, strict=True):
        known = [g for g in (0, 1) if age in counts[g]]
        if len(known) == 2 and (counts[0][age] > 0) != (counts[1][age] > 0):
            guess = 0 if counts[0][age] > 0 else 1
            right, wrong = right + (guess == label), wrong + (guess != label)
    return right, wrong, len(unique)


def test_3a_a_chain_of_nested_grids_gives_no_patients_class(site: Path) -> None:
    rows = truth(site)
    right, wrong, unique = classes_learned(chain_attack(site), rows)
    assert unique == 14
    # 862bbee: right 5, wrong 0
    assert right == 0 and wrong == 0


def pairs_read_off_cell_ends(reply: dict | None, edges: np.ndarray) -> set[tuple[int, int]]:
    """(age, label) read off each cell's first and last bin, as the code before the fix
    defined them: the bins of the cell's youngest and oldest patient."""
    found = set()
    for g in (0, 1):
        for first, last, _ in cells(reply or {}, g):
            for b in (first, last):
                if np.isfinite(edges[b]) and np.isfinite(edges[b + 1]):
                    found.add((int(edges[b] + 0.5), g))
    return found


def test_3b_cells_say_nothing_finer_than_the_sites_resolution(site: Path) -> None:
    """The unit grid of ages 20 … 90 (71 bins and the two open ones). The site (37
    patients with a label, min_cell_count 3) bins in at most 37 // 3 = 12 of the 73 bins:
    every 7th edge of the server's (−∞, 25.5, 32.5, …). Moving every patient's age to the
    lowest age of her block (26 … 32, 33 … 39, …) must leave the reply as it was: the
    attacker learns nothing finer."""
    rows = truth(site)
    real = set(zip(rows.age.astype(int), rows.label, strict=True))
    edges = np.r_[-np.inf, np.arange(YOUNGEST - 0.5, OLDEST + 1), np.inf]
    reply = histogram(site, edges)
    claimed = pairs_read_off_cell_ends(reply, edges)
    clinical = pd.read_csv(site / "clinical.csv", dtype=str)
    age = clinical.age.astype(int)
    assert age.min() >= 26
    clinical["age"] = (26 + (age - 26) // 7 * 7).astype(str)
    clinical.to_csv(site / "clinical.csv", index=False)
    clear_sessions()
    moved = histogram(site, edges)
    # 862bbee: 22 (age, class) pairs read off the cell ends, all 22 real; the reply changed
    assert reply is not None and moved is not None
    for g in (0, 1):
        assert cells(reply, g) == cells(moved, g)
    assert len(claimed & real) < len(claimed)  # cell ends are block edges, not patients


def test_3c_one_grid_per_patient_set(site: Path) -> None:
    """Within the site's resolution a grid passes; a second grid over the same patients,
    however it relates to the first, is not released (the attacker learns one cut)."""
    rows = truth(site)
    cuts = []
    for cut in (45, 50, 55):
        edges = np.array([-np.inf, cut - 0.5, np.inf])
        reply = histogram(site, edges)
        for g in (0, 1):
            cuts += [(g, cut, c) for f, la, c in cells(reply or {}, g) if f == la == 0]
    # what was released is true: the count of the group below the cut
    for g, cut, count in cuts:
        assert count == int(np.sum((rows.label == g) & (rows.age < cut)))
    assert {cut for _, cut, _ in cuts} <= {45}
