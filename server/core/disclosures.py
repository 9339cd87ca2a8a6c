"""What the sites' disclosure ledgers did in a run, from the server's wire log: per site and
message type, how many releases its ledger compared and which it refused, and why.

Every count comes from the replies (`ledger.checked`, `refused.<statistic>`), which passed
the sites' guards; the ledgers themselves never leave the sites.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from shared.disclosure import DIFFERS, SHIFTS


def is_ledger_refusal(reason: str) -> bool:
    return DIFFERS in reason or SHIFTS in reason


def ledger_summary(wire: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """`run.ledger`: per site {checked, refused, by_type: {type: {checked, refused}},
    refusals: [{type, statistic, reason}]}, and the totals."""
    sites: dict[str, Any] = {}
    for site, log in wire.items():
        by_type: dict[str, Counter] = {}
        refusals = []
        for entry in log:
            kind = str(entry.get("message_type", "?"))
            counts = by_type.setdefault(kind, Counter())
            counts["checked"] += int(entry.get("ledger", 0))
            for name, reason in dict(entry.get("why", {})).items():
                if is_ledger_refusal(str(reason)):
                    counts["refused"] += 1
                    refusals.append({"type": kind, "statistic": name, "reason": str(reason)})
        sites[site] = {
            "checked": sum(c["checked"] for c in by_type.values()),
            "refused": len(refusals),
            "by_type": {k: {"checked": c["checked"], "refused": c["refused"]}
                        for k, c in by_type.items() if c["checked"] or c["refused"]},
            "refusals": refusals[:200],
        }
    return {"sites": sites, "checked": sum(s["checked"] for s in sites.values()),
            "refused": sum(s["refused"] for s in sites.values())}
