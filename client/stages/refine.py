"""Site side of score-grid refinement (`shared.refine`): finer sub-histograms of the bins the
server found mixed, read from the site's own prediction files.

Any stage that validates a model from histograms (validation, the radiomics stage's
out-of-fold AUC) asks this one handler: the model's scores are those the stage wrote to
`predictions/<model>-<run>.csv` (or an outside model's in `predictions.csv`), read exactly
as `client.stages.validation.site_scores` reads them.
"""

from __future__ import annotations

import numpy as np

from client.egress.guard import Statistic
from client.site.session import SiteSession
from client.stages.validation import Scores, listed, released_groups, runs_of, site_scores
from shared import disclosure, refine, roc
from shared.queries import QueryRejected
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
    round's split bins, and per group the sub-cells (`shared.refine.site_cells`). The
    first-round grid is the one `validation_scores` bins on (the server's within the
    site's resolution, `shared.roc.site_edges`); above min_cell_count 1 a bin's sub-cells
    are released only as ties of one score value (`shared.refine`)."""
    edges, rounds = _spec(spec)
    keep = roc.site_edges(edges, len(scores.y), min_cell)
    bits0 = refine.bit_edges(edges[keep])
    # One family per model's scores, whatever the run, grid or split lists. Above
    # min_cell_count 1 its first-round grid is pinned by the ledger like a histogram's
    # (`shared.disclosure.pinned`): a refinement on another first-round grid over the same
    # patients is refused, so its cells and flags show no grid but the first.
    family = f"scores.refine:{scores.digest}"
    grid = disclosure.pinned(edges[keep]) if min_cell > 1 else None
    k = refine.keys(scores.score)
    patients = [str(p) for p in scores.patients]
    lo, hi = rounds[-1]
    own = refine.site_cells(k, scores.y, bits0, rounds, min_cell).own
    out = [Statistic(key, {"groups": list(masks)}, n=None),
           Statistic(f"{key}.flags", {"one_value": refine.one_value(k, lo, hi, min_cell, own)},
                     n=len(k), patients=patients, family=f"{family}:one_value", grid=grid)]
    for j, mask in enumerate(masks.values()):
        release = refine.site_cells(k[mask], scores.y[mask], bits0, rounds, min_cell)
        values = {f"{field}{g}": getattr(release, field)[g]
                  for field in ("split", "first", "last", "count") for g in (0, 1)}
        out.append(Statistic(f"{key}.g{j}", values, n=int(mask.sum()),
                             counts=("count0", "count1"),
                             patients=[p for p, m in zip(patients, mask, strict=True) if m],
                             family=family, grid=grid))  # groups one family: compared
    return out


def _spec(spec: Payload) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """A model's refinement query (`r.m<i>.*`): its first-round grid and every round's split
    bins as score keys, or QueryRejected."""
    edges = roc.checked_grid(spec.get("grid"), "refinement grid")
    count = spec.get("rounds")
    if not isinstance(count, int | np.integer) or count < 1:
        raise QueryRejected("refinement: rounds must be 1 or more")
    rounds = []
    for r in range(int(count)):
        lo, hi = (np.asarray(spec.get(f"r{r}.{end}", []), dtype=np.float64).ravel()
                  for end in ("lo", "hi"))
        if len(lo) != len(hi) or not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)) \
                or np.any(np.abs(np.r_[lo, hi]) > 2.0**63 - 2**11):
            raise QueryRejected(f"refinement round {r}: split bins must be pairs of score keys")
        rounds.append((np.asarray(spec.get(f"r{r}.lo", []), dtype=np.int64).ravel(),
                       np.asarray(spec.get(f"r{r}.hi", []), dtype=np.int64).ravel()))
    return edges, rounds
