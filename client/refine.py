"""Site side of score-grid refinement (`shared.refine`): finer sub-histograms of the bins the
server found mixed, read from the site's own prediction files.

Any stage that validates a model from histograms (validation, the radiomics stage's
out-of-fold AUC) asks this one handler: the model's scores are those the stage wrote to
`predictions/<model>-<run>.csv` (or an outside model's in `predictions.csv`), read exactly
as `client.validation.site_scores` reads them.
"""

from __future__ import annotations

import hashlib

import numpy as np

from client.guard import Statistic
from client.session import SiteSession
from client.validation import Scores, listed, released_groups, runs_of, site_scores
from shared import refine
from shared.schema import Payload, nest


def scores_refine(session: SiteSession, query: Payload) -> list[Statistic]:
    """One refinement round: per model in `refine.models` (query `r.m<i>.grid`, the
    first-round grid's edges, and `r.m<i>.r<k>.lo/hi`, every round's split bins as score
    keys), per patient group (all, and the levels of `subgroups`), each label's sub-cells of
    this round's split bins.

    Crosses the wire: per (model, group) and label, sub-cells as (split-bin index, first and
    last sub-bin index, count), every count ≥ min_cell_count (coarsened within the bin, and
    only for a bin that was a cell of its own in this site's previous release, so no release
    can be subtracted from an earlier one); per split bin one int8 saying whether the site's
    patients in it share one value, −1 where it holds fewer than min_cell_count of them.
    No score, label or identifier of a patient.
    """
    wanted = listed(query.get("refine.models"))
    models = site_scores(session, runs_of(query), wanted)
    min_cell = session.site.config.privacy.min_cell_count
    columns = listed(query.get("subgroups"))
    out = [Statistic("catalog", {"models": [m for m in wanted if m in models]}, n=None)]
    for i, name in enumerate(out[0].values["models"]):  # type: ignore[arg-type]
        spec = nest(query, f"r.m{wanted.index(name)}")
        masks, _ = released_groups(session, models[name], columns)
        out += release(f"m{i}", models[name], masks, spec, min_cell)
    return out


def release(key: str, scores: Scores, masks: dict[str, np.ndarray], spec: Payload,
            min_cell: int) -> list[Statistic]:
    """One model's statistics for one round: its group names, the one-value flags of this
    round's split bins, and per group the sub-cells (`shared.refine.site_cells`)."""
    bits0 = refine.bit_edges(np.asarray(spec["grid"], dtype=np.float64))
    rounds = [(np.asarray(spec[f"r{k}.lo"], dtype=np.int64),
               np.asarray(spec[f"r{k}.hi"], dtype=np.int64))
              for k in range(int(spec["rounds"]))]
    tag = _tag(bits0, rounds)
    family = f"scores.refine:{scores.model}:{scores.file}:{tag}"
    k = refine.keys(scores.score)
    patients = [str(p) for p in scores.patients]
    lo, hi = rounds[-1]
    out = [Statistic(key, {"groups": list(masks)}, n=None),
           Statistic(f"{key}.flags", {"one_value": refine.one_value(k, lo, hi, min_cell)},
                     n=len(k), patients=patients, family=f"{family}:one_value")]
    for j, mask in enumerate(masks.values()):
        release = refine.site_cells(k[mask], scores.y[mask], bits0, rounds, min_cell)
        values = {f"{field}{g}": getattr(release, field)[g]
                  for field in ("split", "first", "last", "count") for g in (0, 1)}
        out.append(Statistic(f"{key}.g{j}", values, n=int(mask.sum()),
                             counts=("count0", "count1"),
                             patients=[p for p, m in zip(patients, mask, strict=True) if m],
                             family=family))  # every group one family: the ledger compares them
    return out


def _tag(bits0: np.ndarray, rounds: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """A short digest of every query parameter the release depends on (grid and splits)."""
    h = hashlib.sha256(bits0.tobytes())
    for lo, hi in rounds:
        h.update(lo.tobytes())
        h.update(hi.tobytes())
    return h.hexdigest()[:16]
