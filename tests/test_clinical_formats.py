"""clinical.csv as hospitals export it (issue 26, point 4): the format a site declares in
site.yaml (`clinical_csv`: separator, decimal mark, encoding, missing-value words), what
check-site proposes when the file does not read as declared, numeric covariates that stay
numeric or name each bad cell, categorical levels normalized with the mapping said, the
usual IHC spellings, and the coordinator's refusal of a covariate numeric at one site and
text at another."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from client.site.check import check_one
from client.site.folder import SiteError, load_site
from server.core.transport import Reply, StageError
from shared.labels import LabelError, parse_ihc
from tests.sites.realistic import EXCEL_FORMAT, excel_clinical

ROWS = {  # patient -> (her2_ihc, age, ki67, hr_status)
    "p01": (3, 63.5, 20.0, "positive"),
    "p02": (0, 47.25, math.nan, "negative"),
    "p03": (1, 71.0, 35.5, "positive"),
    "p04": (2, 55.5, 12.0, "negative"),
    "p05": (3, 38.75, 8.0, "positive"),
    "p06": (1, 60.0, 41.0, "negative"),
}


def truth() -> pd.DataFrame:
    frame = pd.DataFrame.from_dict(ROWS, orient="index",
                                   columns=["her2_ihc", "age", "ki67", "hr_status"])
    frame.index.name = "patient_id"
    frame = frame.reset_index()
    frame.insert(2, "her2_ish", [math.nan, math.nan, math.nan, "negative", math.nan, math.nan])
    return frame


def site_folder(root: Path, clinical_csv: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = {"site_id": root.name, "roles": ["train", "survival"], "time_unit": "days",
              "privacy": {"min_patients": 1, "min_cell_count": 1}}
    if clinical_csv is not None:
        config["clinical_csv"] = clinical_csv
    (root / "site.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return root


def excel_site(root: Path, declared: dict | None = EXCEL_FORMAT) -> Path:
    site_folder(root, declared)
    excel_clinical(truth(), root / "clinical.csv", capitalize=["hr_status"])
    return root


def report(root: Path, **kwargs: object) -> str:
    out = io.StringIO()
    check_one(root, out=out, stages=("cohort",), **kwargs)
    return out.getvalue()


# --------------------------------------------------------------------------- format


def test_the_excel_export_is_read_as_declared(tmp_path: Path) -> None:
    # before: a ';' file did not parse (tokenizer error), and nothing could declare it
    site = load_site(excel_site(tmp_path / "excel"), needs=("clinical", "label"))
    clinical = site.clinical
    assert site.excluded == {}
    assert clinical["age"].dtype == np.float64
    assert clinical["age"].tolist() == [63.5, 47.25, 71.0, 55.5, 38.75, 60.0]
    assert clinical["ki67"].dtype == np.float64  # `#N/A` is missing, not a level
    assert np.isnan(clinical.loc["p02", "ki67"]) and clinical.loc["p03", "ki67"] == 35.5
    assert clinical["her2_ihc"].tolist() == [3, 0, 1, 2, 3, 1]  # `IHC 3+`, `IHC 0`
    assert clinical["hr_status"].tolist() == ["positive", "negative"] * 3


def test_a_semicolon_file_undeclared_names_the_separator_and_proposes_it(
        tmp_path: Path) -> None:
    # before: "cannot read CSV: Error tokenizing data. C error: Expected 2 fields in line 3"
    root = excel_site(tmp_path / "excel", declared=None)
    with pytest.raises(SiteError) as raised:
        load_site(root)
    message = str(raised.value)
    assert "excel: clinical.csv: " in message
    assert "separator ','" in message and "looks like separator ';'" in message
    assert "clinical_csv: {separator: ';', decimal: ','}" in message
    assert "clinical_csv: {separator: ';', decimal: ','}" in report(root)


def test_a_semicolon_file_without_commas_is_not_one_column(tmp_path: Path) -> None:
    # before: the whole header was one column: "missing column 'patient_id'"
    root = site_folder(tmp_path / "s")
    (root / "clinical.csv").write_text("patient_id;her2_ihc\np01;3\np02;0\n", encoding="utf-8")
    with pytest.raises(SiteError, match=r"looks like separator ';'.*clinical_csv: "
                                        r"\{separator: ';'\}"):
        load_site(root)


def test_an_encoding_undeclared_is_proposed_and_declared_is_read(tmp_path: Path) -> None:
    root = site_folder(tmp_path / "s")
    text = ("patient_id,her2_ihc,her2_ish,lesion_type\n"
            "p01,3,,masse rehaussée\np02,0,,non-masse\n")
    (root / "clinical.csv").write_bytes(text.encode("cp1252"))
    with pytest.raises(SiteError, match=r"encoding utf-8.*clinical_csv: \{encoding: cp1252\}"):
        load_site(root)
    site_folder(root, {"encoding": "cp1252"})
    site = load_site(root, needs=("clinical", "label"))
    assert site.clinical.loc["p01", "lesion_type"] == "masse rehaussée"


@pytest.mark.parametrize(("declared", "message"), [
    ({"separator": ":"}, "clinical_csv.separator ':' is not one of ',', ';', tab, '|'"),
    ({"decimal": ";"}, "clinical_csv.decimal ';' is not '.' or ','"),
    ({"separator": ",", "decimal": ","}, "clinical_csv: decimal ',' is also the separator"),
    ({"encoding": "klingon"}, "clinical_csv.encoding 'klingon' is not an encoding"),
    ({"missing": "#N/A"}, "clinical_csv.missing must be a list of texts"),
    ({"sep": ";"}, "clinical_csv: unknown key 'sep'; known: separator, decimal, encoding, "
                   "missing"),
])
def test_a_bad_format_declaration_names_the_key(tmp_path: Path, declared: dict,
                                                message: str) -> None:
    root = site_folder(tmp_path / "s", declared)
    pd.DataFrame({"patient_id": ["p01"], "her2_ihc": ["3"]}).to_csv(root / "clinical.csv",
                                                                     index=False)
    with pytest.raises(SiteError) as raised:
        load_site(root)
    assert f"s: site.yaml: {message}" in str(raised.value)


# --------------------------------------------------------------------------- numbers


def test_survival_and_label_numbers_in_decimal_commas(tmp_path: Path) -> None:
    # before: `123,5` was "dfs_time 123,5 is not a number" and the patient excluded
    root = site_folder(tmp_path / "s", EXCEL_FORMAT)
    (root / "clinical.csv").write_text(
        "patient_id;her2_ihc;her2_ish;dfs_time;dfs_event;stage\n"
        "p01;2,0;negative;123,5;1;1,2\np02;IHC 3+;;80;0;2\np03;0;;400,25;0,0;2\n",
        encoding="utf-8")
    site = load_site(root, needs=("clinical", "label", "survival"))
    assert site.excluded == {}
    assert site.clinical["dfs_time"].tolist() == [123.5, 80.0, 400.25]
    assert site.clinical["dfs_event"].tolist() == [1, 0, 0]
    assert site.clinical["her2_ihc"].tolist() == [2, 3, 0]
    assert site.clinical["stage"].tolist() == [1.2, 2.0, 2.0]



def test_comma_decimals_undeclared_are_refused_naming_column_and_setting(
        tmp_path: Path) -> None:
    # before: check-site said OK; a study made each age a level (64 dummies, HRs nan)
    root = site_folder(tmp_path / "s")
    frame = truth().assign(age=[f"{a:g}".replace(".", ",") for a in truth().age])
    frame.to_csv(root / "clinical.csv", index=False)  # "63,5" quoted in a ',' file
    text = report(root)
    assert ("s: clinical.csv: column 'age': 4 values use ',' as the decimal mark (patient "
            "p01: '63,5'), but site.yaml's clinical_csv declares decimal '.'; declare "
            "clinical_csv: {decimal: ','} if the file uses decimal commas") in text
    with pytest.raises(SiteError, match="column 'age': 4 values use ','"):
        load_site(root)


def test_a_bad_cell_in_a_numeric_covariate_is_named(tmp_path: Path) -> None:
    # before: `#DIV/0!` (or any text) turned ki67 into a categorical column without a word
    root = site_folder(tmp_path / "s")
    frame = truth().assign(ki67=["20", "#DIV/0!", "35.5", "12", "unknown", "41"])
    frame.to_csv(root / "clinical.csv", index=False)
    text = report(root)
    assert ("s: clinical.csv: patient p02: ki67 '#DIV/0!' is not a number (the column is "
            "numeric: 4 of 6 values are numbers); declare it in clinical_csv.missing if it "
            "means missing") in text
    assert "patient p05: ki67 'unknown' is not a number" in text
    site = load_site(root, needs=("clinical", "label"))
    assert set(site.excluded) == {"p02", "p05"}
    assert site.clinical["ki67"].dtype == np.float64
    site_folder(root, {"missing": ["unknown", "#DIV/0!"]})
    site = load_site(root, needs=("clinical", "label"))
    assert site.excluded == {} and site.clinical["ki67"].isna().sum() == 2


def test_a_covariate_without_a_value_is_one_the_site_does_not_have(tmp_path: Path) -> None:
    # before: a ki67 column of `#N/A` only was a text column of no level (a categorical
    # covariate at this site, numeric at the others)
    root = site_folder(tmp_path / "s")
    truth().assign(ki67="#N/A").to_csv(root / "clinical.csv", index=False)
    assert ("s: clinical.csv: note: column 'ki67': every value missing; read as a column the "
            "site does not have") in report(root)
    assert "ki67" not in load_site(root, needs=("clinical", "label")).clinical.columns


def test_a_column_of_mostly_words_is_text_and_says_so(tmp_path: Path) -> None:
    # before: silently a categorical covariate whose numbers are levels
    root = site_folder(tmp_path / "s")
    truth().assign(grade=["1", "unknown", "unknown", "3", "n.d.", "unknown"]).to_csv(
        root / "clinical.csv", index=False)
    assert ("s: clinical.csv: note: column 'grade': read as text, each value a level (2 of 6 "
            "values are numbers; declare the other values in clinical_csv.missing if they "
            "mean missing)") in report(root)
    site_folder(root, {"missing": ["unknown", "n.d."]})
    site = load_site(root, needs=("clinical", "label"))
    assert site.clinical["grade"].dtype == np.float64
    assert site.clinical["grade"].tolist()[::3] == [1.0, 3.0]


# --------------------------------------------------------------------------- levels


def test_levels_are_normalized_and_the_mapping_is_reported(tmp_path: Path) -> None:
    # before: `Positive` and `positive` were two levels
    root = site_folder(tmp_path / "s")
    frame = truth().assign(hr_status=["Positive", "negative", "positive", "NEGATIVE",
                                      "positive", "Negative  "],
                           lesion_type=["mass", "non  mass", "Non-mass", "mass", "mass",
                                        "mass"])
    frame.to_csv(root / "clinical.csv", index=False)
    text = report(root)
    assert ("s: clinical.csv: note: column 'hr_status': levels normalized (case, spaces): "
            "'NEGATIVE' -> 'negative' (1), 'Negative' -> 'negative' (1), "
            "'Positive' -> 'positive' (1)") in text
    assert "'Non-mass' -> 'non-mass' (1), 'non  mass' -> 'non mass' (1)" in text
    assert text.rstrip().endswith("s: OK (6 patients)")
    site = load_site(root, needs=("clinical", "label"))
    assert site.clinical["hr_status"].tolist() == ["positive", "negative"] * 3


@pytest.mark.parametrize(("text", "score"), [
    ("IHC 2+", 2), ("ihc2+", 2), ("IHC 0", 0), ("2+", 2), ("3+", 3), ("1+", 1), ("0", 0),
    ("IHC 3 +", 3), (" 1+ ", 1), ("2.0", 2),
])
def test_usual_ihc_spellings(text: str, score: int) -> None:
    assert parse_ihc(text) == score


@pytest.mark.parametrize("text", ["IHC 4+", "2++", "IHC", "HER2 2+", "0+"])
def test_other_ihc_spellings_are_refused_naming_the_value(text: str) -> None:
    with pytest.raises(LabelError, match="is not one of 0, 1, 2, 3"):
        parse_ihc(text)


# --------------------------------------------------------------------------- across sites


def _setup_reply(site: str, kind: dict) -> Reply:
    return Reply(site, "ok", {f"design.age.{k}": v for k, v in kind.items()})


def test_a_covariate_numeric_at_one_site_and_text_at_another_names_both() -> None:
    # before: left out of the Cox design as "numeric at some sites and text at others"
    from server.stages.survival import check_covariate_kinds

    setup = {"a": _setup_reply("a", {"kind": "numeric", "n": 30, "sum": 1800.0}),
             "b": _setup_reply("b", {"kind": "categorical", "levels": ["63,5", "70,1"]}),
             "c": _setup_reply("c", {"kind": "numeric", "n": 20, "sum": 1200.0})}
    with pytest.raises(StageError, match=r"covariate 'age' is numeric at a, c and text at b "
                                         r"\(levels '63,5', '70,1'\)"):
        check_covariate_kinds(["age"], setup, ["a", "b", "c"])
    check_covariate_kinds(["age"], setup, ["a", "c"])


def test_the_cohort_stage_names_both_sites_of_a_mixed_covariate() -> None:
    # before: a log warning, and the covariate missing from the cohort table
    from server.stages.cohort import _split_covariates

    replies = {"a": Reply("a", "ok", {"numeric.age.g0.n": 3}),
               "b": Reply("b", "ok", {"categorical.age.levels": ["x"]})}
    with pytest.raises(StageError, match="covariate 'age' is numeric at a and text at b"):
        _split_covariates(("age",), replies, ["a", "b"])


# --------------------------------------------------------------------------- a study


def test_a_covariate_no_site_has_is_named_with_its_reason_in_results_and_report(
        tmp_path: Path) -> None:
    # before: `bmi` was missing from the cohort table without a word (results and report),
    # and the Cox design's left_out was in results.json only
    from server.workflow import run_study
    from shared.config import StudyConfig
    from simulation.cohort import simulate_cohort
    from simulation.in_process import InProcessTransport

    simulate_cohort(tmp_path / "sites", n_sites=2, n_patients=40, seed=3, images=False)
    config = StudyConfig.from_run_config({
        "stages": "cohort,survival", "out-dir": str(tmp_path / "out"), "stepwise": "none",
        "cohort-covariates": "age,bmi", "survival-covariates": "age,bmi"})
    results = run_study(InProcessTransport(sorted((tmp_path / "sites").glob("site-*"))),
                        config)
    assert results["cohort"]["left_out"] == {"bmi": "no site has a value of it in clinical.csv"}
    assert set(results["cohort"]["covariates"]) == {"age"}
    assert results["survival"]["design"]["left_out"] == {
        "bmi": "not available at any site of the Cox cohort"}
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "Covariates left out of the cohort table: bmi (no site has a value of it in " \
           "clinical.csv)" in html
    assert "Covariates left out of the Cox model: bmi (not available at any site of the Cox " \
           "cohort)" in html
