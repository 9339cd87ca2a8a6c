"""Run configuration: the `[tool.flwr.app.config]` keys, validated into one value object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.labels import TASKS

STAGES = ("cohort", "radiomics", "dsfr", "deep", "fusion", "validation", "survival")
# What each stage needs of a site folder (client.site.NEEDS; `x?` = used where present;
# radiomics reads features.csv where a site has one, else extracts from the MRI). The task
# label is needed by every stage but survival, which needs it only to group or adjust by
# `label` (server.survival.needs_label).
STAGE_NEEDS: dict[str, tuple[str, ...]] = {
    "cohort": ("clinical", "label"),
    "radiomics": ("clinical", "label", "mri|features"),
    "dsfr": ("clinical", "label", "mri"),
    "deep": ("clinical", "label", "mri", "us"),
    "fusion": ("clinical", "label"),
    "validation": ("clinical", "label", "predictions?"),
    "survival": ("clinical", "survival", "predictions?"),
}
DEFAULT_COVARIATES = ("age", "tumour_size_mm", "ki67", "hr_status", "lesion_type")
# survival: `her2_class` is derived from IHC/ISH (zero / low / positive, reference zero)
DEFAULT_SURVIVAL_COVARIATES = ("her2_class", "age", "tumour_size_mm", "hr_status", "ki67",
                               "lesion_type")
STEPWISE = ("both", "backward", "none")


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key."""


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
        asked = [r for r in str(config.extra.get("prediction-runs", "")).split(",") if r]
        return ",".join(dict.fromkeys([*asked, *self.prediction_runs]))

    def threshold(self, config: StudyConfig, model: str, default: float = 0.5) -> float:
        """A model's threshold: the run config's `survival-thresholds`, then validation's."""
        given = dict(item.split("=", 1) for item in
                     str(config.extra.get("survival-thresholds", "")).split(",") if "=" in item)
        if model in given:
            try:
                return float(given[model])
            except ValueError as err:
                raise ConfigError(f"run config survival-thresholds: {model}: {err}") from err
        return float(self.thresholds.get(model, default))


NO_EARLIER = Earlier()  # a stage run on its own


@dataclass(frozen=True)
class StudyConfig:
    sites_dir: str = "data/demo"
    out_dir: str = "runs/latest"
    stages: tuple[str, ...] = STAGES
    task: str = "her2-positive"
    min_sites: int = 1
    round_timeout: float = 600.0
    connect_timeout: float = 120.0
    min_replies: int = 1
    resume: bool = False
    cohort_covariates: tuple[str, ...] = DEFAULT_COVARIATES
    survival_group: str = "label"
    survival_covariates: tuple[str, ...] = DEFAULT_SURVIVAL_COVARIATES
    stepwise: str = "both"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> StudyConfig:
        raw = dict(run_config)
        known = {
            "sites-dir": ("sites_dir", str),
            "out-dir": ("out_dir", str),
            "stages": ("stages", _names),
            "task": ("task", str),
            "min-sites": ("min_sites", int),
            "round-timeout": ("round_timeout", float),
            "connect-timeout": ("connect_timeout", float),
            "min-replies": ("min_replies", int),
            "resume": ("resume", flag),
            "cohort-covariates": ("cohort_covariates", _names),
            "survival-group": ("survival_group", lambda v: str(v).strip()),
            "survival-covariates": ("survival_covariates", _names),
            "stepwise": ("stepwise", lambda v: str(v).strip().lower()),
        }
        values: dict[str, Any] = {}
        for key, (attr, parse) in known.items():
            if key in raw:
                try:
                    values[attr] = parse(raw.pop(key))
                except (TypeError, ValueError) as err:
                    raise ConfigError(f"run config {key}: {err}") from err
        config = cls(**values, extra=raw)
        config.validate()
        return config

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"run config stages: unknown {unknown}; known: {list(STAGES)}")
        if self.task not in TASKS:
            raise ConfigError(f"run config task: {self.task!r} is not one of {list(TASKS)}")
        if self.min_sites < 1:
            raise ConfigError("run config min-sites must be >= 1")
        if self.min_replies < 1:
            raise ConfigError("run config min-replies must be >= 1")
        if self.round_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("run config round-timeout and connect-timeout must be > 0")
        if self.stepwise not in STEPWISE:
            raise ConfigError(f"run config stepwise: {self.stepwise!r} is not one of "
                              f"{list(STEPWISE)}")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = list(self.stages)
        data["cohort_covariates"] = list(self.cohort_covariates)
        data["survival_covariates"] = list(self.survival_covariates)
        return data


# Keys that say how a run is carried out, not what it computes: a checkpoint written under
# other values of these still answers the same study (see server.workflow resume).
RUNTIME_FIELDS = ("sites_dir", "out_dir", "stages", "min_sites", "round_timeout",
                  "connect_timeout", "min_replies", "resume")


def flag(value: Any) -> bool:
    """A run-config boolean: true/false, 1/0, yes/no (TOML booleans as they are)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value)
    raise ValueError(f"expected a comma-separated string, got {value!r}")
