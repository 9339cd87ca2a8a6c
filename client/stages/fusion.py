"""Site side of the fusion stage: combined models built from the site's own probabilities.

DLR (paper 1) is the mean of the radiomics and DSFR probabilities of each patient; the late
fusion (paper 2's DL-US&MRI) is a logistic regression on several models' probabilities,
fitted federated on the training sites' out-of-fold probabilities with the same solver
rounds as every other logistic fit (`client.stages.rounds`). The fused probabilities are written
to `predictions/<model>-<run>.csv` beside the others and stay here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from client.egress.guard import Statistic
from client.site.session import SiteSession
from client.stages import rounds
from client.stages.validation import PREDICTIONS_DIR, Scores, listed, runs_of, site_scores
from shared import logistic
from shared.federated import Query
from shared.queries.bounds import require_gentle
from shared.schema import Payload

DLR = "dlr"
DLR_PARTS = ("radiomics", "dsfr")
FUSION = "fusion"


def _joined(session: SiteSession, query: Payload, models: list[str]
            ) -> tuple[pd.Index, np.ndarray, np.ndarray, list[str]]:
    """(patients, probabilities n × k, labels, kinds) of the patients scored by every one
    of `models`; a missing model is a clear error naming it."""
    found = site_scores(session, runs_of(query), models)
    missing = [m for m in models if m not in found]
    if missing:
        raise ValueError(f"{session.site_id}: no scores of model(s) {missing} for this run "
                         f"(have {sorted(found)})")
    parts: list[Scores] = [found[m] for m in models]
    patients = parts[0].patients
    for part in parts[1:]:
        patients = patients.intersection(part.patients, sort=False)
    x = np.column_stack([pd.Series(p.score, index=p.patients).loc[patients] for p in parts])
    y = pd.Series(parts[0].y, index=parts[0].patients).loc[patients].to_numpy()
    return patients, x, y, [p.kind for p in parts]


def _write(session: SiteSession, query: Payload, model: str, patients: pd.Index,
           score: np.ndarray, kind: str) -> None:
    folder = session.site.root / PREDICTIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"patient_id": patients, "model": model, "score": score, "kind": kind}
                 ).to_csv(folder / f"{model}-{query.get('run_id') or 'local'}.csv", index=False)


def fusion_setup(session: SiteSession, query: Payload) -> list[Statistic]:
    """The models this site has probabilities of, its roles, and DLR = ½(radiomics + DSFR
    probability) per patient, written here when both are present.

    Crosses the wire: model names, the site's roles, the number of patients fused.
    """
    found = site_scores(session, runs_of(query), [])
    out = [Statistic("site", {"models": sorted(found), "roles": list(session.site.config.roles)},
                     n=None)]
    if all(m in found for m in DLR_PARTS):
        patients, x, _, kinds = _joined(session, query, list(DLR_PARTS))
        kind = kinds[0] if len(set(kinds)) == 1 else "/".join(kinds)
        _write(session, query, DLR, patients, x.mean(axis=1), kind)
        out.append(Statistic("dlr", {"n": len(patients)}, n=len(patients),
                             patients=list(patients.astype(str)), family="fusion.dlr"))
    return out


def fusion_step(session: SiteSession, query: Payload) -> list[Statistic]:
    """One solver round of the late-fusion LR on this training site's out-of-fold
    probabilities (see `shared.glm.local_terms` for what crosses the wire)."""
    if "train" not in session.site.config.roles:
        raise ValueError(f"{session.site_id} is not a training site")
    models = listed(query.get("fusion-models"))

    def design(s: SiteSession, q: Query) -> tuple[np.ndarray, np.ndarray, list[str]]:
        patients, x, y, _ = _joined(s, query, models)
        return x, y, [str(p) for p in patients]

    return rounds.solver_step(session, query, design,
                              {"fusion-models": models, "runs": runs_of(query)})


def fusion_score(session: SiteSession, query: Payload) -> list[Statistic]:
    """The fitted late-fusion LR applied to every patient here (at a training site to the
    out-of-fold probabilities it was fitted on: kind `fitted`).

    Crosses the wire: the number of patients scored.
    """
    models = listed(query.get("fusion-models"))
    patients, x, _, _ = _joined(session, query, models)
    coef = np.asarray(query["coef"], dtype=np.float64).ravel()
    # a steep head is a step on one model's score (the file written here, the n sent)
    with np.errstate(invalid="ignore"):
        require_gentle(coef, np.nanstd(x, axis=0), session.site.config.privacy.max_coefficient,
                       "the fusion head")
    score = logistic.predict_proba(x, float(query["intercept"]), coef)
    kind = "fitted" if "train" in session.site.config.roles else "external"
    _write(session, query, FUSION, patients, score, kind)
    return [Statistic("fused", {"n": len(patients)}, n=len(patients),
                      patients=list(patients.astype(str)), family="fusion.fused")]
