"""Site side of the validation stage: the scores of every model, validated where they lie.

A model's scores at this site are the probabilities a fitting stage wrote to
`predictions/<model>-<run>.csv` (out-of-fold at a training site, the fold models' mean at
an external one), or an outside model's column in the site's own `predictions.csv`. They
never leave: the server gets per (model, patient group) label-stratified histograms on its
grid (coarsened to the site's min_cell_count), and in a second round the sums the paired
DeLong test needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from client.guard import Statistic
from client.session import SiteSession
from shared import disclosure, roc
from shared import validation as val
from shared.schema import Payload

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


def site_scores(session: SiteSession, runs: list[str], wanted: list[str]) -> dict[str, Scores]:
    """Every model this site has scores for: the run's prediction files (the first run in
    `runs` that has a model wins) and the outside models of `predictions.csv`. Each file
    is parsed once per process while it is unchanged (every round and stage reads them)."""
    labels = pd.Series(session.labels(), index=session.site.clinical.index)
    found: dict[str, Scores] = {}
    for run in runs:
        if not RUN_PATTERN.match(run):
            raise ValueError(f"bad run id {run!r}")
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
                  labels.loc[patients].to_numpy(), file, labels.index.difference(scores.index))


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
            raise ValueError(f"{session.site_id}: subgroup column {column!r} has "
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
                             family=disclosure.family("validation.moments", name,
                                                      runs_of(query))))
    return out


def edges_for(query: Payload, model: str) -> np.ndarray:
    """The grid the server fixed for `model` (`grid.models` / `grid.e<i>`), else the
    uniform grid of `bins` bins."""
    names = listed(query.get("grid.models"))
    if model in names:
        return np.asarray(query[f"grid.e{names.index(model)}"], dtype=np.float64)
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
        family = disclosure.family("validation.histogram", name, runs_of(query))
        for j, mask in enumerate(masks.values()):
            stat = _cells(f"m{i}.g{j}", scores.score[mask], scores.y[mask], edges, min_cell)
            out.append(replace(stat, patients=list(scores.patients[mask].astype(str)),
                               family=family, grid=edges))
        out += [Statistic(f"m{i}.g{len(masks) + j}", {}, n=None, refused=why)
                for j, why in enumerate(withheld.values())]
    return out


def _cells(name: str, score: np.ndarray, y: np.ndarray, edges: np.ndarray,
           min_cell: int) -> Statistic:
    """One group's two label histograms (the ledger compares every group of a model: a
    subgroup of all patients but a few, next to the whole, is refused)."""
    hist = roc.local_histogram(score, y, edges)
    sums, squares = val.local_score_sums(score, y, edges)
    values: dict = {}
    for label in (0, 1):
        first, last, count = roc.coarsen(hist[label], min_cell)
        # a merged cell's sums: its bins' (bins between cells are empty, so reduceat fits)
        values.update({f"first{label}": first, f"last{label}": last, f"count{label}": count,
                       f"sum{label}": _cell_sums(sums[label], first),
                       f"sq{label}": _cell_sums(squares[label], first)})
    return Statistic(name, values, n=len(y), counts=("count0", "count1"))


def _cell_sums(per_bin: np.ndarray, first: np.ndarray) -> np.ndarray:
    return np.add.reduceat(per_bin, first) if len(first) else np.zeros(0)


def validation_moments(session: SiteSession, query: Payload) -> list[Statistic]:
    """Round 2: for each set of sites this site belongs to, the k × k placement-moment sums
    of the set's models over this site's patients (`shared.validation.local_placement_moments`).

    Query: `runs`, the grids, `sets` (set names) and per set `<set>.models` plus
    `<set>.d10` / `<set>.d01` (k × bins deviations of the set's pooled histograms).
    Crosses the wire: per set, two k × k matrices of sums over ≥ min_patients patients, and
    the number of patients scored by all k models (to check the set's patients are the
    histograms' patients).
    """
    models = site_scores(session, runs_of(query), [])
    out = []
    for s, set_name in enumerate(listed(query.get("sets"))):
        wanted = listed(query.get(f"s{s}.models"))
        if not all(m in models for m in wanted):
            continue
        common = models[wanted[0]].patients
        for m in wanted[1:]:
            common = common.intersection(models[m].patients, sort=False)
        first = models[wanted[0]]
        y = pd.Series(first.y, index=first.patients).loc[common].to_numpy()
        bins = np.stack([val.bin_index(pd.Series(models[m].score, index=models[m].patients)
                                       .loc[common].to_numpy(), edges_for(query, m))
                         for m in wanted])
        moments = val.local_placement_moments(bins, y, np.asarray(query[f"s{s}.d10"]),
                                              np.asarray(query[f"s{s}.d01"]))
        out.append(Statistic(f"s{s}", {"moments": moments, "set": set_name,
                                       "n": np.array([np.sum(y == 0), np.sum(y == 1)])},
                             n=len(y), counts=("n",), patients=list(common.astype(str)),
                             family=disclosure.family(
                                 "validation.placements", wanted, runs_of(query),
                                 query[f"s{s}.d10"], query[f"s{s}.d01"],
                                 *[edges_for(query, m) for m in wanted])))
    return out


def listed(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]
