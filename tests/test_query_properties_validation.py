"""The validation and refinement queries (validation_ranges, validation_scores,
validation_moments, scores_refine) over any parameters a hostile coordinator may send —
model lists with repeats, grids of any size, order and range, comparison sets, placement
arrays of any shape and value, refinement grids and split lists — against a default-policy
site (38 patients, min_cell_count 3): the site never crashes (every reply is `ok` or
`refused`), and what it releases is what its policy allows, checked against its own
prediction file:
- every count cell is 0 or ≥ min_cell_count;
- a model's histogram cells lie on a grid of at most n // min_cell_count bins;
- a refinement sub-cell holds patients of one score value only, and a one-value flag is
  given only for a bin holding ≥ min_cell_count patients;
- placement sums come only for two or more distinct models, for sets the site is in, and
  equal the sums over the site's released cells, each read at its mean score (no bin
  inside a cell is read).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.handlers import serve
from shared import refine, roc, schema
from shared import validation as val
from shared.queries.bounds import max_bins
from tests.adversarial.test_attack_validation import MODEL, OTHER, N, write_site

MIN_CELL = 3
MODELS = st.one_of(st.just([MODEL, OTHER]), st.just([MODEL]),
                   st.lists(st.sampled_from([MODEL, OTHER, "zz", "m_a "]), max_size=4))
SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    folder, truth = write_site(tmp_path_factory.mktemp("validation-properties"))
    table = pd.read_csv(folder / "predictions.csv", dtype={"patient_id": str},
                        float_precision="round_trip")
    scores = {m: rows.set_index("patient_id").score.loc[truth.patient_id].to_numpy()
              for m, rows in table.groupby("model")}
    return folder, truth.label.to_numpy(), scores


# --------------------------------------------------------------------------- strategies


@st.composite
def grids(draw: st.DrawFn) -> object:
    """Edges a server might send: uniform of any size, random, unsorted, out of [0, 1],
    not finite, 2-D, tiny."""
    kind = draw(st.sampled_from(["uniform", "uniform", "random", "random", "fine", "fine",
                                 "unsorted", "range", "nan", "2d", "one"]))
    bins = draw(st.integers(1, 3000))
    if kind == "uniform":
        return roc.grid(bins)
    if kind == "fine":
        return roc.grid(draw(st.sampled_from([99_999, 50_000, 12, 13])))
    inner = np.sort(np.asarray(draw(st.lists(st.floats(0.001, 0.999), min_size=0,
                                             max_size=40)), dtype=np.float64))
    edges = np.unique(np.r_[0.0, inner, 1.0])
    if kind == "unsorted":
        return edges[::-1].copy()
    if kind == "range":
        return edges * 0.5 + 0.2
    if kind == "nan":
        return np.r_[edges, np.nan]
    if kind == "2d":
        return np.stack([edges, edges])
    if kind == "one":
        return np.array([0.0])
    return edges


def grid_keys(draw: st.DrawFn, models: list[str]) -> dict:
    query: dict = {}
    if draw(st.integers(0, 3)):
        query["bins"] = draw(st.integers(2, 100_000))
    if draw(st.booleans()):
        query["grid.models"] = models
        for i, _ in enumerate(models):
            query[f"grid.e{i}"] = draw(grids())
    return query


def placements(draw: st.DrawFn, k: int, bins: int, rising: bool) -> np.ndarray:
    kind = draw(st.sampled_from(["pooled", "pooled", "pooled", "step", "step", "one-hot",
                                 "random", "shape", "nan"]))
    rows = max(k, 1)
    if kind == "pooled":  # what `placement_deviations` makes of a random pooled histogram
        counts = np.asarray(draw(st.lists(st.integers(0, 9), min_size=2 * bins,
                                          max_size=2 * bins))).reshape(2, bins)
        counts[:, 0] += 1
        _, d10, d01 = val.placement_deviations(counts)
        return np.stack([d10 if rising else d01] * rows)
    if kind == "one-hot":
        out = np.zeros((rows, bins))
        out[np.arange(rows), np.minimum(np.arange(rows), bins - 1)] = 1.0
        return out
    if kind == "step":
        at = draw(st.integers(0, bins))
        step = (np.arange(bins) >= at) - 0.5
        return np.stack([step if rising else -step] * rows).astype(float)
    if kind == "shape":
        return np.zeros((rows + draw(st.integers(1, 3)), max(bins - 1, 1)))
    if kind == "nan":
        return np.full((rows, bins), np.nan)
    return np.asarray(draw(st.lists(st.floats(-2, 2), min_size=rows * bins,
                                    max_size=rows * bins))).reshape(rows, bins)


@st.composite
def queries(draw: st.DrawFn, action: str) -> dict:
    models = draw(MODELS)
    query: dict = {"task": "label", "needs": ["predictions?"], "models": models}
    if draw(st.booleans()):
        query["runs"] = draw(st.sampled_from([["x"], ["r0", "x"], [], ["a.b-c"]]))
    if draw(st.booleans()):
        query["subgroups"] = draw(st.sampled_from([["label"], ["nope"], []]))
    query.update(grid_keys(draw, models))
    if action == schema.VALIDATION_MOMENTS:
        sets = draw(st.lists(st.sampled_from(["pooled", "pooled", "external", "site:site-a",
                                              "training", "site:site-b", "x"]),
                             min_size=1, max_size=2))
        query["sets"] = sets
        bins = draw(st.sampled_from([12, 13, 40, 200]))
        for s, _ in enumerate(sets):
            members = [MODEL, OTHER] if draw(st.integers(0, 2)) else draw(MODELS)
            query[f"s{s}.models"] = members
            query[f"s{s}.d10"] = placements(draw, len(members), bins, rising=True)
            query[f"s{s}.d01"] = placements(draw, len(members), bins, rising=False)
        query["grid.models"] = [MODEL, OTHER]
        query["grid.e0"] = query["grid.e1"] = roc.grid(bins) if draw(st.integers(0, 3)) \
            else draw(grids())
    if action == schema.SCORES_REFINE:
        wanted = draw(MODELS)
        query["refine.models"] = wanted
        for i, _ in enumerate(wanted):
            grid = draw(st.sampled_from([roc.grid(1), roc.grid(3), roc.grid(12), roc.grid(200)]))
            query[f"r.m{i}.grid"] = grid if draw(st.integers(0, 3)) else draw(grids())
            rounds = draw(st.sampled_from([1, 1, 2, 3, 0]))
            query[f"r.m{i}.rounds"] = rounds
            bits = refine.bit_edges(grid)
            for r in range(rounds):
                lo, hi = split_list(draw, bits)
                query[f"r.m{i}.r{r}.lo"], query[f"r.m{i}.r{r}.hi"] = lo, hi
    return query


def split_list(draw: st.DrawFn, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kind = draw(st.sampled_from(["grid", "grid", "intervals", "intervals", "mismatch",
                                 "floats"]))
    if kind == "grid":  # every bin of the grid (its own cells among them)
        return bits[:-1], bits[1:]
    if kind == "intervals":  # any key intervals (a bisection's)
        x = np.sort(np.asarray(draw(st.lists(st.floats(0, 1), min_size=2, max_size=30))))
        i, j = np.triu_indices(len(x), k=1)
        return refine.keys(x)[i], refine.keys(x)[j]
    if kind == "mismatch":
        return bits[:-1], bits[:1]
    return np.asarray([0.5, np.inf]), np.asarray([0.7, 1.0])


# --------------------------------------------------------------------------- the policy


def check_reply(reply: dict, query: dict, action: str, site: tuple) -> None:
    assert reply["status"] in ("ok", "refused"), reply.get("reason")
    for key, value in reply.items():
        if key.endswith(("count0", "count1", ".n")):
            cells = np.asarray(value)
            assert not np.any((cells > 0) & (cells < MIN_CELL)), (key, cells)
    if reply["status"] != "ok":
        return
    models = list(reply.get("catalog.models", []))
    if action == schema.VALIDATION_SCORES:
        for i, _ in enumerate(models):
            bounds = set()
            for g in (0, 1):
                bounds |= set(np.asarray(reply.get(f"m{i}.g0.first{g}", [])).tolist())
                bounds |= {b + 1 for b in np.asarray(reply.get(f"m{i}.g0.last{g}", [])).tolist()}
            assert len(bounds) <= max_bins(N, MIN_CELL) + 1
    if action == schema.SCORES_REFINE:
        check_refinement(reply, query, site)
    if action == schema.VALIDATION_MOMENTS:
        check_moments(reply, query, site)


def check_refinement(reply: dict, query: dict, site: tuple) -> None:
    _, labels, scores = site
    wanted = list(query.get("refine.models", []))
    for i, model in enumerate(reply.get("catalog.models", [])):
        spec = f"r.m{wanted.index(model)}"
        last = int(query[f"{spec}.rounds"]) - 1
        lo = np.asarray(query[f"{spec}.r{last}.lo"], dtype=np.int64)
        hi = np.asarray(query[f"{spec}.r{last}.hi"], dtype=np.int64)
        k = refine.keys(scores[model])
        flags = np.asarray(reply.get(f"m{i}.flags.one_value", []))
        for s in np.flatnonzero(flags >= 0):
            assert np.sum((k >= lo[s]) & (k < hi[s])) >= MIN_CELL
        width = refine.sub_width(lo, hi)
        for g in (0, 1):
            split = np.asarray(reply.get(f"m{i}.g0.split{g}", []), dtype=np.int64)
            first = np.asarray(reply.get(f"m{i}.g0.first{g}", []), dtype=np.int64)
            end = np.asarray(reply.get(f"m{i}.g0.last{g}", []), dtype=np.int64)
            mine = k[labels == g]
            for s, f, la in zip(split, first, end, strict=True):
                a, b = lo[s] + f * width[s], min(lo[s] + (la + 1) * width[s], hi[s])
                inside = mine[(mine >= a) & (mine < b)]
                assert len(inside) >= MIN_CELL and inside.min() == inside.max()


def check_moments(reply: dict, query: dict, site: tuple) -> None:
    _, labels, scores = site
    for s, name in enumerate(query["sets"]):
        if f"s{s}.moments" not in reply:
            continue
        members = list(query[f"s{s}.models"])
        assert len(members) == len(set(members)) >= 2
        assert name in ("pooled", "external", "site:site-a")  # an external site's sets
        moments = np.asarray(reply[f"s{s}.moments"])
        names = list(query["grid.models"])
        for a, model in enumerate(members):
            edges = np.asarray(query[f"grid.e{names.index(model)}"], dtype=np.float64)
            cells = roc.site_cells(scores[model], labels, edges, N, MIN_CELL)
            for g, rows in ((0, query[f"s{s}.d01"]), (1, query[f"s{s}.d10"])):
                row = np.asarray(rows, dtype=np.float64)[a]
                first, last, count = cells[g]
                mine = scores[model][labels == g]
                # each cell read at the bin of its mean score (released: its Σscore / count)
                at = [int(np.clip(np.searchsorted(edges, mine[(mine >= edges[f]) & (
                    (mine < edges[la + 1]) | (la + 1 == len(edges) - 1))].mean(),
                    side="right") - 1, f, la)) for f, la in zip(first, last, strict=True)]
                expected = float(np.dot(count, np.square(row[at]))) if len(at) else 0.0
                assert moments[g, a, a] == pytest.approx(expected, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- the tests


def ask(site: tuple, action: str, query: dict, run_id: str) -> dict:
    """One query on a fresh ledger: the policy's per-release rules are the subject here
    (the ledger would refuse most grids after the first; tests/adversarial/test_attack_validation.py
    holds it to the rules across releases)."""
    for path in (site[0] / "audit").glob("disclosures.sqlite*"):
        path.unlink()
    return serve(site[0], action, query, run_id)


@SETTINGS
@given(data=st.data(), action=st.sampled_from([schema.VALIDATION_RANGES,
                                               schema.VALIDATION_SCORES]))
def test_ranges_and_histograms_release_only_what_the_policy_allows(site, data,
                                                                   action: str) -> None:
    query = data.draw(queries(action))
    reply = ask(site, action, query, data.draw(st.sampled_from(["r1", "r2", "hyp"])))
    check_reply(reply, query, action, site)


@SETTINGS
@given(data=st.data())
def test_placement_sums_release_only_what_the_policy_allows(site, data) -> None:
    query = data.draw(queries(schema.VALIDATION_MOMENTS))
    reply = ask(site, schema.VALIDATION_MOMENTS, query, "hyp")
    check_reply(reply, query, schema.VALIDATION_MOMENTS, site)


@SETTINGS
@given(data=st.data())
def test_refinement_releases_only_what_the_policy_allows(site, data) -> None:
    query = data.draw(queries(schema.SCORES_REFINE))
    reply = ask(site, schema.SCORES_REFINE, query, "hyp")
    check_reply(reply, query, schema.SCORES_REFINE, site)
