"""Score-grid refinement rounds (`shared.refine`): after a stage's first histogram round,
ask the sites for sub-histograms of the bins that hold both labels, until every such bin is
proven to hold one score value (the statistics are then exact on the raw scores) or no
site can refine further, at most `shared.refine.MAX_ROUNDS` rounds.

Each round is one `scores_refine` message per site, listed in the run's wire log like any
other; `Refinement.summary()` states the rounds and reply bytes the stage spent on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.core.progress import report_round
from server.core.transport import Reply, Transport
from shared import refine, roc, schema
from shared.refine import KeyCells, SitePart
from shared.schema import Payload, nest

log = logging.getLogger("feddlr")

# model → group → site → (label-0 cells, label-1 cells), as key intervals
FirstRound = Mapping[str, Mapping[str, Mapping[str, tuple[KeyCells, KeyCells]]]]


@dataclass
class Refinement:
    """The refined state of every model: grid keys, each (group, site)'s cells and flags."""

    base: dict[str, np.ndarray]  # model → first-round grid keys
    cells: dict[str, dict[str, dict[str, list[KeyCells]]]]  # model → group → site → [c0, c1]
    flagged: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)
    history: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    rounds: int = 0
    bytes: int = 0
    messages: int = 0
    per_round: list[dict[str, Any]] = field(default_factory=list)

    def bits(self, model: str) -> np.ndarray:
        """The model's refined grid (keys): first-round edges and every cell bound."""
        every = [c for by_site in self.cells[model].values() for pair in by_site.values()
                 for c in pair]
        return refine.refined_edges(self.base[model], every)

    def parts(self, model: str, group: str, sites: list[str]) -> list[SitePart]:
        return [self.part(model, group, s) for s in sites if s in self.cells[model].get(group, {})]

    def part(self, model: str, group: str, site: str) -> SitePart:
        pair = self.cells[model][group][site]
        flags = self.flagged.get(model, {}).get(site, [])
        table = np.asarray(flags, dtype=np.int64).reshape(-1, 2)
        return SitePart((pair[0], pair[1]), (table[:, 0], table[:, 1]))

    def splits(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """The next round's split bins of a model: `shared.refine.splittable` in any group,
        pooled over every site (a bin mixed in a subset of sites is mixed in the pool)."""
        bits = self.bits(model)
        todo = np.zeros(len(bits) - 1, dtype=bool)
        for group, by_site in self.cells[model].items():
            parts = self.parts(model, group, sorted(by_site))
            todo |= refine.splittable(bits, parts)
        index = np.flatnonzero(todo)
        return bits[index], bits[index + 1]

    def summary(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "messages": self.messages, "bytes": self.bytes,
                "per_round": self.per_round, "sub_bins": refine.SUB_BINS,
                "max_rounds": refine.MAX_ROUNDS}


def start(first: FirstRound, grids: Mapping[str, np.ndarray]) -> Refinement:
    """The state after the first histogram round: each model's grid `grids[model]`."""
    return Refinement({m: refine.bit_edges(grids[m]) for m in first},
                      {m: {g: {s: list(pair) for s, pair in by_site.items()}
                           for g, by_site in groups.items()} for m, groups in first.items()})


def run(transport: Transport, context: Payload, state: Refinement, grids: Mapping[str, np.ndarray],
        stage: str, max_rounds: int = refine.MAX_ROUNDS) -> Refinement:
    """Refinement rounds until no model has a bin to split (or `max_rounds`). A site that
    fails a round keeps its cells as they were and is not asked again."""
    active = sorted({s for groups in state.cells.values() for by_site in groups.values()
                     for s in by_site})
    while state.rounds < max_rounds and active:
        todo = {m: state.splits(m) for m in state.cells}
        todo = {m: split for m, split in todo.items() if len(split[0])}
        if not todo:
            break
        models = sorted(todo)
        query: Payload = dict(context, **{"refine.models": models})
        for i, model in enumerate(models):
            state.history.setdefault(model, []).append(todo[model])
            query.update(_model_query(f"r.m{i}", grids[model], state.history[model]))
        sites = [s for s in active if any(s in by_site for m in models
                                          for by_site in state.cells[m].values())]
        replies = transport.ask(schema.SCORES_REFINE, query, sites)
        state.rounds += 1
        report_round(f"{stage}:refine", state.rounds, max_rounds, replies)
        size = sum(schema.digest(r.payload)[0] for r in replies.values() if r.payload)
        state.bytes += size
        state.messages += len(replies)
        state.per_round.append({"round": state.rounds, "sites": len(sites), "bytes": size,
                                "split_bins": {m: len(todo[m][0]) for m in models}})
        for site, reply in replies.items():
            if not (reply.ok and _absorb(state, site, reply, models)):
                active.remove(site)
                log.info("[%s] refinement: %s keeps its cells (%s)", stage, site,
                         reply.reason or "reply did not match its cells")
    return state


def _model_query(key: str, grid: np.ndarray, history: list[tuple[np.ndarray, np.ndarray]]
                 ) -> Payload:
    out: Payload = {f"{key}.grid": np.asarray(grid, dtype=np.float64),
                    f"{key}.rounds": len(history)}
    for k, (lo, hi) in enumerate(history):
        out[f"{key}.r{k}.lo"], out[f"{key}.r{k}.hi"] = lo, hi
    return out


def _absorb(state: Refinement, site: str, reply: Reply, models: list[str]) -> bool:
    """Merge one site's release into the state; False when it does not fit the site's cells
    (the site is then left as it was)."""
    p = reply.payload
    answered = list(p.get("catalog.models", []))
    merged: dict[tuple[str, str], list[KeyCells]] = {}
    flagged: list[tuple[str, int, int]] = []
    try:
        for i, model in enumerate(answered):
            lo, hi = state.history[model][-1]
            flags = np.asarray(p.get(f"m{i}.flags.one_value", []), dtype=np.int64)
            for j, group in enumerate(p.get(f"m{i}.groups", [])):
                part = nest(p, f"m{i}.g{j}")
                if "count0" not in part or site not in state.cells[model].get(group, {}):
                    continue  # refused by the site's policy, or a group it did not release
                old = state.cells[model][group][site]
                merged[(model, group)] = [
                    refine.merge(old[g], lo, hi, part[f"split{g}"], part[f"first{g}"],
                                 part[f"last{g}"], part[f"count{g}"]) for g in (0, 1)]
            if len(flags) == len(lo):
                flagged += [(model, int(a), int(b))
                            for a, b, f in zip(lo, hi, flags, strict=True) if f == 1]
    except (KeyError, ValueError) as err:
        log.warning("refinement reply of %s rejected: %s", site, err)
        return False
    for (model, group), pair in merged.items():
        state.cells[model][group][site] = pair
    for model, a, b in flagged:
        state.flagged.setdefault(model, {}).setdefault(site, []).append((a, b))
    return True


def first_round(payloads: Mapping[str, Payload], grid: np.ndarray,
                prefix: str = "hist") -> dict[str, tuple[KeyCells, KeyCells]]:
    """Each site's first-round cells from replies carrying `<prefix><label>.first/last/
    count` on `grid` (the radiomics and training stages' histograms); a site without both
    labels' cells is left out."""
    bits = refine.bit_edges(grid)
    out = {}
    for site, p in payloads.items():
        if all(f"{prefix}{g}.count" in p for g in (0, 1)):
            out[site] = tuple(KeyCells.from_grid(p[f"{prefix}{g}.first"], p[f"{prefix}{g}.last"],
                                                 p[f"{prefix}{g}.count"], bits)
                              for g in (0, 1))
    return out  # type: ignore[return-value]


def refine_auc(transport: Transport, context: Payload, model: str, grid: np.ndarray,
               first: dict[str, tuple[KeyCells, KeyCells]], stage: str) -> Refinement:
    """Refinement rounds for one model's AUC (group `all`), its scores read from the
    sites' prediction files (`predictions/<model>-<run>.csv`)."""
    state = start({model: {"all": first}}, {model: grid})
    query = dict(context, needs="predictions?")
    return run(transport, query, state, {model: grid}, stage)


def auc_block(state: Refinement, model: str, sites: list[str], group: str = "all"
              ) -> dict[str, Any]:
    """AUC over `sites` from the refined cells: `exact` (proven on the raw scores; the AUC
    is then the raw-score AUC) or the estimate with `bound` bounding the raw-score AUC."""
    bits = state.bits(model)
    parts = state.parts(model, group, sites)
    if not parts:
        return {"auc": None, "exact": False}
    n = [int(sum(p.cells[g].count.sum() for p in parts)) for g in (0, 1)]
    if min(n) == 0:
        return {"auc": None, "exact": False, "n": n}
    lower, upper = refine.auc_bound(bits, parts)
    estimate = roc.combine_auc(*[[p.cells[g].on(bits) for p in parts] for g in (0, 1)])
    exact = refine.is_exact(bits, parts)
    auc = lower if exact else estimate.auc
    return {"auc": float(auc), "bound": [float(lower), float(upper)], "exact": exact, "n": n}
