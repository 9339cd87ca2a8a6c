"""The site's disclosure ledger stops differencing: the issue's attacks, sent through the
real handlers (`client.handlers.serve`), are refused and audited; the project's own
protocols (folds sized per site) pass it; and the rules in `shared.disclosure` equal a
direct computation on Python sets."""

from __future__ import annotations

import json
from itertools import combinations, pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from client.handlers import serve
from client.site.session import clear_sessions
from server.core.rounds import pack
from shared import cox, disclosure, schema, standardize
from shared.folds import site_fold_count, site_folds
from tests.splits import gbsg2, wisconsin

DIFFERENCE = ("differs from an earlier release of the same statistic by fewer than "
              "min_difference (10) patients")


def write_site(root: Path, rows: pd.DataFrame, *, features: pd.DataFrame | None = None,
               name: str = "site-a", **privacy: object) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    policy = {"min_patients": 10, "min_cell_count": 1, **privacy}
    (folder / "site.yaml").write_text(yaml.safe_dump(
        {"site_id": name, "roles": ["train", "survival"], "time_unit": "days",
         "privacy": policy}))
    rows.to_csv(folder / "clinical.csv", index=False)
    if features is not None:
        features.to_csv(folder / "features.csv", index=False)
    clear_sessions()
    return folder


def set_policy(folder: Path, **privacy: object) -> None:
    config = yaml.safe_load((folder / "site.yaml").read_text())
    config["privacy"].update(privacy)
    (folder / "site.yaml").write_text(yaml.safe_dump(config))
    clear_sessions()


def audit(folder: Path) -> list[dict]:
    return [json.loads(line) for line in
            (folder / "audit" / "egress.jsonl").read_text().splitlines()]


def wisconsin_site(root: Path, n: int, **privacy: object) -> tuple[Path, list[str]]:
    frame = wisconsin().iloc[:n].copy()
    frame.insert(0, "patient_id", [f"w{i:04d}" for i in range(n)])
    names = [c for c in frame.columns if c not in ("patient_id", "label")][:6]
    folder = write_site(root, frame[["patient_id", "label"]],
                        features=frame[["patient_id", *names]], **privacy)
    return folder, names


def columns(folder: Path, names: list[str], cv_folds: int = 10) -> dict:
    base = {"task": "label", "names": names, "cv-folds": cv_folds, "seed": 1}
    assert serve(folder, schema.RADIOMICS_EXTRACT, {"task": "label"}, "r1")["status"] == "ok"
    return serve(folder, schema.RADIOMICS_COLUMNS, base, "r1")


def standardize_sums(folder: Path, **rows: object) -> dict:
    query = {**standardize.Standardize().query(), **rows}
    return serve(folder, schema.RADIOMICS_STEP, pack({"task": "label"}, {"s": query}), "r1")


# --------------------------------------------------------------------------- attacks


def test_a_standardization_over_all_rows_then_all_but_a_small_fold(tmp_path: Path) -> None:
    """39 patients, cv-folds 10: folds of ~4 drawn while min_difference was 3; the hospital
    then raises it to 10. Sums over all rows, then over all rows but fold 0: refused."""
    folder, names = wisconsin_site(tmp_path, 39, min_patients=10, min_difference=3)
    assert columns(folder, names)["rows.folds"] == 10  # ⌊39 / 3⌋ ≥ 10
    set_policy(folder, min_difference=10)
    whole = standardize_sums(folder, rows="train")
    assert "s.sum" in whole and "refused.s" not in whole
    fold = standardize_sums(folder, rows="train-fold", fold=0)
    assert fold["status"] == "ok" and "s.sum" not in fold and "s.n" not in fold
    assert fold["refused.s"].startswith(DIFFERENCE)
    record = audit(folder)[-1]
    assert record["refused"]["s"] == fold["refused.s"]
    assert record["ledger"]["refused"] == 1 and not any(k.startswith("s.") for k in record["keys"])
    # columns other than the first fit's do not get around it: they overlap
    other = standardize_sums(folder, rows="train-fold", fold=0, columns=[0, 1])
    assert other["refused.s"].startswith(DIFFERENCE)


def test_a_control_the_same_sums_pass_when_the_fold_is_large_enough(tmp_path: Path) -> None:
    folder, names = wisconsin_site(tmp_path, 39, min_patients=10, min_difference=3)
    columns(folder, names)
    assert "s.sum" in standardize_sums(folder, rows="train")
    assert "s.sum" in standardize_sums(folder, rows="train-fold", fold=0)


def test_own_folds_are_sized_so_that_the_cv_fit_passes(tmp_path: Path) -> None:
    """The default min_difference (= min_patients 10) at 39 patients: 3 folds of ≥ 10, and
    sums over all rows and over every all-but-one-fold (and the study's empty folds) pass."""
    folder, names = wisconsin_site(tmp_path, 39, min_patients=10)
    assert columns(folder, names)["rows.folds"] == 3
    for rows in [{"rows": "train"}, *({"rows": "train-fold", "fold": k} for k in range(10))]:
        reply = standardize_sums(folder, **rows)
        assert "s.sum" in reply, (rows, reply.get("refused.s"))
    assert sum(r["ledger"]["checked"] for r in audit(folder)) >= 11


def test_b_subgroup_whose_complement_is_two_patients(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 40
    ids = [f"p{i:03d}" for i in range(n)]
    clinical = pd.DataFrame({"patient_id": ids, "label": rng.integers(0, 2, n),
                             "menopause": ["post"] * (n - 2) + ["pre"] * 2})
    folder = write_site(tmp_path, clinical)
    pd.DataFrame({"patient_id": ids, "model": "m_a", "score": rng.random(n).round(3)}
                 ).to_csv(folder / "predictions.csv", index=False)
    clear_sessions()
    reply = serve(folder, schema.VALIDATION_SCORES,
                  {"task": "label", "needs": "predictions", "bins": 20,
                   "subgroups": ["menopause"]}, "r1")
    assert reply["status"] == "ok"
    # released groups first, then those withheld
    assert list(reply["m0.groups"]) == ["all", "menopause=pre", "menopause=post"]
    assert "m0.g0.count0" in reply  # all patients
    assert "min_patients" in reply["refused.m0.g1"]  # the 2 themselves
    # checked before it is computed: withheld, as the ledger would refuse it
    assert reply["refused.m0.g2"] == ("withheld before release: its patients differ from "
                                      "those of 'all' by fewer than min_difference (10)")
    assert "m0.g2.count0" not in reply
    assert audit(folder)[-1]["refused"]["m0.g2"] == reply["refused.m0.g2"]


def test_b_km_group_of_all_but_two_patients(tmp_path: Path) -> None:
    frame = gbsg2().iloc[:40]
    clinical = pd.DataFrame({"patient_id": [f"g{i:03d}" for i in range(40)],
                             "label": (frame["tgrade"] == "III").astype(int).to_numpy(),
                             "dfs_time": frame["time"].to_numpy(),
                             "dfs_event": frame["cens"].to_numpy(),
                             "arm": ["a"] * 38 + ["b"] * 2})
    folder = write_site(tmp_path, clinical)
    reply = serve(folder, schema.SURVIVAL_SETUP, {"task": "", "needs": "survival",
                                                  "group": "arm"}, "r1")
    assert "km.all.at_risk" in reply
    assert reply["refused.km.g0"].startswith(DIFFERENCE)


def test_b_a_covariate_missing_for_one_patient(tmp_path: Path) -> None:
    """The Cox cohort (patients with every covariate) of all but one patient: its event
    times next to the Kaplan–Meier table of all would date that patient's event."""
    frame = gbsg2().iloc[:40]
    age = frame["age"].astype(float).to_numpy()
    age[7] = np.nan
    clinical = pd.DataFrame({"patient_id": [f"m{i:03d}" for i in range(40)], "label": 0,
                             "dfs_time": frame["time"].to_numpy(),
                             "dfs_event": frame["cens"].to_numpy(), "age": age})
    folder = write_site(tmp_path, clinical)
    reply = serve(folder, schema.SURVIVAL_SETUP, {"task": "", "needs": "survival",
                                                  "covariates": ["age"]}, "r1")
    assert "km.all.at_risk" in reply and "design.age.sum" not in reply  # over the Cox cohort
    assert reply["refused.cox.setup"].startswith(DIFFERENCE)
    assert reply["refused.design.age"].startswith(DIFFERENCE)


def test_c_the_same_query_in_a_later_run_over_one_patient_fewer(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 40
    clinical = pd.DataFrame({"patient_id": [f"c{i:03d}" for i in range(n)],
                             "label": [0] * 20 + [1] * 20, "age": rng.integers(30, 80, n)})
    folder = write_site(tmp_path, clinical)
    query = {"task": "label", "covariates": ["age"]}
    first = serve(folder, schema.COHORT_SUMS, query, "run-1")
    assert "numeric.age.g0.sum" in first and "numeric.age.g1.sum" in first
    write_site(tmp_path, clinical.drop(index=3))  # one label-0 patient left the table
    again = serve(folder, schema.COHORT_SUMS, query, "run-2")
    assert again["refused.numeric.age.g0"].startswith(DIFFERENCE)
    assert again["refused.labels"].startswith(DIFFERENCE)
    assert "numeric.age.g1.sum" in again  # the unchanged group: the same set again
    assert audit(folder)[-1]["run_id"] == "run-2"
    assert set(audit(folder)[-1]["refused"]) == {"numeric.age.g0", "labels", "integer.age"}


def test_d_km_tables_with_shifted_time_bins(tmp_path: Path) -> None:
    """A server cannot shift the site's bins (the time policy refuses the query); a
    hospital that changes its time_bin between runs to one that shifts the old grid is
    refused by the ledger, and one that coarsens it to a multiple is not."""
    frame = gbsg2().iloc[:60]
    clinical = pd.DataFrame({"patient_id": [f"k{i:03d}" for i in range(60)],
                             "label": 0, "dfs_time": frame["time"].to_numpy(),
                             "dfs_event": frame["cens"].to_numpy()})
    folder = write_site(tmp_path, clinical, time_bin=30)
    base = {"task": "", "needs": "survival"}
    assert "km.all.time" in serve(folder, schema.SURVIVAL_SETUP, base, "r1")
    shifted = serve(folder, schema.SURVIVAL_SETUP, {**base, "time_bin": 45}, "r1")
    assert shifted["status"] == schema.STATUS_REFUSED and "time_bin 30" in shifted["reason"]
    assert audit(folder)[-1]["status"] == schema.STATUS_REFUSED
    set_policy(folder, time_bin=45)
    moved = serve(folder, schema.SURVIVAL_SETUP, base, "r2")
    assert "km.all.time" not in moved
    assert "shifts an earlier one (bin 30 → bin 45)" in moved["refused.km.all"]
    assert audit(folder)[-1]["refused"]["km.all"] == moved["refused.km.all"]
    set_policy(folder, time_bin=90)
    assert "km.all.time" in serve(folder, schema.SURVIVAL_SETUP, base, "r3")


def test_the_ledger_outlives_the_process_and_names_no_patient(tmp_path: Path) -> None:
    test_c_the_same_query_in_a_later_run_over_one_patient_fewer(tmp_path)
    text = (tmp_path / "site-a" / "audit" / "egress.jsonl").read_text()
    assert "c003" not in text and (tmp_path / "site-a" / "audit" / "disclosures.sqlite").is_file()


# --------------------------------------------------------------------------- folds


@pytest.mark.parametrize("n,min_size", [(39, 10), (39, 3), (100, 10), (25, 10), (19, 10)])
def test_site_folds_hold_min_size_patients(n: int, min_size: int) -> None:
    y = np.r_[np.zeros(n - n // 3), np.ones(n // 3)].astype(int)
    folds, k = site_folds(y, 10, 4, "site-x", min_size)
    assert k == site_fold_count(n, 10, min_size) == max(2, min(10, n // min_size))
    sizes = np.bincount(folds, minlength=k)
    assert len(sizes) == k and (n < 2 * min_size or sizes.min() >= min_size)


# --------------------------------------------------------------------------- the rules


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sets(st.integers(0, 40)), min_size=1, max_size=6), st.integers(1, 12))
def test_too_close_equals_python_sets(sets: list[set[int]], d: int) -> None:
    *earlier, new = sets
    expect = [len(new ^ t) for t in earlier if 0 < len(new ^ t) < d]
    got = disclosure.too_close(disclosure.bitset(new), map(disclosure.bitset, earlier), d)
    assert got == (min(expect) if expect else None)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=40), st.integers(1, 8),
       st.sampled_from([0.0, 7.0, 30.0]))
def test_coarsened_cox_bin_leaves_no_small_risk_set_difference(times: list[int], d: int,
                                                               base: float) -> None:
    t = np.asarray(times, dtype=float)
    step = disclosure.coarsened_time_bin(t, base, d)
    if step is None:
        assert len(t) < d or all(  # no multiple up to the limit works
            np.unique(np.ceil(t / (m * (base or 1))), return_counts=True)[1].min() < d
            for m in range(1, 1001))
        return
    binned = np.ceil(t / step) * step
    grid = np.unique(np.r_[binned, binned + 0.5, [0.0, 1e9]])  # any global grid
    for lo, hi in pairwise(grid):  # patients leaving in (lo, hi]
        left = np.sum((binned >= lo) & (binned < hi))
        assert left == 0 or left >= d
    assert disclosure.small_risk_set_differences(binned, grid, d) == 0


def test_risk_set_leavers_equal_python_sets() -> None:
    t = np.array([5, 5, 8, 12, 12, 12, 20.0])
    grid = np.array([5, 9, 12, 30.0])
    sets = [set(range(len(t)))] + [{i for i in range(len(t)) if t[i] >= g} for g in grid]
    expect = [len(a - b) for a, b in pairwise(sets)]
    assert disclosure.risk_set_leavers(t, grid).tolist() == expect == [0, 3, 0, 4]
    assert disclosure.small_risk_set_differences(t, grid, 4) == 1


@pytest.mark.parametrize("a,b,ok", [(30, 30, True), (30, 90, True), (30, 45, False),
                                    (0, 30, False),
                                    (np.arange(0, 101, 10.0), np.arange(0, 101, 5.0), True),
                                    (np.arange(0, 101, 10.0), np.arange(5, 106, 10.0), False),
                                    (np.arange(0, 101, 10.0), np.array([40, 42, 44, 50.0]), True)])
def test_nested_grids(a: object, b: object, ok: bool) -> None:
    assert disclosure.nested(a, b) is ok and disclosure.nested(b, a) is ok


def test_every_pair_of_folds_differs_by_at_least_min_difference() -> None:
    y = np.r_[np.zeros(30), np.ones(17)].astype(int)
    folds, k = site_folds(y, 10, 2, "s", 10)
    sets = [set(np.flatnonzero(folds != f)) for f in range(k)] + [set(range(len(y)))]
    assert all(len(a ^ b) >= 10 for a, b in combinations(sets, 2))


# --------------------------------------------------------------------------- Cox risk sets


def test_cox_risk_sets_under_a_policy_that_forbids_small_differences(tmp_path: Path) -> None:
    """site-1 sets allow_risk_set_differences: false. Its Cox times are grouped into runs
    of ≥ 10 patients with 0 or ≥ 3 deaths each (shared.cox.released_times), the pooled fit
    equals lifelines on the pooled rows with site-1's times so grouped, site-1 releases no
    small difference and the other sites' count is theirs."""
    from lifelines import CoxPHFitter

    from server.workflow import run_study
    from simulation.in_process import InProcessTransport
    from tests.test_survival_stage import config, split
    from tests.test_survival_stage import write_site as survival_site
    from tests.test_survival_stats import LIFELINES_TIGHT

    parts = split()
    folders = [survival_site(tmp_path, f"site-{i + 1}", p, allow_risk_set_differences=i != 0)
               for i, p in enumerate(parts)]
    terms = ("pnodes", "tsize", "age")
    results = run_study(InProcessTransport(folders),
                        config(tmp_path, survival_covariates=terms, stepwise="none"))
    model = results["survival"]["cox"]
    t1 = np.ceil(parts[0].dfs_time.to_numpy(float) / 30) * 30
    # site-1's times as it releases them: runs of ≥ 10 patients, 0 or ≥ 3 deaths (issue 25)
    released = cox.released_times(t1, parts[0].dfs_event.to_numpy(), np.zeros((len(t1), 0)),
                                  10, 3)
    assert np.unique(released, return_counts=True)[1].min() >= 10
    assert model["risk_sets"]["time_bin"] == {"site-1": 30, "site-2": 30, "site-3": 30}
    small = model["risk_sets"]["small_differences"]
    assert small["site-1"] == 0 and small["site-2"] > 0 and small["site-3"] > 0
    grid = np.unique(np.concatenate(
        [released[parts[0].dfs_event.to_numpy() == 1]]
        + [np.ceil(p.dfs_time[p.dfs_event == 1] / 30) * 30 for p in parts[1:]]))
    own = np.ceil(parts[1].dfs_time.to_numpy(float) / 30) * 30
    assert small["site-2"] == disclosure.small_risk_set_differences(own, grid, 10)

    rows = pd.concat(parts, ignore_index=True)
    times = np.concatenate([released]
                           + [np.ceil(p.dfs_time / 30) * 30 for p in parts[1:]])
    frame = pd.DataFrame({"T": times, "E": rows.dfs_event,
                          **{n: rows[n].astype(float) for n in terms}})
    fit = CoxPHFitter().fit(frame, "T", "E", fit_options=LIFELINES_TIGHT)
    for name in terms:
        assert model["coef"][name] == pytest.approx(fit.params_[name], rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------- a whole study


def test_a_study_passes_the_ledgers_and_reports_them(tmp_path: Path) -> None:
    """The radiomics (10 CV folds asked, sites of 40–80 patients) and validation stages
    under the default policy: every statistic computed from patients is compared by its
    site's ledger (none unchecked), none is refused, and results and report say so."""
    from server.workflow import run_study
    from shared.config import StudyConfig, stage_settings
    from simulation.in_process import InProcessTransport
    from tests.splits import non_iid_split

    frame = wisconsin().iloc[:180].copy()
    frame.insert(0, "patient_id", [f"w{i:04d}" for i in range(len(frame))])
    names = [c for c in frame.columns if c not in ("patient_id", "label")][:10]
    folders = [write_site(tmp_path / "sites", p[["patient_id", "label"]], name=f"site-{i + 1}",
                          features=p[["patient_id", *names]])
               for i, p in enumerate(non_iid_split(frame, by="mean area", n_sites=3, seed=2))]
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label",
                         stages=("radiomics", "validation"),
                         settings=stage_settings({"cv-folds": 10, "seed": 3}))
    results = run_study(InProcessTransport(folders), config)
    assert results["radiomics"]["sites"]["site-1"]["status"] == "ok"
    ledger = results["run"]["ledger"]
    assert ledger["refused"] == 0 and ledger["checked"] > 100, ledger["checked"]
    assert all(ledger["sites"][f"site-{i}"]["checked"] > 0 for i in (1, 2, 3))
    folds = results["radiomics"]["cv_folds_by_site"]["folds"]
    assert all(2 <= k <= 10 for k in folds.values())
    for folder in folders:
        records = [r for r in audit(folder) if "ledger" in r]
        assert records and all(r["ledger"]["unchecked"] == 0 for r in records), folder.name
    report = (tmp_path / "out" / "report.html").read_text()
    assert "Disclosure ledgers" in report and "No release was refused by a ledger" in report


def test_a_site_folder_made_again_starts_a_new_ledger(tmp_path: Path) -> None:
    """The ledger's open connection follows its file: a folder removed and made again in
    the same process (a re-simulated site) gets a fresh ledger, not the old one's ghost."""
    import shutil

    folder, names = wisconsin_site(tmp_path, 39, min_patients=10, min_difference=3)
    columns(folder, names)
    assert "s.sum" in standardize_sums(folder, rows="train")
    shutil.rmtree(folder)
    folder, names = wisconsin_site(tmp_path, 39, min_patients=10, min_difference=10)
    columns(folder, names)
    set_policy(folder, min_difference=3)
    assert "s.sum" in standardize_sums(folder, rows="train-fold", fold=0)
    assert (folder / "audit" / "disclosures.sqlite").is_file()
    set_policy(folder, min_difference=40)
    assert standardize_sums(folder, rows="train")["refused.s"].startswith(
        "differs from an earlier release of the same statistic by fewer than "
        "min_difference (40)")
