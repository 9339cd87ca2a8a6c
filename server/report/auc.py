"""One AUC for one set of scores across the report. The model stages (radiomics, DSFR,
DL-MRI, DL-US) estimate the AUC of their out-of-fold and external scores from the sites'
coarsened histograms; the validation stage reads the same scores at the sites again, on
its own adaptive grid. Where bins hold both labels the exact AUC is known only within a
bound, and the two estimators differ inside it: a stage spreads a cell's patients evenly
over the cell, the validation stage places them at their mean score. So where the
validation stage has the same set (same patients, same label counts), a stage's section
shows the validation stage's AUC and says what its own estimate was; where the patients
differ, each keeps its own and the report says so."""

from __future__ import annotations

from typing import Any

from server.report.format import as_dict as _dict
from server.report.format import num as _num
from server.report.html import escape as _e

# a stage's AUC set -> the validation stage's set of the same scores
VALIDATION_SET = {"train_oof": "training", "external": "external"}


def _norm(entry: dict[str, Any]) -> dict[str, Any]:
    """An AUC entry with `auc`, `bound`, `exact`, `n` whatever its block's spelling."""
    return {"auc": _num(entry.get("auc")),
            "bound": entry.get("bound") or entry.get("auc_bound"),
            "exact": bool(entry.get("exact", entry.get("auc_exact", False))),
            "n": entry.get("n"), "sites_missing": entry.get("sites_missing")
            or entry.get("auc_sites_missing") or []}


def _same_patients(mine: dict[str, Any], theirs: dict[str, Any]) -> bool | None:
    """Whether both sets hold the same label counts (None: a count is not known)."""
    if not mine.get("n") or not theirs.get("n"):
        return None
    return [int(v) for v in mine["n"]] == [int(v) for v in theirs["n"]]


def agreed(results: dict[str, Any], model: str, key: str, entry: dict[str, Any],
           label: str) -> tuple[dict[str, Any], str]:
    """(the entry to show for a stage's AUC set `key` — `train_oof`, `external` or
    `sites/<site>` — of `model`, a note for the report or ""). `label` names the set."""
    mine = _norm(entry)
    block = _dict(_dict(results.get("validation")).get(model))
    if key.startswith("sites/"):
        theirs_raw = _dict(_dict(block.get("sites")).get(key[len("sites/"):]))
    else:
        theirs_raw = _dict(block.get(VALIDATION_SET.get(key, key)))
    theirs = _norm(theirs_raw)
    if mine["auc"] is None or theirs["auc"] is None:
        return mine, ""
    if abs(mine["auc"] - theirs["auc"]) < 5e-4:
        return mine, ""
    same = _same_patients(mine, theirs)
    if same is False:
        return mine, (f"{_e(label)}: {mine['auc']:.3f} here over n = "
                      f"{_counts(mine['n'])}, {theirs['auc']:.3f} in the validation stage over "
                      f"n = {_counts(theirs['n'])}: different patients (a site or a patient "
                      "was left out of one of them), so different AUCs")
    note = (f"{_e(label)}: this stage's own histogram estimate {mine['auc']:.3f}"
            + (f" (bound {_bound(mine['bound'])})" if mine["bound"] else "")
            + f", the validation stage's {theirs['auc']:.3f}"
            + (f" (bound {_bound(theirs['bound'])})" if theirs["bound"] else ""))
    return {**theirs, "sites_missing": theirs["sites_missing"] or mine["sites_missing"]}, note


def notes_paragraph(notes: list[str]) -> str:
    """The report's statement of why a stage's own AUC differs from the one shown."""
    notes = [n for n in notes if n]
    if not notes:
        return ""
    return ("<p class='muted'>One AUC per set of scores: where the validation stage read the "
            "same scores of the same patients, the AUC above is the validation stage's. "
            "The exact AUC is known only within its bound (bins holding both labels); "
            "within it this stage's estimator (a cell's patients spread evenly over the "
            "cell) and the validation stage's (placed at their mean score, on its adaptive "
            "grid) differ: " + "; ".join(notes) + ".</p>")


def _counts(n: Any) -> str:
    return "/".join(str(v) for v in n) if n else "?"


def _bound(bound: Any) -> str:
    low, high = (_num(v) for v in bound)
    return "—" if low is None or high is None else f"{low:.3f}–{high:.3f}"
