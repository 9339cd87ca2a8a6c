"""The run-config declaration (shared/settings.py) against the files derived from it and
against the values a user types."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from server.training_plan import Plan
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
