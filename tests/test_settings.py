"""The run-config declaration (shared/settings.py) against the files derived from it and
against the values a user types."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from server.training.plan import Plan
from server.workflow import check_settings
from shared import settings
from shared.config import ConfigError, Earlier, StudyConfig
from simulation import settings_docs

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_equal_the_declaration() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert list(table.items()) == list(settings.defaults().items())
    assert settings_docs.pyproject_text(text) == text, "run `make settings`"


def test_readme_tables_equal_the_declaration() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert settings_docs.readme_text(text) == text, "run `make settings`"
    documented = {line.split("`")[1] for line in text.splitlines()
                  if line.startswith("| `") and "| `" in line[1:]}
    assert set(settings.BY_KEY) <= documented


def test_every_default_parses_and_checks() -> None:
    typed = settings.parse({})
    assert typed["stages"] == settings.STAGES
    assert typed["lr"] == dict.fromkeys(("dsfr", "dl_mri", "dl_us"))
    assert typed["cnn-width"] == dict.fromkeys(("dsfr", "dl_mri", "dl_us"), "auto")
    assert typed["mri-size"] is None and typed["survival-thresholds"] == {}


class Recording(settings.Settings):
    """Typed settings that note every key read, however it is read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def test_no_config_key_is_read_outside_the_declaration() -> None:
    """Every stage's configuration (the parsers the workflow runs before any site is asked)
    reads only declared keys; an undeclared key read as `settings[key]` or through the raw
    run config is an error naming the declaration, not a silent default."""
    recorded = Recording(StudyConfig.from_run_config({}).settings)
    config = StudyConfig(stages=settings.STAGES, settings=recorded)
    check_settings(config)
    Earlier().runs(config)
    Earlier().threshold(config, "dlr")
    assert recorded.read <= set(settings.BY_KEY), recorded.read - set(settings.BY_KEY)
    assert {"cv-folds", "deep-models", "dsfr-layer", "fusion-models", "validation-bins",
            "prediction-runs", "survival-thresholds"} <= recorded.read  # the parsers ran
    with pytest.raises(KeyError, match="not a declared run-config key"):
        config.settings["cv-fold"]
    with pytest.raises(KeyError):
        settings.value({"sites-dir": "x"}, "site-dir")


@pytest.mark.parametrize(("raw", "message"), [
    ({"cv-fold": 5}, "did you mean 'cv-folds'"),
    ({"cv-folds": 1}, "cv-folds: 1 is not in [2, 100]"),
    ({"rounds": -1}, "rounds: -1 is not in [1, 10000]"),
    ({"lr": "dlmri=0.1"}, "lr: expected model=value pairs"),
    ({"optimizer": "dl_us=rmsprop"}, "optimizer: 'rmsprop' is not one of"),
    ({"stages": "cohort,survivl"}, "stages: 'survivl' is not one of"),
    ({"dsfr-size": 72}, "dsfr-size: 72 is not a multiple of 16"),
    ({"min-sites": 1.5}, "min-sites: expected an integer"),
    ({"fedbn": "maybe"}, "fedbn: expected true or false"),
    ({"round-timeout": "nan"}, "round-timeout: expected a finite number"),
    ({"survival-thresholds": "dlr=high"}, "survival-thresholds: could not convert"),
])
def test_bad_values_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        StudyConfig.from_run_config(raw)


def test_per_model_values_reach_the_plans() -> None:
    config = StudyConfig.from_run_config({"lr": "dl_us=2e-5", "rounds": 3,
                                          "mri-size": "auto", "recipe": "paper"})
    s = config.settings
    mri, us, dsfr = (Plan.from_settings(s, m) for m in ("dl_mri", "dl_us", "dsfr"))
    assert (us.lr, mri.lr, dsfr.lr) == (2e-5, 1e-3, 1e-3)  # dl_us given; paper recipe's
    assert (mri.rounds, us.rounds, dsfr.rounds) == (3, 3, 3)
    assert mri.mri_size == 0  # auto: resolved from the sites' devices
    assert Plan.from_settings(StudyConfig.from_run_config({"recipe": "paper"}).settings,
                              "dl_mri").mri_size == 96


def test_study_fields_and_stage_settings_are_split() -> None:
    config = StudyConfig.from_run_config({"task": "label", "min-sites": 2, "lasso-C": 0.5})
    assert (config.task, config.min_sites) == ("label", 2)
    assert config.settings["lasso-C"] == 0.5
    assert "task" not in config.settings
    with pytest.raises(KeyError, match="not a declared run-config key"):
        config.settings["lasso-c"]


def test_a_run_config_that_does_not_parse_still_leaves_a_status(tmp_path: Path) -> None:
    import json

    from server.workflow import record_bad_config

    raw = {"out-dir": str(tmp_path / "out"), "cv-folds": 1}
    with pytest.raises(ConfigError) as caught:
        StudyConfig.from_run_config(raw)
    record_bad_config(raw, caught.value, "7")
    run = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))["run"]
    assert run["status"] == "stopped" and run["run_id"] == "7"
    assert run["reason"] == "configuration: run config cv-folds: 1 is not in [2, 100]"


def test_queries_document_equals_the_declarations() -> None:
    text = (ROOT / "docs" / "QUERIES.md").read_text(encoding="utf-8")
    assert settings_docs.queries_text() == text, "run `make settings`"


# --------------------------------------------------------------------------- stage configs


def _keys(cls: type) -> set[str]:
    from dataclasses import fields

    return {f.metadata["setting"] for f in fields(cls) if "setting" in f.metadata}


def _section(*names: str) -> set[str]:
    return {s.key for s in settings.SETTINGS if s.section in names}


def test_each_stage_config_reads_its_sections_keys_and_their_defaults() -> None:
    """A key added to a stage's section without a field in its config, or a field naming
    another section's key, fails here; the defaults are the declaration's, nowhere else."""
    from server.stages.fusion import FusionConfig
    from server.stages.radiomics import RadiomicsConfig
    from server.stages.validation import ValidationConfig
    from shared.dp import DPConfig

    assert _keys(RadiomicsConfig) == _section("radiomics") | {"seed"}
    assert _keys(FusionConfig) == _section("fusion")
    # every stage that reads prediction files reads `prediction-runs` (config.Earlier.runs)
    assert _keys(ValidationConfig) | {"prediction-runs"} == _section("validation")
    # the CNN stages: the plan, DP, and which models `deep` trains
    assert _keys(Plan) | _keys(DPConfig) | {"deep-models"} == _section("training") | {"seed"}
    from server.stages.dsfr import DSFR_HEAD  # DSFR's head: the radiomics config with these

    assert {f"dsfr-{k}" for k in DSFR_HEAD["scratch"]} == _section("dsfr")
    typed = settings.parse({})
    for cls in (RadiomicsConfig, FusionConfig, ValidationConfig):
        assert cls.from_settings(typed) == cls()  # its defaults are the parsed declaration
    assert DPConfig.from_settings(settings.parse({"dp": "local"})) == DPConfig(
        "local", 1.0, 1.0)


def test_a_value_outside_its_key_is_refused_by_the_stage_config_too() -> None:
    from shared.dp import DPConfig

    with pytest.raises(ValueError, match=r"target_quantile: 1.5 is not in \[0, 1\]"):
        DPConfig("local", 1.0, 1.0, target_quantile=1.5)
    with pytest.raises(ValueError, match=r"clipping_norm: 0\.0 is not in"):
        DPConfig("client-fixed", 0.0, 1.0)


def test_the_model_list_is_declared_once() -> None:
    from neural import networks
    from shared import schema, training_params

    assert networks.MODELS is schema.TRAIN_MODELS
    assert settings.BY_KEY["deep-models"].choices == schema.DEEP_MODELS
    assert set(schema.DEEP_MODELS) < set(schema.TRAIN_MODELS)
    assert set(training_params.IMAGES) == set(training_params.SIZE_SETTING) == set(
        schema.TRAIN_MODELS)
    assert tuple(networks.CONVNEXT_VARIANTS) == settings.BY_KEY["us-variant"].choices


def test_recipe_values_in_the_settings_text_are_the_recipes() -> None:
    """The meanings quote recipe values (README, pyproject): they must be the code's."""
    from server.stages.dsfr import DSFR_HEAD
    from server.training.plan import AUTO, RECIPES

    def meaning(key: str) -> str:
        return settings.BY_KEY[key].meaning

    scratch, paper = RECIPES["scratch"], RECIPES["paper"]
    quoted = {
        "focal-alpha": f"(scratch {scratch['dsfr']['focal_alpha']}, paper "
                       f"{paper['dsfr']['focal_alpha']})",
        "cnn-width": f"`auto`: {AUTO['width'][0]} when every training site has a GPU, "
                     f"{AUTO['width'][1]} on CPU",
        "mri-size": f"`auto`: {AUTO['mri_size'][0]} with GPUs, {AUTO['mri_size'][1]} on CPU",
        "us-size": f"`auto`: {AUTO['us_size'][0]} with GPUs, {AUTO['us_size'][1]} on CPU",
        "dsfr-size": f"(paper: {paper['dsfr']['dsfr_size']})",
        "roi-margin": f"(paper 2: {paper['dl_mri']['margin']})",
        "intensity-reference": f"the whole `{scratch['dl_us']['reference']}` (DL-US)",
        "dsfr-layer": f"(scratch `{DSFR_HEAD['scratch']['layer']}`, paper "
                      f"`{DSFR_HEAD['paper']['layer']}`)",
        "dsfr-screen": f"(paper 1: `{DSFR_HEAD['paper']['screen']}` first, then LASSO)",
        "dsfr-screen-order": f"(`{DSFR_HEAD['paper']['screen-order']}`)",
        "dsfr-screen-percentile": f"(scratch {DSFR_HEAD['scratch']['screen-percentile']:g}, "
                                  f"paper {DSFR_HEAD['paper']['screen-percentile']:g})",
        "dsfr-lasso-C": f"(scratch {DSFR_HEAD['scratch']['lasso-C']}, paper "
                        f"{DSFR_HEAD['paper']['lasso-C']})",
    }
    for key, text in quoted.items():
        assert text in meaning(key), (key, text)
    # what the sentences say beyond the numbers
    assert paper["dl_us"]["margin"] == paper["dl_mri"]["margin"]
    assert {r["dl_us"]["reference"] for r in RECIPES.values()} == {"roi"}
    assert {r[m]["reference"] for r in RECIPES.values() for m in ("dsfr", "dl_mri")} == {
        "tissue"}
    assert {h["screen-order"] for h in DSFR_HEAD.values()} == {"screen-first"}
    assert set(scratch) == set(paper) and all(
        set(scratch[m]) == set(paper[m]) for m in scratch)  # each recipe sets the same


def test_training_parameters_are_checked_against_their_keys() -> None:
    """The site checks a round's parameters with the run-config keys' ranges and choices
    (shared/training_params.py), and the query declarations carry the same bounds."""
    from shared.queries.training import ROUND
    from shared.training_params import SETTING_OF, TrainParams

    TrainParams(model="dsfr", size=16).validate()
    for fields_, message in [
        ({"model": "dl_mri", "size": 161}, r"size \(mri-size\): 161 is not in \[8, 160\]"),
        ({"model": "dsfr", "size": 24}, r"size \(dsfr-size\): 24 is not a multiple of 16"),
        ({"model": "dl_us", "lr": 10.5}, r"lr \(lr\): 10.5 is not in \(0, 10\]"),
        ({"model": "dl_us", "epochs": -1}, r"epochs \(local-epochs\): -1 is not in"),
        ({"model": "dl_us", "lr": float("nan")}, r"lr \(lr\): nan is not in"),
        ({"model": "dl_us", "width": 0.01}, r"width \(cnn-width\): 0.01 is not in"),
        ({"model": "dl_us", "optimizer": "rmsprop"}, "optimizer.*'rmsprop' is not one of"),
        ({"model": "dl_us", "mu": float("inf")}, r"mu \(proximal-mu\): inf is not in"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainParams(**fields_).validate()
    TrainParams(model="dl_us", lr=0.0, epochs=0).validate()  # the final evaluation's
    declared = {p.key: (p.lo, p.hi) for p in ROUND}
    for name, key in SETTING_OF.items():
        lo, hi = settings.bounds(key)
        assert declared[name] == (0 if name in ("lr", "epochs") else lo, hi), name
    assert declared["size"] == (8, 512)  # the widest of the three models' size keys
