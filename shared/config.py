"""Run configuration: the `[tool.flwr.app.config]` keys, validated into one value object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from shared import settings as settings_
from shared import stages
from shared.settings import STAGES, ConfigError

__all__ = [
    "NO_EARLIER",
    "RUNTIME_FIELDS",
    "STAGES",
    "STAGE_NEEDS",
    "ConfigError",
    "Earlier",
    "StudyConfig",
    "query_needs",
    "stage_settings",
]

# What each stage needs of a site folder (its declaration, shared.stages)
STAGE_NEEDS: dict[str, tuple[str, ...]] = {s.name: s.needs for s in stages.STAGES}


def query_needs(stage: str) -> str:
    """What a stage's queries ask of a site beyond its clinical table and the task label
    (which the task adds): `needs` in the query, from STAGE_NEEDS."""
    return ",".join(n for n in STAGE_NEEDS[stage] if n not in ("clinical", "label"))


_DEFAULTS = settings_.parse({})
_STUDY_FIELDS = ("sites-dir", "out-dir", "stages", "task", "min-sites", "round-timeout",
                 "connect-timeout", "min-replies", "resume", "cohort-covariates",
                 "survival-group", "survival-covariates", "stepwise")


@dataclass(frozen=True)
class Earlier:
    """What a stage reads of the stages before it in this study, passed to it explicitly
    (never written back into the run config): the runs whose prediction files the sites
    should read besides this one (stages taken from a checkpoint carry their run's id), and
    per model the validation stage's training-site Youden threshold. The run-config keys
    `prediction-runs` and `survival-thresholds` add to and override these."""

    prediction_runs: tuple[str, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)

    def runs(self, config: StudyConfig) -> str:
        """The prediction runs a query names (`a,b`): the run config's, then these."""
        asked = config.settings["prediction-runs"]
        return ",".join(dict.fromkeys([*asked, *self.prediction_runs]))

    def threshold(self, config: StudyConfig, model: str, default: float = 0.5) -> float:
        """A model's threshold: the run config's `survival-thresholds`, then validation's."""
        given = config.settings["survival-thresholds"]
        return float(given[model] if model in given else self.thresholds.get(model, default))


NO_EARLIER = Earlier()  # a stage run on its own


@dataclass(frozen=True)
class StudyConfig:
    """The study-wide keys as typed fields; every other key's typed value in `settings`
    (both declared in shared/settings.py, whose defaults these are)."""

    sites_dir: str = _DEFAULTS["sites-dir"]
    out_dir: str = _DEFAULTS["out-dir"]
    stages: tuple[str, ...] = _DEFAULTS["stages"]
    task: str = _DEFAULTS["task"]
    min_sites: int = _DEFAULTS["min-sites"]
    round_timeout: float = _DEFAULTS["round-timeout"]
    connect_timeout: float = _DEFAULTS["connect-timeout"]
    min_replies: int = _DEFAULTS["min-replies"]
    resume: bool = _DEFAULTS["resume"]
    cohort_covariates: tuple[str, ...] = _DEFAULTS["cohort-covariates"]
    survival_group: str = _DEFAULTS["survival-group"]
    survival_covariates: tuple[str, ...] = _DEFAULTS["survival-covariates"]
    stepwise: str = _DEFAULTS["stepwise"]
    settings: settings_.Settings = field(default_factory=lambda: stage_settings({}))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> StudyConfig:
        """Every key parsed and checked (shared/settings.py); ConfigError names the key."""
        typed = settings_.parse(run_config)
        own = {k: v for k, v in typed.items() if k in _STUDY_FIELDS}
        return cls(**{_attr(k): v for k, v in own.items()},
                   settings=settings_.Settings({k: v for k, v in typed.items()
                                                if k not in own}))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = list(self.stages)
        data["cohort_covariates"] = list(self.cohort_covariates)
        data["survival_covariates"] = list(self.survival_covariates)
        return data


def _attr(key: str) -> str:
    return key.replace("-", "_")


def stage_settings(overrides: Mapping[str, Any]) -> settings_.Settings:
    """The stage keys (all but StudyConfig's own fields), typed, with `overrides` given as a
    run config would give them: `StudyConfig(task="label", settings=stage_settings({...}))`."""
    typed = settings_.parse(overrides)
    return settings_.Settings({k: v for k, v in typed.items() if k not in _STUDY_FIELDS})


# Keys that say how a run is carried out, not what it computes: a checkpoint written under
# other values of these still answers the same study (see server.workflow resume).
RUNTIME_FIELDS = ("sites_dir", "out_dir", "stages", "min_sites", "round_timeout",
                  "connect_timeout", "min_replies", "resume")
