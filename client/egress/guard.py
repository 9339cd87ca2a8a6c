"""The egress guard: the one choke point every reply of a site passes before it leaves.

Handlers return `Statistic`s; the guard applies the site's own privacy policy to each,
drops (and reports) what the policy refuses, flattens the rest into the wire payload and
appends a record of the outgoing message to `<site>/audit/egress.jsonl`. Nothing the
server sends can lower the policy: the guard never reads the query.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.egress.ledger import Checked, DisclosureLedger, Release
from shared import schema
from shared.policy import PrivacyPolicy
from shared.schema import (
    HANDSHAKE,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_REFUSED,
    Payload,
    Value,
    digest,
    message_type,
    split_payload,
)

SUPPRESSED = -1  # a small count replaced before release (small-cell suppression)


class PolicyRefusal(Exception):
    """Raised by a handler when the site's policy forbids what the query asks as a whole
    (e.g. survival times finer than the site's time_bin); the reply is `refused`."""


@dataclass(frozen=True)
class Statistic:
    """One named statistic a handler wants to send.

    `n` is the number of patients it is computed over (None for facts that are not computed
    from patients, e.g. software versions); `counts` names the entries that are count
    tables, to which the cell rule applies. `refused` is set by a handler whose site half
    the policy already forbade (e.g. a p×p matrix above max_feature_ratio).

    `patients` (the ids it is computed over) and `family` (what is aggregated: the
    statistic and every query parameter its value depends on, not which rows) are what the
    site's disclosure ledger (`client.egress.ledger`) compares with the earlier releases; neither
    is sent.
    """

    name: str
    values: dict[str, Value]
    n: int | None
    counts: tuple[str, ...] = ()
    refused: str | None = None
    patients: Sequence[str] | None = None
    family: str | None = None
    columns: Sequence[int] | None = None  # per-feature values: which features (ledger)
    grid: float | np.ndarray | None = None  # counts on a grid: its bin width or edges (ledger)


@dataclass
class EgressGuard:
    site_id: str
    policy: PrivacyPolicy
    patient_ids: frozenset[str]
    audit_path: Path
    ledger: DisclosureLedger | None = None
    check_ms: float | None = None  # the next record's query declaration check, in ms
    _id_pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def release(self, action: str, run_id: str, statistics: Iterable[Statistic]) -> Payload:
        """Check each statistic against the policy, then the ones that pass against the
        site's disclosure ledger; return what may leave, audited."""
        passed: list[Statistic] = []
        refused: dict[str, str] = {}
        for stat in statistics:
            reason = self._violation(stat)
            if reason is None:
                passed.append(stat)
            else:
                refused[stat.name] = reason
        leaked = self._patient_level(_flat(passed))
        if leaked:
            return self.refuse(action, run_id, leaked)
        checked = self._differencing(action, run_id, passed)
        refused.update(checked.refused)
        payload = _flat([s for s in passed if s.name not in checked.refused])
        payload["status"] = STATUS_OK
        if checked.checked:
            payload[schema.LEDGER_CHECKED] = checked.checked
        for name, reason in refused.items():
            payload[f"refused.{name}"] = reason
        self._audit(action, run_id, payload, refused, checked)
        return payload

    def refuse(self, action: str, run_id: str, reason: str) -> Payload:
        """A whole-message refusal by the site's policy."""
        return self._fail(action, run_id, STATUS_REFUSED, reason)

    def fail(self, action: str, run_id: str, reason: str) -> Payload:
        """The site could not serve the query (bad data, unknown action, an error)."""
        return self._fail(action, run_id, STATUS_FAILED, reason)

    def scrub(self, text: str) -> str:
        """Replace every patient id in a free-text reason by `<patient>`."""
        pattern = self._ids()
        return pattern.sub("<patient>", text) if pattern else text

    def _fail(self, action: str, run_id: str, status: str, reason: str) -> Payload:
        payload: Payload = {"status": status, "reason": self.scrub(reason)[:2000]}
        if action == HANDSHAKE:  # so the server names the site that cannot serve
            payload["site.site_id"] = self.site_id
        self._audit(action, run_id, payload, {})
        return payload

    def _differencing(self, action: str, run_id: str, passed: list[Statistic]) -> Checked:
        """The ledger's verdict on the statistics that name their patients; the others that
        are computed from patients are counted as unchecked."""
        releases = [Release(s.name, s.family or f"{message_type(action)}:{s.name}",
                            s.patients, s.columns, s.grid)
                    for s in passed if s.patients is not None]
        unchecked = sum(1 for s in passed if s.patients is None and s.n)
        if self.ledger is None:
            return Checked({}, 0, 0.0, unchecked + len(releases))
        verdict = self.ledger.release(releases, message_type(action), run_id)
        verdict.unchecked = unchecked
        return verdict

    def _violation(self, stat: Statistic) -> str | None:
        if stat.refused is not None:
            return stat.refused
        if stat.n is not None and stat.n < self.policy.min_patients:
            return f"computed over fewer than min_patients ({self.policy.min_patients}) patients"
        for key in stat.counts:
            cells = np.asarray(stat.values[key])
            small = (cells > 0) & (cells < self.policy.min_cell_count)
            if np.any(small) or np.any(cells < SUPPRESSED):
                return (f"count table '{key}' has a non-zero cell below "
                        f"min_cell_count ({self.policy.min_cell_count})")
        return None

    def _patient_level(self, payload: Payload) -> str | None:
        pattern = self._ids()
        if pattern is None:
            return None
        for key, value in payload.items():
            texts = [key, *_strings(value)]
            if any(pattern.search(t) for t in texts):
                return "reply would carry a patient identifier"
        return None

    def _ids(self) -> re.Pattern[str] | None:
        if self._id_pattern is None and self.patient_ids:
            ids = sorted(self.patient_ids, key=len, reverse=True)
            self._id_pattern = re.compile(
                r"(?<![\w-])(" + "|".join(re.escape(i) for i in ids) + r")(?![\w-])"
            )
        return self._id_pattern

    def _audit(self, action: str, run_id: str, payload: Payload, refused: dict[str, str],
               checked: Checked | None = None) -> None:
        arrays, _ = split_payload(payload)
        size, sha256 = digest(payload)
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_id": run_id,
            "site_id": self.site_id,
            "message_type": message_type(action),
            "status": payload.get("status"),
            "keys": sorted(payload),
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                       for k, v in arrays.items()},
            "bytes": size,
            "sha256": sha256,
            "refused": refused,
        }
        if payload.get("status") != STATUS_OK:  # what the coordinator was told, for the
            record["reason"] = payload.get("reason", "")  # privacy officer (feddlr audit)
        if self.check_ms is not None:
            record["check_ms"] = round(self.check_ms, 3)
            self.check_ms = None
        if checked is not None:
            record["ledger"] = {"checked": checked.checked, "unchecked": checked.unchecked,
                                "refused": len(checked.refused),
                                "ms": round(checked.seconds * 1000, 3)}
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        with self.audit_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


def _flat(statistics: Iterable[Statistic]) -> Payload:
    return {f"{s.name}.{k}": v for s in statistics for k, v in s.values.items()}


def suppress_small(count: int, policy: PrivacyPolicy) -> int:
    """A count as it may be released: 1 … min_cell_count−1 become SUPPRESSED."""
    return SUPPRESSED if 0 < count < policy.min_cell_count else int(count)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []

