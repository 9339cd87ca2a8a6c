"""Run configuration: the `[tool.flwr.app.config]` keys, validated into one value object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.labels import TASKS

STAGES = ("cohort", "radiomics", "dsfr", "deep", "fusion", "validation", "survival")
IMPLEMENTED_STAGES = ("cohort",)
DEFAULT_COVARIATES = ("age", "tumour_size_mm", "ki67", "hr_status", "lesion_type")


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class StudyConfig:
    sites_dir: str = "data/demo"
    out_dir: str = "runs/latest"
    stages: tuple[str, ...] = STAGES
    task: str = "her2-positive"
    min_sites: int = 1
    round_timeout: float = 600.0
    connect_timeout: float = 120.0
    cohort_covariates: tuple[str, ...] = DEFAULT_COVARIATES
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
            "cohort-covariates": ("cohort_covariates", _names),
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
        if self.round_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("run config round-timeout and connect-timeout must be > 0")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = list(self.stages)
        data["cohort_covariates"] = list(self.cohort_covariates)
        return data


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value)
    raise ValueError(f"expected a comma-separated string, got {value!r}")
