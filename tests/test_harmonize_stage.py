"""`harmonize = combat` through the radiomics stage (in-process transport, real site
folders): each site's harmonized table against neuroCombat on the pooled rows, an external
site against the direct computation, the ANOVA of site in results.json against scipy, and
the policy and bad-input paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from neuroCombat import neuroCombat
from scipy import stats

from server.core.transport import reply_from_payload, site_query
from server.stages import harmonize
from server.workflow import run_study
from shared import combat, schema
from shared.config import ConfigError, StudyConfig, stage_settings
from simulation.in_process import InProcessTransport
from tests.test_combat import FEATURES, scanner_sites


def write(root: Path, sites: list[pd.DataFrame], external: int = 0,
          min_patients: int = 10) -> list[Path]:
    folders = []
    for i, part in enumerate(sites):
        folder = root / f"site-{i + 1}"
        folder.mkdir(parents=True)
        roles = ["external"] if i >= len(sites) - external else ["train"]
        (folder / "site.yaml").write_text(yaml.safe_dump({
            "site_id": f"site-{i + 1}", "roles": roles, "time_unit": "days",
            "privacy": {"min_patients": min_patients, "min_cell_count": 1}}))
        ids = [f"s{i}p{j:03d}" for j in range(len(part))]
        pd.DataFrame({"patient_id": ids, "label": part["label"], "age": part["age"]}).to_csv(
            folder / "clinical.csv", index=False)
        features = part[FEATURES].copy()
        features.insert(0, "patient_id", ids)
        features.to_csv(folder / "features.csv", index=False)
        folders.append(folder)
    return folders


def study(folders: list[Path], out: Path, **extra: str) -> dict:
    config = StudyConfig(out_dir=str(out), task="label", stages=("radiomics",),
                         settings=stage_settings({"harmonize": "combat", "cv-folds": 3,
                                                  **extra}))
    return run_study(InProcessTransport(folders), config)


def harmonized(folder: Path) -> np.ndarray:
    table = pd.read_csv(folder / "harmonized" / "radiomics-in-process.csv")
    assert list(table.columns) == ["patient_id", *FEATURES]
    return table[FEATURES].to_numpy()


@pytest.mark.parametrize("extra, options, covariates", [
    ({}, {"eb": True, "parametric": True}, []),
    ({"combat-eb": "false", "combat-covariates": "age"}, {"eb": False}, ["age"]),
], ids=["eb", "no-eb-age"])
def test_the_sites_harmonized_tables_equal_neurocombat_and_the_anova_scipy(
        tmp_path: Path, extra: dict, options: dict, covariates: list[str]) -> None:
    sites = scanner_sites()
    folders = write(tmp_path / "sites", sites)
    results = study(folders, tmp_path / "out", **extra)
    block = results["radiomics"]["harmonization"]
    assert block["status"] == "ok" and block["method"] == "combat"
    frame = pd.concat(sites, ignore_index=True)
    covars = pd.DataFrame({"batch": np.repeat(np.arange(4), [len(s) for s in sites])})
    for c in covariates:
        covars[c] = frame[c].to_numpy()
    ref = neuroCombat(frame[FEATURES].to_numpy().T, covars, "batch",
                      continuous_cols=covariates, **options)["data"].T
    cuts = np.cumsum([len(s) for s in sites])[:-1]
    for folder, expected in zip(folders, np.split(ref, cuts), strict=True):
        scale = np.abs(expected).max(axis=0)
        np.testing.assert_allclose(harmonized(folder) / scale, expected / scale, atol=1e-6)
    effect = block["site_effect"]
    before = stats.f_oneway(*[s[FEATURES].to_numpy() for s in sites])
    after = stats.f_oneway(*np.split(ref, cuts))
    for when, test in (("before", before), ("after", after)):
        f = np.array([effect[when]["f"][n] for n in FEATURES])
        np.testing.assert_allclose(f, test.statistic, rtol=1e-6, atol=1e-9)
        assert effect[when]["n_site_dependent"] == int(np.sum(test.pvalue < 0.05))
    assert effect["before"]["n_site_dependent"] > effect["after"]["n_site_dependent"]
    report = (tmp_path / "out" / "report.html").read_text()
    assert (f"{effect['before']['n_site_dependent']} before, "
            f"{effect['after']['n_site_dependent']} after") in report
    assert (tmp_path / "out" / "radiomics_site_effect.png").stat().st_size > 1000
    # the stage's fits used the harmonized rows: its pooled means are ComBat's
    means = results["radiomics"]["standardization"]["mean"]
    np.testing.assert_allclose([means[n] for n in FEATURES], ref.mean(axis=0), rtol=1e-6)


def test_an_external_site_is_harmonized_against_the_training_fit(tmp_path: Path) -> None:
    sites = scanner_sites(5)
    folders = write(tmp_path / "sites", sites, external=1)
    results = study(folders, tmp_path / "out")
    block = results["radiomics"]["harmonization"]
    assert block["sites"] == [f"site-{i}" for i in range(1, 5)]
    assert block["external"] == ["site-5"]
    train_y = [s[FEATURES].to_numpy() for s in sites[:4]]
    xs = [combat.design(len(y), i, 4) for i, y in enumerate(train_y)]
    beta = np.linalg.lstsq(np.vstack(xs), np.vstack(train_y), rcond=None)[0]
    counts = np.vstack(xs).sum(axis=0)
    grand = counts @ beta / counts.sum()
    var = np.mean((np.vstack(train_y) - np.vstack(xs) @ beta) ** 2, axis=0)
    expected, _ = combat.local_adjustment(sites[4][FEATURES].to_numpy(),
                                          np.zeros((len(sites[4]), 0)),
                                          combat.ComBatFit(beta, grand, var))
    np.testing.assert_allclose(harmonized(folders[4]), expected, rtol=1e-9, atol=1e-9)
    assert "external" in results["radiomics"]["auc"]
    assert results["radiomics"]["sites"]["site-5"]["role"] == "external"


def test_one_training_site_maps_an_external_site_onto_its_own_scanner(
        tmp_path: Path) -> None:
    """Paper 1's design: train on Centre 1, validate on Centre 2. With one training site the
    pooled fit is that site's own mean and variance, and the external site is moved onto
    them; the ANOVA of the two sites' features loses its site effect."""
    sites = scanner_sites(2)
    folders = write(tmp_path / "sites", sites, external=1)
    results = study(folders, tmp_path / "out")
    block = results["radiomics"]["harmonization"]
    assert block["status"] == "ok" and block["sites"] == ["site-1"]
    y = sites[0][FEATURES].to_numpy()
    fit = combat.ComBatFit(y.mean(axis=0, keepdims=True), y.mean(axis=0), y.var(axis=0))
    expected, _ = combat.local_adjustment(sites[1][FEATURES].to_numpy(),
                                          np.zeros((len(sites[1]), 0)), fit)
    np.testing.assert_allclose(harmonized(folders[1]), expected, rtol=1e-9, atol=1e-9)
    effect = block["site_effect"]
    assert effect["before"]["n_site_dependent"] > 20
    assert effect["after"]["n_site_dependent"] < effect["before"]["n_site_dependent"] / 4


def test_a_site_whose_policy_refuses_the_sums_skips_combat_with_the_reason() -> None:
    class Refusing:
        def ask(self, action, queries, sites):
            assert action == schema.RADIOMICS_COMBAT
            out = {}
            for s in sites:
                q = queries[s]
                x = combat.design(12, int(q["batch"]), 2)
                sums = combat.local_design_sums(np.ones((12, 2)), x)
                payload = ({"status": "ok", "refused.sums": "fewer than min_patients"}
                           if s == "b" else {"status": "ok", "sums.xtx": sums["xtx"],
                                             "sums.xty": sums["xty"]})
                out[s] = reply_from_payload(s, payload)
            return out

    block = harmonize.run_combat(Refusing(), {}, ["a", "b"], [], ["f1", "f2"],
                                 np.arange(2), harmonize.Options())
    assert block["status"] == "skipped"
    assert block["reason"] == "b refused the ComBat sums: fewer than min_patients"


def test_combat_with_a_missing_covariate_names_site_column_and_patient(tmp_path: Path) -> None:
    sites = scanner_sites()
    folders = write(tmp_path / "sites", sites)
    clinical = pd.read_csv(folders[1] / "clinical.csv")
    clinical.loc[3, "age"] = np.nan
    clinical.to_csv(folders[1] / "clinical.csv", index=False)
    results = study(folders, tmp_path / "out", **{"combat-covariates": "age"})
    status = results["radiomics"]["sites"]["site-2"]
    assert status["status"] == "failed"  # it answered with an error: not gone (issue 27)
    assert "site-2" in status["reason"] and "'age'" in status["reason"]
    assert "patient" in status["reason"]
    assert results["radiomics"]["harmonization"]["sites"] == ["site-1", "site-3", "site-4"]


def test_the_task_label_is_refused_as_a_combat_covariate(tmp_path: Path) -> None:
    folders = write(tmp_path / "sites", scanner_sites())
    with pytest.raises(ConfigError, match="label"):
        study(folders, tmp_path / "out", **{"combat-covariates": "age,label"})


class AdjustElsewhere(InProcessTransport):
    """ComBat's adjust served as by another ClientApp process (Flower may run each message
    in its own): a fresh session, whose in-memory rows this process never sees."""

    def ask(self, action, query, sites):
        if action != schema.RADIOMICS_COMBAT or site_query(query, next(iter(sites)))[
                "step"] != "adjust":
            return super().ask(action, query, sites)
        from client import handlers
        from client.site import session

        def fresh(root, task, needs=("clinical",)):
            return session._open_session.__wrapped__(root, task, needs,
                                                     session.folder_stamp(Path(root)))

        saved = handlers.open_session
        handlers.open_session = fresh
        try:
            return super().ask(action, query, sites)
        finally:
            handlers.open_session = saved


def test_the_rows_after_combat_reach_a_process_that_held_the_rows_before(
        tmp_path: Path) -> None:
    sites = scanner_sites()
    folders = write(tmp_path / "sites", sites)
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label", stages=("radiomics",),
                         settings=stage_settings({"harmonize": "combat", "cv-folds": 3}))
    results = run_study(AdjustElsewhere(folders), config)
    frame = pd.concat(sites, ignore_index=True)
    covars = pd.DataFrame({"batch": np.repeat(np.arange(4), [len(s) for s in sites])})
    ref = neuroCombat(frame[FEATURES].to_numpy().T, covars, "batch")["data"].T
    means = results["radiomics"]["standardization"]["mean"]
    np.testing.assert_allclose([means[n] for n in FEATURES], ref.mean(axis=0), rtol=1e-6)


def test_a_feature_missing_at_a_training_site_is_left_as_extracted() -> None:
    """pyradiomics leaves a feature undefined for some tumours: its pooled sums are not
    defined, so it stays as extracted, named, and the adjust round carries only the others."""
    rng = np.random.default_rng(0)
    ys = {"a": rng.normal(size=(15, 3)), "b": rng.normal(2, 1, size=(12, 3))}
    ys["b"][4, 1] = np.nan
    asked = []

    class Sites:
        def ask(self, action, queries, sites):
            out = {}
            for s in sites:
                q, y = queries[s], ys[s][:, np.asarray(queries[s]["columns"])]
                asked.append((q["step"], list(q["columns"])))
                x = combat.design(len(y), int(q["batch"]), 2)
                fit = combat.ComBatFit(np.asarray(q.get("beta", np.zeros((2, 3)))),
                                       np.asarray(q.get("grand_mean", np.zeros(3))))
                payload = {"sums": {f"sums.{k}": v for k, v in
                                    combat.local_design_sums(y, x).items()},
                           "residuals": {"residuals.ssr":
                                         combat.local_residual_squares(y, x, fit)},
                           "adjust": {f"{w}.{k}": v for w in ("before", "after")
                                      for k, v in combat.local_site_moments(y).items()},
                           }[q["step"]]
                out[s] = reply_from_payload(s, {"status": "ok", **payload})
            return out

    block = harmonize.run_combat(Sites(), {}, ["a", "b"], [], ["f0", "f1", "f2"],
                                 np.arange(3), harmonize.Options())
    assert block["status"] == "ok" and list(block["not_harmonized"]) == ["f1"]
    assert block["features"] == 2
    assert [c for step, c in asked if step == "adjust"] == [[0, 2], [0, 2]]


def test_a_missing_value_at_a_site_stays_missing_and_spoils_nothing_else() -> None:
    """A site's own estimates skip its missing values (an external site may miss a value
    the training sites have): the cell stays missing; its feature's other cells and every
    other feature are harmonized."""
    sites = scanner_sites(2)
    y = sites[1][FEATURES].to_numpy()
    train = sites[0][FEATURES].to_numpy()
    fit = combat.ComBatFit(train.mean(axis=0, keepdims=True), train.mean(axis=0),
                           train.var(axis=0))
    whole, _ = combat.local_adjustment(y, np.zeros((len(y), 0)), fit)
    y[3, 2] = np.nan
    holed, est = combat.local_adjustment(y, np.zeros((len(y), 0)), fit)
    assert np.isnan(holed[3, 2]) and np.isfinite(np.delete(holed.ravel(), 3 * y.shape[1] + 2)).all()
    assert np.isfinite(est.a_prior) and np.isfinite(est.gamma_star).all()
    others = [j for j in range(y.shape[1]) if j != 2]
    np.testing.assert_allclose(holed[:, others], whole[:, others], rtol=0.05)


def test_a_site_whose_policy_withholds_its_moments_is_still_harmonized() -> None:
    """The adjust round's moments are a statistic like any other: a site may withhold
    them. It has harmonized its rows all the same; it is only missing from the ANOVA."""
    rng = np.random.default_rng(1)
    ys = {s: rng.normal(i, 1 + i, size=(14, 2)) for i, s in enumerate("abc")}

    class Sites:
        def ask(self, action, queries, sites):
            out = {}
            for s in sites:
                q, y = queries[s], ys[s]
                x = combat.design(len(y), int(q["batch"]), 3)
                if q["step"] == "sums":
                    payload = {f"sums.{k}": v for k, v in combat.local_design_sums(y, x).items()}
                elif q["step"] == "residuals":
                    fit = combat.ComBatFit(np.asarray(q["beta"]), np.asarray(q["grand_mean"]))
                    payload = {"residuals.ssr": combat.local_residual_squares(y, x, fit)}
                elif s == "c":
                    payload = {"refused.before": "policy", "refused.after": "policy"}
                else:
                    payload = {f"{w}.{k}": v for w in ("before", "after")
                               for k, v in combat.local_site_moments(y).items()}
                out[s] = reply_from_payload(s, {"status": "ok", **payload})
            return out

    block = harmonize.run_combat(Sites(), {}, ["a", "b", "c"], [], ["f0", "f1"],
                                 np.arange(2), harmonize.Options())
    assert block["status"] == "ok" and block["sites"] == ["a", "b", "c"]
    assert block["site_effect"]["sites"] == ["a", "b"]
    assert block["site_effect"]["sites_missing"] == ["c"]
