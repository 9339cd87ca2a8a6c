"""The privacy officer's view of a site: what left it, run by run (`feddlr audit SITE`).

Read from the site's own records, never from the server: `audit/egress.jsonl` (one line per
message that left, written by the egress guard, and by the SuperNode for an app it refused)
and `audit/disclosures.sqlite` (the disclosure ledger: every statistic released, by family
and patient set). Per run: messages by type and status, the statistics released, the
patients behind them, every refusal with its reason, bytes sent; then the ledger's state.
Patient ids are not printed: counts only (the ledger's sets are counted, not listed).
"""

from __future__ import annotations

import html
import json
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.egress.ledger import LEDGER_FILE
from client.site.session import AUDIT_DIR, EGRESS_LOG

# reply keys that are not statistics (status, reason, the ledger's count, refusals)
NOT_STATISTICS = ("status", "reason", "ledger.checked", "refused.")


class AuditError(ValueError):
    """A folder without the records to report on."""


@dataclass
class RunAudit:
    run_id: str
    first: str = ""
    last: str = ""
    messages: Counter = field(default_factory=Counter)  # (message type, status) → count
    statistics: Counter = field(default_factory=Counter)  # statistic → times released
    refusals: list[dict[str, str]] = field(default_factory=list)
    bytes: int = 0
    check_ms: float = 0.0
    ledger: dict[str, Any] = field(default_factory=dict)


@dataclass
class SiteAudit:
    site: str
    runs: dict[str, RunAudit]
    malformed: list[int]  # line numbers of egress.jsonl that are not records
    ledger: dict[str, Any]


def read_audit(site: Path, run: str | None = None) -> SiteAudit:
    """Summarize a site folder's audit records (one run when `run` is given)."""
    log = Path(site) / AUDIT_DIR / EGRESS_LOG
    if not log.is_file():
        raise AuditError(f"{site}: no audit log ({AUDIT_DIR}/{EGRESS_LOG}); is it a site folder "
                         "that has served a study?")
    runs: dict[str, RunAudit] = {}
    malformed: list[int] = []
    with log.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            record = _record(line)
            if record is None:
                if line.strip():
                    malformed.append(number)
                continue
            run_id = str(record.get("run_id", ""))
            if run is None or run_id == run:
                _add(runs.setdefault(run_id, RunAudit(run_id)), record)
    ledger = _ledger(Path(site) / AUDIT_DIR / LEDGER_FILE)
    for run_id, entry in runs.items():
        entry.ledger = ledger["runs"].get(run_id, {})
    return SiteAudit(Path(site).name, runs, malformed, ledger)


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "message_type" in record else None


def _add(run: RunAudit, record: dict[str, Any]) -> None:
    stamp = str(record.get("time", ""))
    run.first = min(run.first or stamp, stamp)
    run.last = max(run.last, stamp)
    kind, status = str(record.get("message_type", "?")), str(record.get("status", "?"))
    run.messages[(kind, status)] += 1
    run.bytes += int(record.get("bytes") or 0)
    run.check_ms += float(record.get("check_ms") or 0.0)
    keys = [str(k) for k in record.get("keys") or []]
    run.statistics.update({_statistic(k) for k in keys
                           if "." in k and not k.startswith(NOT_STATISTICS)})
    if status != "ok":
        run.refusals.append({"message_type": kind, "statistic": "(whole message)",
                             "status": status, "reason": str(record.get("reason", ""))})
    for name, reason in (record.get("refused") or {}).items():
        run.refusals.append({"message_type": kind, "statistic": str(name),
                             "status": "refused", "reason": str(reason)})


def _statistic(key: str) -> str:
    """The statistic a reply key belongs to: `<statistic>.<field>`; a CNN update's arrays
    (`<unit>.delta.<weight>`) count as one statistic, the unit's update."""
    head, delta, _ = key.partition(".delta.")
    return f"{head}.delta" if delta else key.rsplit(".", 1)[0]


def _ledger(path: Path) -> dict[str, Any]:
    """The ledger's state: families, releases and the patients behind them, per run."""
    if not path.is_file():
        return {"present": False, "runs": {}}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        patients = db.execute("SELECT COUNT(*) FROM patients").fetchone()[0]
        rows = db.execute("SELECT family, n, run_id FROM releases").fetchall()
    runs: dict[str, dict[str, Any]] = defaultdict(lambda: {"releases": 0, "families": set(),
                                                           "largest": 0, "smallest": None})
    for family, n, run_id in rows:
        entry = runs[str(run_id)]
        entry["releases"] += 1
        entry["families"].add(family.split(":", 1)[0])
        entry["largest"] = max(entry["largest"], n)
        entry["smallest"] = n if entry["smallest"] is None else min(entry["smallest"], n)
    return {"present": True, "patients_numbered": patients, "releases": len(rows),
            "families": len({r[0] for r in rows}),
            "runs": {k: {**v, "families": sorted(v["families"])} for k, v in runs.items()}}


# --------------------------------------------------------------------------- rendering


def as_dict(audit: SiteAudit) -> dict[str, Any]:
    return {"site": audit.site, "malformed_lines": audit.malformed, "ledger": {
        k: v for k, v in audit.ledger.items() if k != "runs"},
        "runs": {r.run_id: {"first": r.first, "last": r.last, "bytes": r.bytes,
                            "check_ms": round(r.check_ms, 3),
                            "messages": [{"message_type": t, "status": s, "count": c}
                                         for (t, s), c in sorted(r.messages.items())],
                            "statistics": dict(sorted(r.statistics.items())),
                            "refusals": r.refusals, "ledger": r.ledger}
                 for r in audit.runs.values()}}


def as_text(audit: SiteAudit) -> str:
    out = [f"site {audit.site}: {len(audit.runs)} run(s) in its audit log"]
    if audit.malformed:
        out.append(f"  {len(audit.malformed)} line(s) of the audit log are not records "
                   f"(lines {', '.join(map(str, audit.malformed[:10]))})")
    for r in audit.runs.values():
        sent = sum(c for (_, s), c in r.messages.items() if s == "ok")
        out += [f"\nrun {r.run_id}  ({r.first} … {r.last})",
                f"  messages: {sum(r.messages.values())} ({sent} answered), {r.bytes:,} bytes "
                f"sent, queries checked in {r.check_ms:.1f} ms"]
        for (kind, status), count in sorted(r.messages.items()):
            out.append(f"    {kind:<28} {status:<8} {count}")
        out.append(f"  statistics released: {len(r.statistics)} kinds")
        out += [f"    {name} ×{count}" for name, count in sorted(r.statistics.items())[:40]]
        if len(r.statistics) > 40:
            out.append(f"    … {len(r.statistics) - 40} more")
        if r.ledger:
            out.append(f"  ledger: {r.ledger['releases']} releases over "
                       f"{r.ledger['smallest']}–{r.ledger['largest']} patients "
                       f"({', '.join(r.ledger['families'][:12])})")
        out.append(f"  refusals: {len(r.refusals)}")
        out += [f"    {x['message_type']} {x['statistic']}: {x['reason']}"
                for x in r.refusals]
    led = audit.ledger
    out.append("\nledger: " + ("none yet" if not led.get("present") else
                               f"{led['releases']} releases in {led['families']} families, "
                               f"{led['patients_numbered']} patients numbered"))
    return "\n".join(out) + "\n"


def as_html(audit: SiteAudit) -> str:
    """The same facts as `as_text`, as one self-contained page."""
    body = [f"<h1>What left site {_e(audit.site)}</h1>"]
    if audit.malformed:
        body.append(f"<p class=warn>{len(audit.malformed)} line(s) of the audit log are not "
                    "records.</p>")
    for r in audit.runs.values():
        body.append(f"<h2>Run {_e(r.run_id)}</h2><p>{_e(r.first)} … {_e(r.last)}; "
                    f"{r.bytes:,} bytes sent; queries checked in {r.check_ms:.1f} ms</p>")
        body.append(_table(["message type", "status", "messages"],
                           [[t, s, c] for (t, s), c in sorted(r.messages.items())]))
        body.append(_table(["statistic released", "times"], sorted(r.statistics.items())))
        if r.ledger:
            body.append(f"<p>Ledger: {r.ledger['releases']} releases over "
                        f"{r.ledger['smallest']}–{r.ledger['largest']} patients.</p>")
        body.append(_table(["message type", "statistic", "refused because"],
                           [[x["message_type"], x["statistic"], x["reason"]]
                            for x in r.refusals]) if r.refusals else "<p>No refusals.</p>")
    led = audit.ledger
    body.append("<h2>Disclosure ledger</h2><p>" + ("none yet" if not led.get("present") else
                f"{led['releases']} releases in {led['families']} families, "
                f"{led['patients_numbered']} patients numbered") + "</p>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:"
             "collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:"
             "left}.warn{color:#a00}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>Audit {_e(audit.site)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _table(head: list[str], rows: list) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>"
                    for row in rows)
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + f"</tr>{cells}"
            "</table>")


def _e(value: object) -> str:
    return html.escape(str(value))


def main(site: Path, html_path: Path | None = None, run: str | None = None,
         as_json: bool = False) -> int:
    """`feddlr audit SITE`: print the report (text or JSON), write HTML when asked."""
    try:
        audit = read_audit(site, run)
    except (AuditError, sqlite3.Error) as err:
        print(f"feddlr audit: {err}")
        return 2
    print(json.dumps(as_dict(audit), indent=2) if as_json else as_text(audit), end="")
    if html_path is not None:
        html_path.write_text(as_html(audit), encoding="utf-8")
        print(f"\nwrote {html_path}")
    return 0
