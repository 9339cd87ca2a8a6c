"""The survival stage through the in-process transport on site folders made from lifelines'
GBSG2 (task `label` = hormone therapy), against lifelines on the pooled binned rows; and the
site policy: time binning that a query cannot lower, min_patients, the event-count rule,
event queries only where allowed, only `survival` sites asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index

from client.handlers import serve
from server.workflow import run_study
from shared import cox, queries, schema
from shared.config import StudyConfig, stage_settings
from shared.kaplan_meier import bin_times
from simulation.in_process import InProcessTransport
from tests.splits import gbsg2, non_iid_split
from tests.test_survival_stats import LIFELINES_TIGHT, reference_stepwise

COVARIATES = ("label", "age", "tsize", "pnodes", "progrec", "estrec", "menostat", "tgrade")
TOL = 1e-6


def write_site(root: Path, site_id: str, rows: pd.DataFrame, roles: tuple[str, ...] = (
        "survival",), **privacy: object) -> Path:
    folder = root / site_id
    folder.mkdir(parents=True)
    # exact pooled Cox on the 30-day bins: these sites accept the risk-set differences
    # (the default releases Cox sums on a coarser step, client.stages.survival.cox_times)
    policy = {"min_patients": 10, "min_cell_count": 3, "time_bin": 30,
              "allow_event_queries": True, "allow_risk_set_differences": True, **privacy}
    (folder / "site.yaml").write_text(yaml.safe_dump(
        {"site_id": site_id, "roles": list(roles), "time_unit": "days", "privacy": policy}))
    rows.to_csv(folder / "clinical.csv", index=False)
    return folder


def gbsg2_rows() -> pd.DataFrame:
    frame = gbsg2()
    out = pd.DataFrame({"patient_id": [f"g{i:04d}" for i in range(len(frame))],
                        "label": (frame.horTh == "yes").astype(int),
                        "dfs_time": frame.time, "dfs_event": frame.cens})
    for name in COVARIATES[1:]:
        out[name] = frame[name]
    return out


def split(n_sites: int = 3, seed: int = 5) -> list[pd.DataFrame]:
    return non_iid_split(gbsg2_rows(), by="age", n_sites=n_sites, seed=seed)


def config(tmp_path: Path, **kw: object) -> StudyConfig:
    values = {"out_dir": str(tmp_path / "out"), "task": "label", "stages": ("survival",),
              "survival_group": "label", "survival_covariates": COVARIATES,
              "stepwise": "both", **kw}
    return StudyConfig(**values)


def pooled_reference(parts: list[pd.DataFrame], time_bin: float = 30) -> pd.DataFrame:
    rows = pd.concat(parts, ignore_index=True)
    return pd.DataFrame({
        "T": bin_times(rows.dfs_time.to_numpy(float), time_bin), "E": rows.dfs_event,
        "label": rows.label.astype(float), **{n: rows[n].astype(float) for n in COVARIATES[1:6]},
        "menostat=pre": (rows.menostat == "Pre").astype(float),
        "tgrade=ii": (rows.tgrade == "II").astype(float),
        "tgrade=iii": (rows.tgrade == "III").astype(float)})


def released_rows(parts: list[pd.DataFrame], time_bin: float = 30,
                  categorical: tuple[str, ...] = ()) -> pd.DataFrame:
    """The pooled rows with each site's Cox times (`T`) as a default-policy site releases
    them (client.stages.survival.cox_times): its bins grouped into runs of ≥ 10 patients with 0 or
    ≥ 3 deaths, and 0 or ≥ 3 of each level of the `categorical` covariates among both."""
    frames = []
    for rows in parts:
        times = bin_times(rows.dfs_time.to_numpy(float), time_bin)
        text = [rows[c].astype(str) for c in categorical]
        levels = [(values == level).to_numpy(float) for values in text
                  for level, count in values.value_counts().items() if count >= 3]
        released = cox.released_times(times, rows.dfs_event.to_numpy(),
                                      np.column_stack(levels) if levels
                                      else np.zeros((len(rows), 0)), 10, 3)
        assert released is not None
        frames.append(rows.assign(T=released, E=rows.dfs_event))
    return pd.concat(frames, ignore_index=True)


def lifelines_fit(frame: pd.DataFrame, columns: list[str]):
    from lifelines import CoxPHFitter

    return CoxPHFitter().fit(frame[[*columns, "T", "E"]], "T", "E", fit_options=LIFELINES_TIGHT)


def audit_types(folder: Path) -> list[str]:
    path = folder / "audit" / "egress.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line)["message_type"] for line in lines]


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp_path = tmp_path_factory.mktemp("survival")
    parts = split()
    folders = [write_site(tmp_path, f"site-{i + 1}", p) for i, p in enumerate(parts)]
    train_only = write_site(tmp_path, "site-9", parts[0].head(40), roles=("train",))
    results = run_study(InProcessTransport([*folders, train_only]), config(tmp_path))
    return {"results": results, "parts": parts, "folders": folders, "train_only": train_only,
            "out": tmp_path / "out"}


def test_kaplan_meier_and_logrank_equal_lifelines(exact_run: dict) -> None:
    surv = exact_run["results"]["survival"]
    assert exact_run["results"]["run"]["stages"]["survival"]["status"] == "ok"
    assert surv["time_bin"] == 30 and surv["time_unit"] == "days"
    ref = pooled_reference(exact_run["parts"])
    for key, rows in (("all", ref), ("label=0", ref[ref.label == 0]),
                      ("label=1", ref[ref.label == 1])):
        curve = surv["km"][key]
        fit = KaplanMeierFitter().fit(rows["T"], rows["E"])
        np.testing.assert_array_equal(curve["time"], fit.timeline)
        assert np.all(np.asarray(curve["time"]) % 30 == 0)
        np.testing.assert_array_equal(curve["at_risk"], fit.event_table["at_risk"])
        np.testing.assert_array_equal(curve["events"], fit.event_table["observed"])
        np.testing.assert_allclose(curve["survival"], fit.survival_function_.iloc[:, 0],
                                   rtol=TOL, atol=1e-12)
        ci = fit.confidence_interval_.to_numpy()
        np.testing.assert_allclose(curve["ci_lower"], ci[:, 0], rtol=TOL, atol=1e-12)
        np.testing.assert_allclose(curve["ci_upper"], ci[:, 1], rtol=TOL, atol=1e-12)
        assert curve["sites_missing"] == []
    a, b = ref[ref.label == 0], ref[ref.label == 1]
    test = logrank_test(a["T"], b["T"], a["E"], b["E"])
    assert surv["logrank"]["statistic"] == pytest.approx(test.test_statistic, rel=TOL)
    assert surv["logrank"]["p_value"] == pytest.approx(test.p_value, rel=TOL)


def test_cox_stepwise_and_exact_concordance_equal_lifelines(exact_run: dict) -> None:
    surv = exact_run["results"]["survival"]
    ref = pooled_reference(exact_run["parts"])
    columns = ["label", "age", "tsize", "pnodes", "progrec", "estrec", "menostat=pre",
               "tgrade=ii", "tgrade=iii"]
    full = lifelines_fit(ref, columns)
    model = surv["cox"]
    assert model["covariates"] == columns
    for key, expect in (("coef", full.params_), ("se", full.standard_errors_),
                        ("p_value", full.summary["p"]),
                        ("ci_lower", full.summary["exp(coef) lower 95%"]),
                        ("ci_upper", full.summary["exp(coef) upper 95%"])):
        np.testing.assert_allclose([model[key][c] for c in columns], expect, rtol=TOL)
    assert model["log_likelihood"] == pytest.approx(full.log_likelihood_, rel=TOL)
    assert model["aic"] == pytest.approx(full.AIC_partial_, rel=TOL)
    assert model["n"] == len(ref) and model["events"] == int(ref.E.sum())
    assert model["concordance_method"].startswith("exact")
    assert model["concordance"] == pytest.approx(full.concordance_index_, rel=1e-12)

    terms = {"label": ["label"], "menostat": ["menostat=pre"],
             "tgrade": ["tgrade=ii", "tgrade=iii"]}
    frame = ref.rename(columns={"label": "label_"})
    design = {t: terms.get(t, [t]) for t in COVARIATES}
    selected, path = _stepwise_reference(frame, design)
    step = surv["cox_stepwise"]
    assert step["selected"] == selected
    assert [(s["action"], s["covariate"] or "") for s in step["steps"]] == \
        [(a, t) for a, t, _ in path]
    final = lifelines_fit(ref, [c for t in selected for c in design[t]])
    np.testing.assert_allclose([step["coef"][c] for c in final.params_.index], final.params_,
                               rtol=TOL)
    assert step["concordance"] == pytest.approx(final.concordance_index_, rel=1e-12)


def _stepwise_reference(frame: pd.DataFrame, design: dict[str, list[str]]):
    """tests.test_survival_stats.reference_stepwise on this design (label = horTh)."""
    gb = frame.rename(columns={"T": "t", "E": "cens", "label_": "horTh_num"})
    gb["horTh"] = np.where(gb.horTh_num == 1, "yes", "no")
    gb["menostat"] = np.where(gb["menostat=pre"] == 1, "Pre", "Post")
    gb["tgrade"] = np.select([gb["tgrade=ii"] == 1, gb["tgrade=iii"] == 1], ["II", "III"], "I")
    names = {"label": "horTh"}
    selected, path = reference_stepwise(gb, [names.get(t, t) for t in design])
    back = {v: k for k, v in names.items()}
    return ([back.get(t, t) for t in selected],
            [(a, back.get(t, t), v) for a, t, v in path])


def test_only_survival_sites_are_asked_and_outputs_are_written(exact_run: dict) -> None:
    surv = exact_run["results"]["survival"]
    assert set(surv["sites"]) == {"site-1", "site-2", "site-3"}
    assert not [t for t in audit_types(exact_run["train_only"]) if "survival" in t]
    types = audit_types(exact_run["folders"][0])
    assert {"query.survival_setup", "query.survival_cox", "query.survival_events",
            "query.survival_pairs"} <= set(types)
    page = (exact_run["out"] / "report.html").read_text(encoding="utf-8")
    assert "survival_km.png" in page and "survival_forest.png" in page
    assert "Numbers at risk" in page
    for name in ("survival_km.png", "survival_forest.png"):
        assert (exact_run["out"] / name).stat().st_size > 5000
    saved = json.loads((exact_run["out"] / "results.json").read_text(encoding="utf-8"))
    assert set(saved["survival"]["cox"]) >= {"covariates", "coef", "se", "hazard_ratio",
                                             "ci_lower", "ci_upper", "p_value",
                                             "log_likelihood", "aic", "concordance", "n",
                                             "events"}
    assert {"selected", "steps"} <= set(saved["survival"]["cox_stepwise"])


def test_mixed_time_bins_fail_the_stage_with_a_clear_error(tmp_path: Path) -> None:
    parts = split()
    folders = [write_site(tmp_path, f"site-{i + 1}", p, time_bin=7 if i == 1 else 30)
               for i, p in enumerate(parts)]
    results = run_study(InProcessTransport(folders), config(tmp_path))
    stage = results["run"]["stages"]["survival"]
    assert stage["status"] == "failed"
    assert "disagree on privacy.time_bin" in stage["reason"]
    assert "site-1: 30, site-2: 7, site-3: 30" in stage["reason"]
    assert "survival" not in results


@pytest.mark.parametrize("action", [schema.SURVIVAL_SETUP, schema.SURVIVAL_COX,
                                    schema.SURVIVAL_HISTOGRAMS])
def test_a_query_for_raw_or_finer_times_is_refused(tmp_path: Path, action: str) -> None:
    rows = split()[0]
    folder = write_site(tmp_path, "site-1", rows)
    grid = np.unique(bin_times(rows.dfs_time[rows.dfs_event == 1].to_numpy(float), 30))
    base = {"task": "label", "needs": "survival", "covariates": ["age"], "terms": ["age"],
            "kind.age": "numeric", "center": np.zeros(1), "grid": grid,
            "betas": np.zeros((1, 1)), "beta": np.zeros(1), "time_edges": np.zeros(3),
            "score_edges": np.zeros(3)}
    declared = queries.QUERIES[action]
    base = {k: v for k, v in base.items() if declared.param(k) is not None}  # this action's keys
    for ask in ({"time_bin": 0}, {"time_bin": 15}, {"exact_times": True}):
        reply = serve(folder, action, {**base, **ask}, "r1")
        assert reply["status"] == schema.STATUS_REFUSED
        assert "time_bin 30" in reply["reason"]
        assert not any(k.endswith(".time") or k.endswith(".s0") for k in reply)
    audit = (folder / "audit" / "egress.jsonl").read_text(encoding="utf-8")
    record = json.loads(audit.splitlines()[-1])
    assert record["status"] == "refused" and record["keys"] == ["reason", "status"]
    assert serve(folder, action, {**base, "time_bin": 30}, "r1")["status"] == schema.STATUS_OK
    exact = write_site(tmp_path, "site-2", split()[1], time_bin=0)
    setup = {k: v for k, v in base.items()
             if queries.QUERIES[schema.SURVIVAL_SETUP].param(k) is not None}
    reply = serve(exact, schema.SURVIVAL_SETUP, {**setup, "time_bin": 0}, "r1")
    assert reply["status"] == schema.STATUS_OK


def test_released_times_are_binned_and_small_tables_are_refused(tmp_path: Path) -> None:
    rows = split()[0]
    folder = write_site(tmp_path, "site-1", rows)
    reply = serve(folder, schema.SURVIVAL_SETUP,
                  {"task": "label", "needs": "survival", "group": "tgrade"}, "r1")
    assert reply["status"] == schema.STATUS_OK
    assert (rows.dfs_time % 30 != 0).any()  # raw times are not on the grid …
    assert np.all(np.asarray(reply["km.all.time"]) % 30 == 0)  # … released ones are
    levels = reply["group.levels"]
    for i, level in enumerate(levels):
        n = int((rows.tgrade.str.lower() == level).sum())
        events = int(rows.dfs_event[rows.tgrade.str.lower() == level].sum())
        if n < 10:
            assert "min_patients (10)" in reply[f"refused.km.g{i}"]
        elif 0 < events < 3:
            assert "min_cell_count (3)" in reply[f"refused.km.g{i}"]
        else:
            assert f"km.g{i}.time" in reply
    tiny = write_site(tmp_path, "site-2", rows.head(9))  # fewer than min_patients in all
    reply = serve(tiny, schema.SURVIVAL_SETUP, {"task": "label", "needs": "survival"}, "r1")
    assert "min_patients (10)" in reply["refused.km.all"]
    two_events = rows.head(15).assign(dfs_event=[1, 1] + [0] * 13)
    reply = serve(write_site(tmp_path, "site-3", two_events), schema.SURVIVAL_SETUP,
                  {"task": "label", "needs": "survival", "covariates": ["age"]}, "r1")
    assert "min_cell_count (3)" in reply["refused.km.all"]
    assert "min_cell_count (3)" in reply["refused.cox.setup"]


def test_a_statistic_over_too_few_patients_leaves_its_site_out(tmp_path: Path) -> None:
    parts = split()
    few = parts[2].copy()
    few.loc[few.index[:8], "tgrade"] = "IV"  # a group of 8 < min_patients at this site only
    folders = [write_site(tmp_path, f"site-{i + 1}", p)
               for i, p in enumerate([parts[0], parts[1], few])]
    results = run_study(InProcessTransport(folders),
                        config(tmp_path, survival_group="tgrade",
                               survival_covariates=("age", "menostat:Pre"), stepwise="none"))
    km = results["survival"]["km"]
    assert km["tgrade=iv"]["sites_missing"] == ["site-3"]  # the only site with grade IV
    assert km["tgrade=iv"]["sites_used"] == []
    assert km["all"]["sites_missing"] == []
    def releases_every_group(rows: pd.DataFrame) -> bool:
        tables = rows.groupby("tgrade").dfs_event.agg(["size", "sum"])
        return bool(((tables["size"] >= 10) & ((tables["sum"] == 0) | (tables["sum"] >= 3)))
                    .all())

    complete = [f"site-{i + 1}" for i, p in enumerate([parts[0], parts[1], few])
                if releases_every_group(p)]
    assert "site-3" not in complete and complete
    assert results["survival"]["logrank"]["sites_used"] == complete
    assert "cox_stepwise" not in results["survival"]
    assert results["survival"]["cox"]["covariates"] == ["age", "menostat=post"]  # reference pre
    assert results["survival"]["design"]["reference"] == {"menostat": "pre"}
    reply = serve(folders[2], schema.SURVIVAL_SETUP,
                  {"task": "label", "needs": "survival", "group": "tgrade"}, "r1")
    index = list(reply["group.levels"]).index("iv")
    assert "min_patients (10)" in reply[f"refused.km.g{index}"]


def test_concordance_is_bounded_when_a_site_disallows_event_queries(tmp_path: Path) -> None:
    parts = split()
    folders = [write_site(tmp_path, f"site-{i + 1}", p, allow_event_queries=i != 0)
               for i, p in enumerate(parts)]
    results = run_study(InProcessTransport(folders),
                        config(tmp_path, survival_covariates=("pnodes", "tsize", "tgrade"),
                               stepwise="none"))
    model = results["survival"]["cox"]
    assert model["concordance_method"] == "histogram bound"
    ref = pooled_reference(parts)
    fit = lifelines_fit(ref, ["pnodes", "tsize", "tgrade=ii", "tgrade=iii"])
    scores = ref[list(fit.params_.index)].to_numpy() @ fit.params_.to_numpy()
    truth = concordance_index(ref["T"], -scores, ref["E"])
    low, high = model["concordance_bound"]
    assert low <= truth <= high and low <= model["concordance"] <= high
    assert high - low < 0.5
    types = audit_types(folders[0])
    assert "query.survival_events" not in types and "query.survival_histograms" in types
    reply = serve(folders[0], schema.SURVIVAL_EVENTS,
                  {"task": "label", "needs": "survival", "terms": ["pnodes"],
                   "kind.pnodes": "numeric", "center": np.zeros(1), "beta": np.ones(1)}, "r1")
    assert reply["status"] == schema.STATUS_REFUSED
    assert "allow_event_queries" in reply["reason"]


def test_a_site_without_a_covariate_sits_out_of_the_cox_fit(tmp_path: Path) -> None:
    parts = split()
    parts[2] = parts[2].drop(columns="menostat")
    folders = [write_site(tmp_path, f"site-{i + 1}", p) for i, p in enumerate(parts)]
    results = run_study(InProcessTransport(folders),
                        config(tmp_path, survival_group="",
                               survival_covariates=("age", "menostat", "nodes_absent"),
                               stepwise="none"))
    surv = results["survival"]
    assert surv["km"]["all"]["sites_used"] == ["site-1", "site-2", "site-3"]
    assert list(surv["design"]["sites_without"]) == ["site-3"]
    assert "nodes_absent" in surv["design"]["left_out"]
    model = surv["cox"]
    assert model["sites_used"] == ["site-1", "site-2"] and model["sites_missing"] == ["site-3"]
    ref = pooled_reference(parts[:2])  # the pooled complete-case fit: site-3 has none
    fit = lifelines_fit(ref, ["age", "menostat=pre"])
    np.testing.assert_allclose([model["coef"][c] for c in fit.params_.index], fit.params_,
                               rtol=TOL)


def test_survival_run_config_keys() -> None:
    from shared.config import ConfigError

    parsed = StudyConfig.from_run_config({"survival-group": "her2_class",
                                          "survival-covariates": "age, hr_status:positive",
                                          "stepwise": "Backward"})
    assert parsed.survival_group == "her2_class" and parsed.stepwise == "backward"
    assert parsed.survival_covariates == ("age", "hr_status:positive")
    assert "stepwise" not in parsed.settings and parsed.settings["lasso-C"] == 0.1
    with pytest.raises(ConfigError, match="stepwise"):
        StudyConfig.from_run_config({"stepwise": "forward"})


def test_groups_and_covariates_from_a_models_predictions(tmp_path: Path) -> None:
    """KM by the true label and by `predicted:<model>` (score ≥ the validation stage's
    training-site Youden cut) in one run, and `score:<model>` as a Cox covariate, read by each
    site from its own predictions.csv, equal lifelines on the pooled rows grouped the same
    way."""
    parts = split()
    rng = np.random.default_rng(3)
    folders = []
    for i, part in enumerate(parts):
        risk = 1 / (1 + np.exp(-(part.pnodes.to_numpy(float) - 4) / 3
                               - rng.normal(0, 0.5, len(part))))
        part["risk"] = np.round(risk, 4)
        folder = write_site(tmp_path, f"site-{i + 1}", part.drop(columns=["risk"]),
                            roles=("train", "survival"))
        pd.DataFrame({"patient_id": part.patient_id, "model": "risk", "score": part.risk}
                     ).to_csv(folder / "predictions.csv", index=False)
        folders.append(folder)
    cfg = config(tmp_path, stages=("validation", "survival"),
                 survival_group="label,predicted:risk",
                 survival_covariates=("age", "score:risk"),
                 settings=stage_settings({"subgroups": "", "validation-grid": "uniform"}))
    results = run_study(InProcessTransport(folders), cfg)
    threshold = results["validation"]["risk"]["threshold"]["value"]
    surv = results["survival"]
    assert results["run"]["stages"]["survival"]["status"] == "ok"
    assert surv["thresholds"] == {"risk": threshold} and 0 < threshold < 1
    rows = pd.concat(parts, ignore_index=True)
    ref = pd.DataFrame({"T": bin_times(rows.dfs_time.to_numpy(float), 30), "E": rows.dfs_event,
                        "group": (rows.risk >= threshold).astype(int), "age": rows.age,
                        "risk": rows.risk})
    for level in (0, 1):
        sub = ref[ref.group == level]
        fit = KaplanMeierFitter().fit(sub["T"], sub["E"])
        curve = surv["km"][f"predicted:risk={level}"]
        np.testing.assert_allclose(curve["survival"], fit.survival_function_.iloc[:, 0],
                                   rtol=TOL, atol=1e-12)
    ref["label"] = rows.label
    for group, column in (("predicted:risk", "group"), ("label", "label")):
        a, b = ref[ref[column] == 0], ref[ref[column] == 1]
        test = logrank_test(a["T"], b["T"], a["E"], b["E"])
        assert surv["logrank_by"][group]["p_value"] == pytest.approx(test.p_value, rel=TOL)
    assert surv["logrank"] == surv["logrank_by"]["label"]  # the first grouping, as before
    assert {"label=0", "label=1", "predicted:risk=0", "predicted:risk=1"} <= set(surv["km"])
    # the report draws one KM figure per grouping
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "survival_km.png" in page and "survival_km_2.png" in page
    assert (tmp_path / "out" / "survival_km_2.png").stat().st_size > 1000
    cox = lifelines_fit(ref.rename(columns={"risk": "score:risk"}), ["age", "score:risk"])
    assert surv["cox"]["coef"]["score:risk"] == pytest.approx(cox.params_["score:risk"],
                                                              rel=1e-6)
