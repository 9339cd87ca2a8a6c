"""The hospital's privacy policy (site.yaml `privacy:`), as a validated value object.

The policy is owned by the site and enforced in its ClientApp before any reply leaves;
nothing the server sends can lower it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class PolicyError(ValueError):
    """A site.yaml privacy block that cannot be used."""


@dataclass(frozen=True)
class DPRequirement:
    """`require_dp:` — the site releases CNN weight updates only clipped to its own
    `clipping_norm` and noised with its own `noise_multiplier` (client/local/dp.py; whatever DP
    mode or σ the server announces), and only while its privacy loss stays within
    `max_epsilon` (at δ = 1/n)."""

    max_epsilon: float
    noise_multiplier: float = 1.0  # σ: the site adds N(0, (σC)²) to each weight
    clipping_norm: float = 1.0  # C: the L2 bound of one unit's update

    @classmethod
    def from_mapping(cls, raw: object) -> DPRequirement | None:
        if raw is None or raw is False:
            return None
        keys = {"max_epsilon", "noise_multiplier", "clipping_norm"}
        if not isinstance(raw, dict) or "max_epsilon" not in raw or set(raw) - keys:
            raise PolicyError(f"require_dp must be a mapping with max_epsilon and optionally "
                              f"noise_multiplier, clipping_norm (keys {sorted(keys)})")
        for key, value in raw.items():
            if not _is_number(value) or not 0 < value < float("inf"):
                raise PolicyError(f"require_dp.{key} must be a number > 0")
        return cls(**{k: float(v) for k, v in raw.items()})


@dataclass(frozen=True)
class PrivacyPolicy:
    min_patients: int = 10
    min_cell_count: int = 3
    time_bin: float = 30
    allow_event_queries: bool = False
    max_feature_ratio: float = 0.33
    # Two releases of one statistic over patient sets S, T with 0 < |S Δ T| < this are
    # refused (client.egress.ledger); None: min_patients.
    min_difference: int | None = None
    # Cox risk-set sums on the site's own time_bin (exact pooled Cox on it; a bin's single
    # leaver is her row) rather than on a coarser released step (client.stages.survival.cox_times).
    allow_risk_set_differences: bool = False
    require_dp: DPRequirement | None = None
    # The largest coefficient, per standard deviation of its column at this site, of a point
    # at which the site evaluates a loss, gradient, Hessian, score or Cox sums: steeper
    # points turn a sigmoid or exp(x'β) into a step that isolates one patient.
    max_coefficient: float = 20.0
    # CNN rounds: the smallest local batch, and the fewest patients behind one update.
    min_batch_size: int = 4
    min_update_patients: int | None = None  # None: min_patients
    # The most memory (MiB) the site lets one query's computation take.
    max_query_memory_mb: int = 2048

    @property
    def difference(self) -> int:
        """The smallest symmetric difference two releases of one statistic may have."""
        return self.min_patients if self.min_difference is None else self.min_difference

    @property
    def update_patients(self) -> int:
        """The fewest patients one CNN update may be computed from."""
        return self.min_patients if self.min_update_patients is None else \
            self.min_update_patients

    @classmethod
    def from_mapping(cls, raw: dict[str, Any] | None) -> PrivacyPolicy:
        """Build from the `privacy:` mapping; unknown keys and bad values raise PolicyError."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PolicyError(f"unknown privacy key(s) {unknown}; known: {sorted(known)}")
        raw["require_dp"] = DPRequirement.from_mapping(raw.get("require_dp"))
        policy = cls(**raw)
        policy.validate()
        return policy

    def validate(self) -> None:
        checks = [
            (isinstance(self.min_patients, int) and self.min_patients >= 1,
             "min_patients must be an integer >= 1"),
            (isinstance(self.min_cell_count, int) and self.min_cell_count >= 1,
             "min_cell_count must be an integer >= 1"),
            (_is_number(self.time_bin) and self.time_bin >= 0, "time_bin must be a number >= 0"),
            (isinstance(self.allow_event_queries, bool), "allow_event_queries must be true/false"),
            (_is_number(self.max_feature_ratio) and self.max_feature_ratio > 0,
             "max_feature_ratio must be a number > 0"),
            (self.min_difference is None or (isinstance(self.min_difference, int)
                                             and not isinstance(self.min_difference, bool)
                                             and self.min_difference >= 1),
             "min_difference must be an integer >= 1"),
            (isinstance(self.allow_risk_set_differences, bool),
             "allow_risk_set_differences must be true/false"),
            (_is_number(self.max_coefficient) and self.max_coefficient > 0,
             "max_coefficient must be a number > 0"),
            (_is_count(self.min_batch_size), "min_batch_size must be an integer >= 1"),
            (self.min_update_patients is None or _is_count(self.min_update_patients),
             "min_update_patients must be an integer >= 1"),
            (_is_count(self.max_query_memory_mb), "max_query_memory_mb must be an integer >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise PolicyError(message)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
