"""Site side of the validation stage: the scores of every model, validated where they lie.

A model's scores at this site are the probabilities a fitting stage wrote to
`predictions/<model>-<run>.csv` (out-of-fold at a training site, the fold models' mean at
an external one), or an outside model's column in the site's own `predictions.csv`. They
never leave: the server gets per (model, patient group) label-stratified histograms on its
grid (coarsened to the site's min_cell_count), and in a second round the sums the paired
DeLong test needs.

The coordinator is not trusted (issue 25). A grid is checked (`shared.roc.checked_grid`)
and binned at no more than n // min_cell_count bins (`shared.roc.site_edges`: every k-th of
the server's edges), so a cell's first/last bin and its Σscore, Σscore² pin no patient's
score; placements are checked and evaluated per released cell; only the comparison sets
the site is in are answered. Ledger families name the statistic and the model's scores as
read (`scores_digest`), not run ids, `runs` or the task: a grid shifted from one released
over the same patients stays refused whatever run it is asked under.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from client.egress.guard import Statistic
from client.egress.ledger import Release
from client.site.session import SiteSession
from shared import disclosure, roc, schema
from shared import validation as val
from shared.queries import QueryRejected
from shared.schema import Payload, message_type

PREDICTIONS_DIR = "predictions"
ALL = "all"  # the patient group of every scored patient
MAX_LEVELS = 12  # a subgroup column with more distinct values is not categorical
RUN_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,120}$")


@dataclass(frozen=True)
class Scores:
    """One model's scores at this site, aligned with the task labels."""

    model: str
    kind: str  # out-of-fold | external | fitted | outside
    patients: pd.Index
    score: np.ndarray
    y: np.ndarray
    file: str  # where the scores were read
    missing: pd.Index  # the site's patients without a score (logged once, in round 1)
    digest: str = ""  # the model's scores as read (`scores_digest`): what a family names


def site_scores(session: SiteSession, runs: list[str], wanted: list[str]) -> dict[str, Scores]:
    """Every model this site has scores for: the run's prediction files (the first run in
    `runs` that has a model wins) and the outside models of `predictions.csv`. Each file
    is parsed once per process while it is unchanged (every round and stage reads them)."""
    labels = pd.Series(session.labels(), index=session.site.clinical.index)
    found: dict[str, Scores] = {}
    for run in runs:
        if not RUN_PATTERN.match(run):
            raise QueryRejected(f"bad run id {run!r}")
        for path in sorted((session.site.root / PREDICTIONS_DIR).glob(f"*-{run}.csv")):
            model = path.name[: -len(f"-{run}.csv")]
            if model in found or (wanted and model not in wanted) or "-" in model:
                continue
            table = _read(session, path)
            kinds = sorted(set(table["kind"].astype(str)))
            found[model] = _aligned(session, model, "/".join(kinds), table, labels, path.name)
    outside = session.site.predictions
    if outside is not None:
        for model in sorted(set(outside.model)):
            if model in found or (wanted and model not in wanted):
                continue
            table = outside[outside.model == model]
            found[model] = _aligned(session, model, "outside", table, labels, "predictions.csv")
    return found


def runs_of(query: Payload) -> list[str]:
    """Whose prediction files to read: this run's (its key, `query["run_id"]`), then those of
    earlier runs a resumed study took stages from (`runs`)."""
    return [str(query.get("run_id") or "local"), *listed(query.get("runs"))]


def _aligned(session: SiteSession, model: str, kind: str, table: pd.DataFrame,
             labels: pd.Series, file: str) -> Scores:
    scores = pd.Series(table["score"].to_numpy(dtype=np.float64), index=table["patient_id"])
    scores = scores[scores.index.isin(labels.index)]
    bad = scores[~np.isfinite(scores) | (scores < 0) | (scores > 1)]
    if len(bad):
        raise ValueError(f"{session.site_id}: {file}: model {model!r}: score "
                         f"{bad.iloc[0]!r} of patient {bad.index[0]} is not a probability in "
                         f"[0, 1] ({len(bad)} such rows)")
    patients = labels.index.intersection(scores.index, sort=False)
    return Scores(model, kind, patients, scores.loc[patients].to_numpy(),
                  labels.loc[patients].to_numpy(), file, labels.index.difference(scores.index),
                  scores_digest(table))


def scores_digest(table: pd.DataFrame) -> str:
    """A digest of a model's (patient, score) rows as the site read them, whatever run id,
    file or task they were asked under: the ledger family of a statistic of these scores
    (issue 25: a shifted grid refused in one run stays refused under a new run id, under
    `runs: ["x"]` that falls back to predictions.csv, or under another task's labels)."""
    rows = pd.Series(table["score"].to_numpy(dtype=np.float64),
                     index=table["patient_id"].astype(str)).sort_index()
    h = hashlib.sha256("\x00".join(rows.index).encode())
    h.update(rows.to_numpy().tobytes())
    return h.hexdigest()[:24]


def _read(session: SiteSession, path: Path) -> pd.DataFrame:
    stat = path.stat()
    key = f"predictions.{path.name}.{stat.st_mtime_ns}.{stat.st_size}"
    if key not in session.cache:
        session.cache[key] = pd.read_csv(path, dtype={"patient_id": str},
                                         float_precision="round_trip")  # scores bit for bit
    return session.cache[key]


def groups(session: SiteSession, scores: Scores, columns: list[str]) -> dict[str, np.ndarray]:
    """Row masks of the patient groups validated apart: all, and `<column>=<value>` for each
    value of each subgroup column (a clinical column with few distinct values)."""
    out = {ALL: np.ones(len(scores.y), dtype=bool)}
    clinical = session.site.clinical
    for column in columns:
        if column not in clinical:
            continue  # a site without the column has no patient in its groups
        values = clinical.loc[scores.patients, column]
        levels = sorted({str(v) for v in values.dropna()})
        if len(levels) > MAX_LEVELS:
            raise QueryRejected(f"{session.site_id}: subgroup column {column!r} has "
                             f"{len(levels)} distinct values (at most {MAX_LEVELS})")
        for level in levels:
            out[f"{column}={level}"] = (values.astype(str) == level).to_numpy()
    return out


def released_groups(session: SiteSession, scores: Scores, columns: list[str]
                    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(groups the site releases, groups it withholds with the reason). Checked before any
    histogram is computed: a subgroup level whose patients differ from `all` or from a
    level kept before it by 0 < k < min_difference patients is withheld, since next to it
    the difference would be those few patients' histogram (the site's ledger would refuse
    it; this keeps the stage's own design from asking it)."""
    d = session.site.config.privacy.difference
    kept: dict[str, np.ndarray] = {}
    withheld: dict[str, str] = {}
    for name, mask in groups(session, scores, columns).items():
        close = next((other for other, m in kept.items()
                      if 0 < int(np.sum(mask ^ m)) < d), None)
        if close is None:
            kept[name] = mask
        else:
            withheld[name] = (f"withheld before release: its patients differ from those of "
                              f"{close!r} by fewer than min_difference ({d})")
    return kept, withheld


def validation_ranges(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 0: per model, n, Σ logit(score), Σ logit(score)², from which the server places
    that model's grid (`shared.validation.local_logit_moments`, where the wire is described).
    """
    models = site_scores(session, runs_of(query), listed(query.get("models")))
    names = sorted(models)
    out = [Statistic("catalog", {"models": names}, n=None)]
    for i, name in enumerate(names):
        scores = models[name].score
        out.append(Statistic(f"m{i}", {"moments": val.local_logit_moments(scores)},
                             n=len(scores), patients=list(models[name].patients.astype(str)),
                             family=disclosure.family("validation.logit_moments",
                                                      models[name].digest)))
    return out


def edges_for(query: Payload, model: str) -> np.ndarray:
    """The grid the server fixed for `model` (`grid.models` / `grid.e<i>`), else the
    uniform grid of `bins` bins; checked (`shared.roc.checked_grid`)."""
    names = listed(query.get("grid.models"))
    if model in names:
        return roc.checked_grid(query.get(f"grid.e{names.index(model)}"),
                                f"model {model!r}'s grid")
    if "bins" not in query:
        raise QueryRejected(f"no grid for model {model!r} and no bins")
    return roc.grid(int(query["bins"]))


def validation_scores(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 1: per model and patient group, each label's histogram on the server's grid.

    Crosses the wire: the list of models and groups (names, and each model's kind), and per
    (model, group) and label the coarsened cells (grid-bin range, count ≥ min_cell_count,
    and the cell's Σscore and Σscore²), released only when the group holds at least
    min_patients patients. No score, label or identifier of a patient.
    """
    models = site_scores(session, runs_of(query), listed(query.get("models")))
    columns = listed(query.get("subgroups"))
    min_cell = session.site.config.privacy.min_cell_count
    names = sorted(models)
    out = [Statistic("catalog", {"models": names, "kinds": [models[m].kind for m in names],
                                 "roles": list(session.site.config.roles)}, n=None)]
    for i, name in enumerate(names):
        scores = models[name]
        for patient in scores.missing:  # never dropped silently: named here, counted by n
            session.log_exclusion(patient, f"validation: no {name!r} score in {scores.file}")
        masks, withheld = released_groups(session, scores, columns)
        names = [*masks, *withheld]
        out.append(Statistic(f"m{i}", {"groups": names}, n=None))
        edges = edges_for(query, name)
        keep = roc.site_edges(edges, len(scores.y), min_cell)
        family = histogram_family(scores)
        for j, mask in enumerate(masks.values()):
            stat = _cells(f"m{i}.g{j}", scores.score[mask], scores.y[mask], edges, keep,
                          min_cell)
            out.append(replace(stat, patients=list(scores.patients[mask].astype(str)),
                               family=family, grid=histogram_pin(edges, len(scores.y),
                                                                 min_cell)))
        out += [Statistic(f"m{i}.g{len(masks) + j}", {}, n=None, refused=why)
                for j, why in enumerate(withheld.values())]
    return out


def histogram_family(scores: Scores) -> str:
    """Every histogram of one model's scores is one family, whatever its grid, group, run
    id or task: the ledger compares their patient sets and, over the same patients,
    releases them on one grid only (`shared.disclosure.pinned`)."""
    return disclosure.family("validation.histogram", scores.digest)


def _cells(name: str, score: np.ndarray, y: np.ndarray, edges: np.ndarray, keep: np.ndarray,
           min_cell: int) -> Statistic:
    """One group's two label histograms on the grid `edges[keep]` (the server's grid within
    the site's resolution, `shared.roc.site_edges`), coarsened to min_cell_count; cells as
    ranges of the server's bins, with each cell's Σscore and Σscore² (a cell holds ≥
    min_cell_count patients). The ledger compares every group of a model: a subgroup of all
    patients but a few, next to the whole, is refused."""
    coarse = edges[keep]
    hist = roc.local_histogram(score, y, coarse)
    sums, squares = val.local_score_sums(score, y, coarse)
    values: dict = {}
    for label in (0, 1):
        first, last, count = roc.cells_of(hist[label], min_cell)
        # a cell's sums: its bins' (cells are runs of bins, the bins between them empty)
        values.update({f"first{label}": keep[first], f"last{label}": keep[last + 1] - 1,
                       f"count{label}": count,
                       f"sum{label}": _cell_sums(sums[label], first),
                       f"sq{label}": _cell_sums(squares[label], first)})
    return Statistic(name, values, n=len(y), counts=("count0", "count1"))


def _cell_sums(per_bin: np.ndarray, first: np.ndarray) -> np.ndarray:
    return np.add.reduceat(per_bin, first) if len(first) else np.zeros(0)


def validation_moments(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 2: for each set of sites this site belongs to, the k × k placement-moment sums
    of the set's models over this site's patients (`shared.validation.local_cell_moments`).

    Query: `runs`, the grids, `sets` (set names) and per set `<set>.models` plus
    `<set>.d10` / `<set>.d01` (k × bins deviations of the set's pooled histograms).
    Checked before anything is computed: each model listed once, two or more of them, the
    deviations shaped and valued as a pooled histogram's placements
    (`shared.validation.check_placements`), and above min_cell_count 1 each model's grid
    that of its released histogram (`_grids_refused`). Each patient's placement is that of
    the cell the site released them in (`shared.validation.cell_values`: the grid within the
    site's resolution, coarsened to min_cell_count), so no placement reads out a bin inside
    a cell; one placement function per set and patients (`shared.disclosure.pinned`).
    Only the sets the site is in are answered (pooled, training or external by its roles,
    and its own `site:<id>`).
    Crosses the wire: per set, two k × k matrices of sums over ≥ min_patients patients, the
    number of patients scored by all k models (to check the set's patients are the
    histograms' patients), and `exact` (1 when every placement was constant on the cell it
    was evaluated on, so the sums equal the per-bin ones).
    """
    models = site_scores(session, runs_of(query), [])
    min_cell = session.site.config.privacy.min_cell_count
    out = []
    for s, set_name in enumerate(listed(query.get("sets"))):
        wanted = listed(query.get(f"s{s}.models"))
        if len(set(wanted)) != len(wanted) or len(wanted) < 2:
            raise QueryRejected(f"set {set_name!r}: a paired comparison lists two or more "
                                "models, each once")
        if not _member(session, set_name) or not all(m in models for m in wanted):
            continue
        chosen, grids = [models[m] for m in wanted], [edges_for(query, m) for m in wanted]
        d10, d01 = val.check_placements(query.get(f"s{s}.d10"), query.get(f"s{s}.d01"),
                                        [len(e) - 1 for e in grids])
        refused = _grids_refused(session, f"s{s}", chosen, grids, str(query.get("run_id")))
        out.append(Statistic(f"s{s}", {}, n=None, refused=refused) if refused else
                   _set_moments(f"s{s}", set_name, chosen, grids, d10, d01, min_cell))
    return out


def _grids_refused(session: SiteSession, key: str, scores: list[Scores],
                   grids: list[np.ndarray], run_id: str) -> str | None:
    """Above min_cell_count 1, the cells a set's sums are taken over must be those of the
    model's released histogram: each model's grid (within the site's resolution) is
    checked against, and recorded in, the ledger under the histogram's family, as a
    histogram on it would be. Otherwise a sum's diagonal would count cells of a grid the
    ledger never saw. None when all pass."""
    ledger = session.guard.ledger
    min_cell = session.site.config.privacy.min_cell_count
    if ledger is None or min_cell <= 1:
        return None
    common = scores[0].patients
    for model in scores[1:]:
        common = common.intersection(model.patients, sort=False)
    releases = [Release(f"{key}.grid{a}", histogram_family(model), list(common.astype(str)),
                        grid=histogram_pin(edges, len(model.y), min_cell))
                for a, (model, edges) in enumerate(zip(scores, grids, strict=True))]
    verdict = ledger.release(releases, message_type(schema.VALIDATION_MOMENTS), run_id)
    return next(iter(verdict.refused.values()), None)


def histogram_pin(edges: np.ndarray, n: int, min_cell: int) -> np.ndarray:
    """The ledger's grid of a model's histogram: its grid within the site's resolution,
    pinned (`shared.disclosure.pinned`; the last edge read as 1.0: a refined grid ends just
    above it)."""
    coarse = np.asarray(edges, dtype=np.float64)[roc.site_edges(edges, n, min_cell)]
    return disclosure.pinned(np.minimum(coarse, 1.0))


def _member(session: SiteSession, set_name: str) -> bool:
    """Whether this site is one of a comparison set's sites (as `server.stages.validation`
    makes them: pooled, training = train role, external = external role and not train)."""
    roles = set(session.site.config.roles)
    return (set_name == "pooled" or (set_name == "training" and "train" in roles)
            or (set_name == "external" and "external" in roles and "train" not in roles)
            or set_name == f"site:{session.site_id}")


def _set_moments(key: str, set_name: str, scores: list[Scores], grids: list[np.ndarray],
                 d10: np.ndarray, d01: np.ndarray, min_cell: int) -> Statistic:
    common = scores[0].patients
    for model in scores[1:]:
        common = common.intersection(model.patients, sort=False)
    y = pd.Series(scores[0].y, index=scores[0].patients).loc[common].to_numpy()
    values = np.zeros((2, len(scores), len(common)))  # [D01 of negatives, D10 of positives]
    exact = True
    for a, (model, edges) in enumerate(zip(scores, grids, strict=True)):
        keep = roc.site_edges(edges, len(model.y), min_cell)
        score = pd.Series(model.score, index=model.patients).loc[common].to_numpy()
        coarse = val.bin_index(score, edges[keep])
        for g, rows in ((0, d01), (1, d10)):
            mine = y == g
            first, last, _ = roc.cells_of(np.bincount(coarse[mine], minlength=len(keep) - 1),
                                          min_cell)
            cell, constant = val.cell_values(rows[a], score[mine], keep[coarse[mine]], edges,
                                             keep[first], keep[last + 1] - 1)
            values[g, a, mine] = cell
            exact &= constant
    moments = val.local_cell_moments(values[0], values[1], y)
    return Statistic(key, {"moments": moments, "set": set_name,
                           "n": np.array([np.sum(y == 0), np.sum(y == 1)]),
                           "exact": int(exact)},
                     n=len(y), counts=("n",), patients=list(common.astype(str)),
                     family=disclosure.family("validation.placements", set_name,
                                              *sorted(m.digest for m in scores)),
                     grid=disclosure.pinned(d10, d01))


def listed(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]
