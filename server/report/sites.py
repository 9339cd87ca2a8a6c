"""Report sections of the whole run: per site its roles, patients, status per stage and what it
sent (`contribution_section`), and the privacy summary from the server's wire log
(`privacy_section`). Any number may be missing or None: it is shown as "—"."""

from __future__ import annotations

from collections import Counter
from typing import Any

from server.report.format import as_dict as _dict
from server.report.format import as_list as _list
from server.report.format import byte_size as _bytes
from server.report.format import left_out, left_out_reason
from server.report.format import name_list as _names
from server.report.format import num as _num
from server.report.format import site_status as _status
from server.report.html import DASH
from server.report.html import escape as _e
from server.report.html import table as _table
from shared.config import STAGES

MAX_LOG_ROWS = 500  # messages listed per site in the privacy section's wire log

# A wire entry of a query the server sent, should the log ever record those too: not counted.
SERVER_TO_SITE = {"down", "query", "to_site", "server_to_site", "server->site"}


def _wire(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """`run.wire`: per site, the messages it sent (type, bytes, sha256), in order."""
    wire = _dict(_dict(results.get("run")).get("wire"))
    return {str(s): [w for w in _list(log) if isinstance(w, dict)
                     and str(w.get("direction", "")).lower() not in SERVER_TO_SITE]
            for s, log in wire.items()}


def _site_ids(results: dict[str, Any]) -> list[str]:
    rows = [r for r in _list(_dict(results.get("run")).get("sites")) if isinstance(r, dict)]
    ids = [str(r.get("site_id")) for r in rows]
    return list(dict.fromkeys(ids + list(_wire(results))))


def _sent(log: list[dict[str, Any]]) -> tuple[int, int | None]:
    sizes = [_num(w.get("bytes")) for w in log]
    known = [s for s in sizes if s is not None]
    return len(log), (int(sum(known)) if known else None)


def _refused(log: list[dict[str, Any]]) -> int | None:
    """Statistics the site's policy refused, where the wire log records them."""
    counts = []
    for w in log:
        value = w.get("refused")
        if value is None:
            continue
        counts.append(len(value) if isinstance(value, (list, tuple, dict))
                      else int(_num(value) or 0))
    return sum(counts) if counts else None


def _count(row: dict[str, Any], key: str) -> str:
    """A released count; None means suppressed at the site (<k), absent means unknown."""
    if key not in row:
        return DASH
    return "&lt;k" if row[key] is None else _e(row[key])


def contribution_section(results: dict[str, Any]) -> str:
    """Per site: roles, patients, status, whether it took part in each stage, what it sent."""
    run = _dict(results.get("run"))
    if "sites" not in run:
        return ""
    rows_by_site = {str(r.get("site_id")): r for r in _list(run.get("sites"))
                    if isinstance(r, dict)}
    wire = _wire(results)
    stages = [s for s in STAGES if isinstance(_dict(results.get(s)).get("sites"), dict)]
    rows = []
    for site in _site_ids(results):
        row = _dict(rows_by_site.get(site))
        status = row.get("status")
        cls = "" if status in ("ok", None) else " class='bad'"
        messages, size = _sent(wire.get(site, []))
        stage_cells = [_stage_cell(results, stage, site) for stage in stages]
        rows.append([_e(site), _names(row.get("roles")), _count(row, "n_patients"),
                     _count(row, "n_excluded"),
                     f"<span{cls}>{_e(status or DASH)}</span>", *stage_cells,
                     _e(messages), _bytes(size)])
    return ("<h2>Per-site contribution</h2>"
            + _table(["site", "roles", "patients", "excluded", "status", *stages,
                      "messages sent", "bytes sent"], rows)
            + "<p class='muted'>✓: the site took part in the stage; — : it was not asked (or "
              "the stage did not run); <i>left out of …</i>: it answered, but its patients "
              "are missing from those parts of the stage (its policy or its disclosure "
              "ledger refused them, as it says); otherwise its status there (hover for the "
              "reason). "
              "Messages and bytes: every reply the site sent to the server in this run.</p>")


def _stage_cell(results: dict[str, Any], stage: str, site: str) -> str:
    """The site's status in the stage; an `ok` site missing from parts of the stage's
    result (a curve, the Cox fit, a covariate) is not ticked: those parts and what it
    refused are shown instead."""
    info = _dict(_dict(_dict(results[stage]).get("sites")).get(site))
    parts = left_out(results[stage]).get(site)
    if info.get("status") != "ok" or not parts:
        return _status(info or None)
    text = _e(left_out_reason(results, site, stage, parts))
    if len(parts) <= 2 and len(text) <= 160:
        return f"<span class='bad'>{text}</span>"
    return (f"<details class='bad'><summary>left out of {len(parts)} part(s)</summary>"
            f"{text}</details>")


def privacy_section(results: dict[str, Any]) -> str:
    """What each site sent, from the server's wire log (equal, message by message, to each
    site's own audit log); no patient-level value leaves a site."""
    run = _dict(results.get("run"))
    if "sites" not in run:
        return ""
    wire = _wire(results)
    rows, logs = [], []
    for site in _site_ids(results):
        log = wire.get(site, [])
        messages, size = _sent(log)
        refused = _refused(log)
        by_type = Counter(str(w.get("message_type") or "?") for w in log)
        types = ("<span style='display:block;text-align:left'>"
                 + "<br>".join(f"{_e(t)} × {n}" for t, n in by_type.items()) + "</span>"
                 if by_type else DASH)
        rows.append([_e(site), _e(messages), _bytes(size),
                     DASH if refused is None else _e(refused), types])
        if log:
            entries = [[_e(i + 1), _e(w.get("message_type")), _e(w.get("bytes")),
                        f"<code>{_e(w.get('sha256'))}</code>"]
                       for i, w in enumerate(log[:MAX_LOG_ROWS])]
            more = (f"<p class='muted'>… and {len(log) - MAX_LOG_ROWS} more (results.json: "
                    "run.wire)</p>" if len(log) > MAX_LOG_ROWS else "")
            logs.append(f"<details><summary>{_e(site)}: {messages} messages</summary>"
                        + _table(["#", "message type", "bytes", "sha256"], entries) + more
                        + "</details>")
    return ("<h2>Privacy summary</h2>"
            "<p>Everything each site sent to the server in this run, from the server's wire "
            "log; message types, sizes and SHA-256 digests are equal, message by message, to "
            "the site's own audit log (<code>audit/egress.jsonl</code>), so each hospital can "
            "check them. Every reply passed the site's egress guard, which releases only the "
            "aggregate statistics its privacy policy allows (counts, sums, histograms, "
            "gradients, model updates). No patient-level value (no image, no row, "
            "no individual prediction) leaves a site: predictions stay at "
            "<code>&lt;site&gt;/predictions/</code>.</p>"
            + _table(["site", "replies", "bytes", "refused statistics", "replies by type"],
                     rows)
            + ledger_section(results)
            + ("<details><summary>message log per site</summary>" + "".join(logs)
               + "</details>" if logs else ""))


def ledger_section(results: dict[str, Any]) -> str:
    """The sites' disclosure ledgers (`run.ledger`): releases compared with the earlier
    ones of the same statistic, refused, and why each refusal was made."""
    ledger = _dict(_dict(results.get("run")).get("ledger"))
    sites = _dict(ledger.get("sites"))
    if not sites:
        return ""
    rows, reasons = [], []
    for site, entry in sites.items():
        entry = _dict(entry)
        types = _dict(entry.get("by_type"))
        rows.append([_e(site), _e(entry.get("checked")), _e(entry.get("refused")),
                     "<br>".join(f"{_e(t)}: {_e(_dict(c).get('checked'))}"
                                 for t, c in types.items()) or DASH])
        reasons += [[_e(site), _e(_dict(r).get("type")), _e(_dict(r).get("statistic")),
                     _e(_dict(r).get("reason"))] for r in _list(entry.get("refusals"))]
    explained = (_table(["site", "message type", "statistic", "why the ledger refused it"],
                        reasons) if reasons else
                 "<p>No release was refused by a ledger: no statistic was asked over a set "
                 "of patients that differs from an earlier one by fewer than the site's "
                 "<code>min_difference</code>.</p>")
    return ("<h3>Disclosure ledgers</h3><p>Each site compares every statistic it releases "
            "with the earlier releases of the same statistic (this run's and earlier "
            "runs'), and refuses one whose patients differ from an earlier one's by 0 &lt; "
            "k &lt; its <code>min_difference</code>, or that shifts an earlier grid over the "
            "same patients (<code>audit/disclosures.sqlite</code> at the site).</p>"
            + _table(["site", "releases compared", "refused", "compared, by message type"],
                     rows) + explained)
