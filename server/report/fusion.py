"""Report section of the `fusion` stage: DLR (the mean of the radiomics and DSFR probabilities)
and the late-fusion logistic model. Any number may be missing or None: it is shown as "—"."""

from __future__ import annotations

from typing import Any

from server.report.format import as_dict as _dict
from server.report.format import as_list as _list
from server.report.format import fixed as _f
from server.report.format import name_list as _names
from server.report.format import site_problems as _site_problems
from server.report.html import DASH
from server.report.html import escape as _e
from server.report.html import table as _table


def fusion_section(results: dict[str, Any]) -> str:
    """DLR (mean of the radiomics and DSFR probabilities) and the late-fusion logistic model."""
    if "fusion" not in results:
        return ""
    block = _dict(results.get("fusion"))
    parts = ["<h2>Fusion (DLR and late fusion)</h2>"]
    dlr = _dict(block.get("dlr"))
    if dlr.get("skipped"):
        parts.append(f"<p class='muted'>DLR not computed: {_e(dlr['skipped'])}.</p>")
    elif dlr:
        models = _list(dlr.get("models")) or ["radiomics", "dsfr"]
        parts.append(
            f"<p><b>DLR</b> (deep learning radiomics) is the mean of the predicted "
            f"probabilities of {_e(' and '.join(str(m) for m in models))}, computed at each "
            f"site for each patient; it has no parameters to fit. Sites: "
            f"{_names(dlr.get('sites'))}.</p>")
    else:
        parts.append("<p class='muted'>DLR not computed in this run.</p>")
    fusion = _dict(block.get("fusion"))
    models = _list(fusion.get("models"))
    if fusion.get("skipped"):
        parts.append(f"<p class='muted'>Late fusion of {_names(models)} not fitted: "
                     f"{_e(fusion['skipped'])}.</p>")
    elif fusion:
        coef = _dict(fusion.get("coef"))
        rows = [[_e(m), _f(coef.get(m), 4)] for m in models or list(coef)]
        rows.append(["<i>intercept</i>", _f(fusion.get("intercept"), 4)])
        converged = fusion.get("converged")
        extra = []
        if converged is False:
            extra.append("<span class='bad'>did not converge</span>")
        if _list(fusion.get("external")):
            extra.append(f"also scored at {_names(fusion.get('external'))}")
        if _list(fusion.get("restarts")):
            extra.append(f"restarted {len(fusion['restarts'])}× after a site dropped")
        parts.append(
            "<p><b>Late fusion</b>: a logistic regression on the predicted probabilities of "
            f"{_names(models)} (L2, C = {_f(fusion.get('C'), 3)}), fitted federated in "
            f"{_e(fusion.get('rounds') or DASH)} rounds on the out-of-fold probabilities of "
            f"the training sites {_names(fusion.get('sites'))}"
            + (f"; {'; '.join(extra)}" if extra else "")
            + ". The probabilities stayed at the sites; only aggregate statistics of the fit "
              "were sent.</p>"
            + _table(["input", "coefficient"], rows))
    else:
        parts.append("<p class='muted'>Late-fusion model not fitted in this run.</p>")
    parts.append(_site_problems(block.get("sites")))
    return "\n".join(p for p in parts if p)
