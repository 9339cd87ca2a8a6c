"""Issue 25, attack classes 4 and 5 (validation): a hostile coordinator calls a default-policy
site's handlers (`client.handlers.serve`) directly and tries to read its patients' model
scores and labels out of the validation and refinement queries.

The site: 38 patients, the default policy (min_patients 10, min_cell_count 3, min_difference
10), an outside model's float64 scores in `predictions.csv`. What an attacker learns is
compared with that file, not with refusal strings.

Before the fix (commit 862bbee) these tests recovered:
- 4a: a 100,000-bin grid with each cell's first/last bin, Σscore and Σscore² gave 38/38
  (score, label) pairs to within 1e-4;
- 4b: `validation_moments` with the model listed 20 times and one-hot placement rows gave the
  uncoarsened per-bin counts of both labels on a 100-bin grid (every bin right: 34 non-empty
  bins, each of 1 or 2 patients); a single one-hot row was answered too;
- 4c: a 3-bin grid and its sub-histograms (`scores_refine`): the sub-cells' first/last
  sub-bins are the extreme patients' scores, 17/38 (score, label) pairs exact;
- 4d: `scores_refine`'s one-value flags asked for every interval of a 300-point grid located
  31 bins holding one or two patients;
- 4e: placement sums for the same set were answered for any number of placement functions;
- 4f: placement sums on a grid shifted from the released histogram's, with step placements:
  5 patients counted in intervals holding one or two of a label;
- 5: a grid shifted from a released one, refused by the ledger, was released with
  `runs: ["x"]` and under a new run id: 8 patients counted in intervals holding one or two
  of a label (differences of the two releases' cells);
- 5b: coarser grids nested in a released one (the ledger allowed them): 9 such patients.

After the fix: 0/38 pairs, no per-bin count, 0 scores, no located bin, one placement function
per set, 0 patients (each test's last assertion).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from client.handlers import serve
from client.site.session import clear_sessions
from shared import refine, roc, schema
from shared.schema import nest

N = 38
MODEL = "m_a"
OTHER = "m_b"


def write_site(root: Path, seed: int = 5) -> tuple[Path, pd.DataFrame]:
    """A default-policy site (its privacy block empty) with one outside model's scores."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.r_[np.zeros(N // 2, int), np.ones(N - N // 2, int)])
    score = 1 / (1 + np.exp(-(1.2 * y - 0.6 + rng.normal(0, 1, N))))
    frame = pd.DataFrame({"patient_id": [f"p{i:03d}" for i in range(N)], "label": y,
                          "score": [float(repr(float(s))) for s in score]})
    folder = root / "site-a"
    folder.mkdir(parents=True)
    (folder / "site.yaml").write_text(yaml.safe_dump(
        {"site_id": "site-a", "roles": ["external"], "time_unit": "days"}))
    frame[["patient_id", "label"]].to_csv(folder / "clinical.csv", index=False)
    other = 1 / (1 + np.exp(-(0.8 * y - 0.4 + rng.normal(0, 1, N))))
    pd.concat([pd.DataFrame({"patient_id": frame.patient_id, "model": m, "score": v})
               for m, v in ((MODEL, [repr(s) for s in frame.score]),
                            (OTHER, [repr(float(s)) for s in other]))]).to_csv(
        folder / "predictions.csv", index=False)
    clear_sessions()
    return folder, frame


def ask(folder: Path, action: str, query: dict, run_id: str = "r1") -> dict:
    return serve(folder, action, {"task": "label", "needs": ["predictions?"], **query}, run_id)


def matched(recovered: list[tuple[float, int]], truth: pd.DataFrame, tol: float = 1e-4) -> int:
    """How many of the site's (score, label) pairs the attacker holds to within `tol`
    (one recovered pair per patient)."""
    left = list(recovered)
    hits = 0
    for s, y in zip(truth.score, truth.label, strict=True):
        best = next((i for i, (r, g) in enumerate(left) if g == y and abs(r - s) < tol), None)
        if best is not None:
            hits += 1
            left.pop(best)
    return hits


def cells_of(reply: dict, prefix: str) -> list[tuple[int, int, int, int, float, float]]:
    """(label, first, last, count, Σscore, Σscore²) of every released cell."""
    out = []
    for g in (0, 1):
        keys = [f"{prefix}.{k}{g}" for k in ("first", "last", "count", "sum", "sq")]
        if all(k in reply for k in keys):
            out += [(g, *row) for row in zip(*(np.asarray(reply[k]).tolist() for k in keys),
                                             strict=True)]
    return out


def solve_cell(lo: float, hi: float, count: int, total: float, squares: float) -> list[float]:
    """A cell's scores from its range and moments: the extremes at the centres of its first
    and last bin, the (at most two) others from Σ and Σ²."""
    if count == 1:
        return [total]
    inner = count - 2
    ends = [lo, hi] if count > 1 else []
    s, q = total - sum(ends), squares - sum(e * e for e in ends)
    if inner == 0:
        return ends
    if inner == 1:
        return [*ends, s]
    if inner == 2:  # a + b = s, a² + b² = q
        disc = max(2 * q - s * s, 0.0)
        return [*ends, (s - np.sqrt(disc)) / 2, (s + np.sqrt(disc)) / 2]
    return [*ends, *[s / inner] * inner]  # more than 4: a guess


# --------------------------------------------------------------------------- class 4


def test_4a_a_fine_grid_with_cell_moments_gives_no_score(tmp_path: Path) -> None:
    folder, truth = write_site(tmp_path)
    bins = 100_000
    reply = ask(folder, schema.VALIDATION_SCORES, {"bins": bins, "models": [MODEL]})
    edges = roc.grid(bins)
    width = edges[1] - edges[0]
    recovered = []
    for g, first, last, count, total, squares in cells_of(reply, "m0.g0"):
        lo, hi = edges[first] + width / 2, edges[last] + width / 2
        recovered += [(s, g) for s in solve_cell(lo, hi, count, total, squares)]
    # 862bbee: 38/38 pairs to within 1e-4
    assert matched(recovered, truth) == 0
    # what it may learn: cells of >= 3 patients whose bounds lie on a grid of at most
    # n // min_cell_count = 12 bins
    cells = cells_of(reply, "m0.g0")
    assert cells and all(c[3] >= 3 for c in cells)
    bounds = {c[1] for c in cells} | {c[2] + 1 for c in cells} | {0, bins}
    assert len(bounds) <= N // 3 + 1


def per_bin_counts_by_one_hot(folder: Path, bins: int) -> np.ndarray | None:
    """Class 4b: the model listed 20 times, row j of the placements one-hot on bin b + j:
    the diagonal of each label's k × k sum is that label's count in each bin."""
    counts = np.zeros((2, bins))
    for start in range(0, bins, 20):
        rows = np.zeros((20, bins))
        rows[np.arange(20), start + np.arange(20)] = 1.0
        reply = ask(folder, schema.VALIDATION_MOMENTS, {
            "sets": ["pooled"], "s0.models": [MODEL] * 20, "grid.models": [MODEL],
            "grid.e0": roc.grid(bins), "s0.d10": rows, "s0.d01": rows}, f"m{start}")
        if "s0.moments" not in reply:
            return None
        moments = np.asarray(reply["s0.moments"])
        counts[0, start:start + 20] = np.diag(moments[0])
        counts[1, start:start + 20] = np.diag(moments[1])
    return counts


def test_4b_one_model_listed_twenty_times_with_one_hot_rows(tmp_path: Path) -> None:
    folder, truth = write_site(tmp_path)
    bins = 100
    learned = per_bin_counts_by_one_hot(folder, bins)
    true = roc.local_histogram(truth.score.to_numpy(), truth.label.to_numpy(), roc.grid(bins))
    assert (true > 0).sum() and ((true > 0) & (true < 3)).sum() >= 10  # small cells exist
    # 862bbee: learned == true, every bin (29 cells of 1 or 2 patients)
    assert learned is None or not np.array_equal(learned, true)
    if learned is not None:
        assert not np.any((learned > 0) & (learned < 3))


def test_4b_placements_that_are_no_pooled_placements_are_refused(tmp_path: Path) -> None:
    """Each model once, with rows shaped as a pooled histogram's placements would be: a
    single one-hot row (not monotone) releases nothing."""
    folder, _ = write_site(tmp_path)
    row = np.zeros((1, 100))
    row[0, 40] = 1.0
    reply = ask(folder, schema.VALIDATION_MOMENTS, {
        "sets": ["pooled"], "s0.models": [MODEL], "grid.models": [MODEL],
        "grid.e0": roc.grid(100), "s0.d10": row, "s0.d01": row})
    assert "s0.moments" not in reply


def test_4c_sub_histograms_carry_no_patient_score(tmp_path: Path) -> None:
    """A coarse grid, then every bin split (`scores_refine`): the sub-cells' first/last
    sub-bins are the extreme patients' scores to 2⁻³² of the bin; with the first round's Σ
    and Σ² the middle one follows."""
    folder, truth = write_site(tmp_path)
    bins = 3
    edges = roc.grid(bins)
    first = ask(folder, schema.VALIDATION_SCORES, {"bins": bins, "models": [MODEL]})
    bits = refine.bit_edges(edges)
    recovered = []
    for g, a, b, count, total, squares in cells_of(first, "m0.g0"):
        lo, hi = bits[a:b + 1], bits[a + 1:b + 2]
        reply = ask(folder, schema.SCORES_REFINE, {
            "refine.models": [MODEL], "r.m0.grid": edges, "r.m0.rounds": 1,
            "r.m0.r0.lo": lo, "r.m0.r0.hi": hi})
        part = nest(reply, "m0.g0")
        if f"count{g}" not in part or not len(part[f"count{g}"]):
            continue
        width = refine.sub_width(lo, hi)
        split = np.asarray(part[f"split{g}"])
        f, la = np.asarray(part[f"first{g}"]), np.asarray(part[f"last{g}"])
        low = refine.float_edges(lo[split] + f * width[split])
        high = refine.float_edges(lo[split] + la * width[split])
        if len(split) == 1 and part[f"count{g}"][0] == count:
            recovered += [(s, g) for s in solve_cell(low[0], high[0], count, total, squares)]
        else:
            recovered += [(s, g) for pair in zip(low, high, strict=True) for s in pair]
    # 862bbee: 36/38 scores exact to 1e-4 (every cell of 3 and its extremes)
    assert matched(recovered, truth) <= 1


def test_4d_one_value_flags_of_chosen_intervals_locate_no_patient(tmp_path: Path) -> None:
    """`one_value` is −1 for a split bin holding fewer than 3 of the site's patients. Asked
    for every interval [x_i, x_j) of a 300-point grid in one message, the shortest interval
    from each x_i holding 3 patients ends in the bin of a patient."""
    folder, truth = write_site(tmp_path)
    x = np.linspace(0.0, 1.0, 301)
    i, j = np.triu_indices(len(x), k=1)
    keys = refine.keys(x)
    reply = ask(folder, schema.SCORES_REFINE, {
        "refine.models": [MODEL], "r.m0.grid": np.array([0.0, 1.0]), "r.m0.rounds": 1,
        "r.m0.r0.lo": keys[i], "r.m0.r0.hi": keys[j]})
    flags = np.asarray(reply.get("m0.flags.one_value", np.full(len(i), -1)))
    occupied = set()
    for start in range(len(x)):
        ends = j[(i == start) & (flags >= 0)]
        if len(ends):
            occupied.add(int(ends.min()) - 1)  # the bin of the 3rd patient from x_start
    true = np.histogram(truth.score, x)[0]
    small = {b for b in occupied if 0 < true[b] < 3}
    # 862bbee: 31 bins holding one or two patients located
    assert len(small) == 0


def test_4e_a_set_releases_its_sums_for_one_placement_function(tmp_path: Path) -> None:
    """Two models, each once, monotone placements: each message's cross sum is one equation
    in the joint table of the patients' cells under the two models. The site answers a set
    for one placement function (the same again in a re-run), not for a second."""
    folder, _ = write_site(tmp_path)
    grid = roc.grid(12)

    def step(at: int, rising: bool) -> np.ndarray:
        row = (np.arange(12) >= at).astype(float)
        return np.stack([row - 0.5, row - 0.5]) if rising else np.stack([0.5 - row] * 2)

    def moments(at: int, run: str) -> dict:
        return ask(folder, schema.VALIDATION_MOMENTS, {
            "sets": ["pooled"], "s0.models": [MODEL, OTHER], "grid.models": [MODEL, OTHER],
            "grid.e0": grid, "grid.e1": grid, "s0.d10": step(at, True),
            "s0.d01": step(at, False)}, run)

    assert "s0.moments" in moments(6, "r1")
    assert "s0.moments" in moments(6, "r2")  # the same placements again: a re-run
    assert all("s0.moments" not in moments(at, f"r{at}") for at in (3, 4, 5, 7, 8))


def test_4f_placement_sums_on_a_grid_shifted_from_the_histogram(tmp_path: Path) -> None:
    """The histogram on one grid, then placement sums on a shifted one: with D10 a step at
    an edge t, a set's positive-label sum counts the positives above t; next to the
    histogram's top cell it leaves the few between t and that cell's edge."""
    folder, truth = write_site(tmp_path)
    a, b = shifted_pair()
    first = ask(folder, schema.VALIDATION_SCORES, {"models": [MODEL], "grid.models": [MODEL],
                                                   "grid.e0": a})
    known = [(a, first)]
    for s, (name, t) in enumerate((("pooled", 3), ("external", 4), ("site:site-a", 5))):
        step = (np.arange(len(b) - 1) >= t).astype(float)
        reply = ask(folder, schema.VALIDATION_MOMENTS, {
            "sets": [name], "s0.models": [MODEL, OTHER], "grid.models": [MODEL, OTHER],
            "grid.e0": b, "grid.e1": b, "s0.d10": np.stack([step, step]),
            "s0.d01": -np.stack([step, step])}, f"m{s}")
        if "s0.moments" in reply:  # positives at or above b[t]: one tiled "cell" [b[t], 1]
            above = round(float(np.asarray(reply["s0.moments"])[1, 0, 0]))
            below = int(np.asarray(reply["s0.n"])[1]) - above
            known.append((np.array([0.0, b[t], 1.0]), {
                "m0.g0.first1": [0, 1], "m0.g0.last1": [0, 1], "m0.g0.count1": [below, above],
                **{f"m0.g0.{k}1": [0.0, 0.0] for k in ("sum", "sq")}}))
    # 862bbee: all three answered, 5 patients counted in intervals of one or two
    assert small_counts_learned(known, truth) == 0


# --------------------------------------------------------------------------- class 5


def shifted_pair() -> tuple[np.ndarray, np.ndarray]:
    a = np.linspace(0.0, 1.0, 7)
    b = np.r_[0.0, a[1:-1] + 0.05, 1.0]
    return a, b


def known_counts(edges: np.ndarray, reply: dict, label: int) -> dict:
    """What one release says of one label: each cell's count over its edges, and zero over
    the bins between cells (nothing there)."""
    out: dict = {}
    cells = [c for c in cells_of(reply, "m0.g0") if c[0] == label]
    end = 0
    for _, first, last, count, _, _ in cells:
        if first > end:
            out[(edges[end], edges[first])] = 0
        out[(edges[first], edges[last + 1])] = count
        end = last + 1
    if cells and end < len(edges) - 1:
        out[(edges[end], edges[-1])] = 0
    return out


def small_counts_learned(releases: list[tuple[np.ndarray, dict]], truth: pd.DataFrame) -> int:
    """Patients the attacker counts in an interval holding one or two of a label: from the
    releases' cells, and every difference of two known intervals sharing an end (only
    counts that are right, against the site's file)."""
    learned = 0
    for g in (0, 1):
        s = truth.score[truth.label == g].to_numpy()
        known: dict = {}
        for edges, reply in releases:
            known.update(known_counts(edges, reply, g))
        for _ in range(2):
            for (a, b), n in list(known.items()):
                for (c, d), m in list(known.items()):
                    if a == c and d < b:
                        known.setdefault((d, b), n - m)
                    elif b == d and a < c:
                        known.setdefault((a, c), n - m)
        learned += sum(n for (a, b), n in known.items() if 0 < n < 3
                       and n == np.sum((s >= a) & ((s < b) | (b >= 1.0))))
    return learned


@pytest.mark.parametrize("bypass", ["runs", "run_id"])
def test_5_a_refused_shifted_grid_stays_refused(tmp_path: Path, bypass: str) -> None:
    folder, truth = write_site(tmp_path)
    a, b = shifted_pair()
    base = {"models": [MODEL], "grid.models": [MODEL]}
    first = ask(folder, schema.VALIDATION_SCORES, {**base, "grid.e0": a})
    assert "m0.g0.count0" in first
    again = ask(folder, schema.VALIDATION_SCORES, {**base, "grid.e0": b})
    assert "m0.g0.count0" not in again  # the ledger refuses it in the same run
    query = {**base, "grid.e0": b, **({"runs": ["x"]} if bypass == "runs" else {})}
    second = ask(folder, schema.VALIDATION_SCORES, query, "r2" if bypass == "run_id" else "r1")
    released = [(a, first)] + ([(b, second)] if "m0.g0.count0" in second else [])
    # 862bbee: both released, 8 patients counted in intervals of one or two
    assert small_counts_learned(released, truth) == 0


def test_5_a_coarser_grid_next_to_a_merged_cell(tmp_path: Path) -> None:
    """The ledger lets nested grids pass (one refines the other), but a cell merged for
    min_cell_count, next to a coarser grid's cell, differs from it by one or two patients."""
    folder, truth = write_site(tmp_path)
    fine = roc.grid(12)
    learned = []
    for drop in range(1, 11):  # the fine grid, then coarser ones without one edge each
        edges = fine if not learned else np.delete(fine, drop)
        reply = ask(folder, schema.VALIDATION_SCORES, {
            "models": [MODEL], "grid.models": [MODEL], "grid.e0": edges}, f"n{drop}")
        if "m0.g0.count0" in reply:
            learned.append((edges, reply))
    # 862bbee: every grid released, 9 patients counted in intervals of one or two
    assert small_counts_learned(learned, truth) == 0
