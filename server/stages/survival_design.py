"""The survival stage's Cox design, server side: what each configured covariate is across
the sites of a fit (numeric, or categorical with its levels and reference), which are left
out and why, and which sites sit out; a covariate numeric at one site and text at another
stops the stage naming both (docs/SITE.md, "clinical.csv")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.core.transport import Reply, StageError
from shared.schema import nest

MODEL_PREFIXES = ("predicted:", "score:")  # a model's predicted label / probability
HER2_CLASS_ORDER = ("zero", "low", "positive")


def split_spec(spec: str) -> tuple[str, str]:
    """(covariate, reference level) of `column[:level]` or `predicted:<model>[:level]`."""
    if spec.startswith(MODEL_PREFIXES):
        prefix, _, rest = spec.partition(":")
        model, _, reference = rest.partition(":")
        return f"{prefix}:{model}", reference
    name, _, reference = spec.partition(":")
    return name, reference


@dataclass
class Design:
    """Terms (configured covariates) and their dummy-coded design columns."""

    terms: list[str] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)
    levels: dict[str, list[str]] = field(default_factory=dict)  # non-reference levels
    reference: dict[str, str] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    term_columns: list[tuple[int, ...]] = field(default_factory=list)
    center: np.ndarray = field(default_factory=lambda: np.zeros(0))
    left_out: dict[str, str] = field(default_factory=dict)
    cohort: list[str] = field(default_factory=list)  # covariates defining the Cox cohort
    without: dict[str, str] = field(default_factory=dict)  # sites that sit out, and why

    def query(self) -> dict[str, Any]:
        q: dict[str, Any] = {"terms": list(self.terms), "center": self.center,
                             "cohort": list(self.cohort)}
        for term in self.terms:
            q[f"kind.{term}"] = self.kinds[term]
            if self.kinds[term] == "categorical":
                q[f"levels.{term}"] = list(self.levels[term])
        return q

    def describe(self) -> dict[str, Any]:
        return {"covariates": list(self.terms), "columns": list(self.columns),
                "reference": dict(self.reference), "left_out": dict(self.left_out),
                "sites_without": dict(self.without)}


def check_covariate_kinds(names: list[str], setup: dict[str, Reply], sites: list[str]) -> None:
    """StageError naming the sites of each kind when a covariate is numeric at some sites and
    text at others: one site's clinical.csv reads it otherwise (a decimal mark, a word in a
    numeric column), and neither reading may be dropped or guessed."""
    for name in names:
        parts = {s: nest(setup[s].payload, f"design.{name}") for s in sites}
        numeric = [s for s, p in parts.items() if p.get("kind") == "numeric"]
        text = [s for s, p in parts.items() if p.get("kind") == "categorical"]
        if numeric and text:
            levels = [str(v) for s in text for v in _as_list(parts[s].get("levels"))]
            shown = ", ".join(repr(v) for v in dict.fromkeys(levels[:3]))
            raise StageError(
                f"covariate {name!r} is numeric at {', '.join(numeric)} and text at "
                f"{', '.join(text)}" + (f" (levels {shown}{', …' if len(levels) > 3 else ''})"
                                        if shown else "")
                + "; the sites must read it alike (`feddlr check-site` at each: the decimal "
                  "mark, words in a numeric column)")


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]


def agree_design(requested: list[str], setup: dict[str, Reply], sites: list[str]) -> Design:
    """Agree a design over `sites` (those that released their Cox cohort).

    A covariate is numeric when it is numeric at every site that has it, categorical (one
    dummy per non-reference level, levels = union over sites) when it is text there; it is
    left out, with the reason, only when no site has it (or its kinds disagree, or it has
    one level). A site without a covariate the design keeps has no complete case for the
    model — as in a pooled complete-case fit — and sits out (`without`). `name:level`
    picks the reference level; by default the first (her2_class: zero; otherwise sorted).
    """
    design = Design()
    sums = []
    have: dict[str, list[str]] = {}
    for spec in requested:
        name, reference = split_spec(spec)
        reference = " ".join(reference.split()).lower()  # as the sites spell levels
        parts = {s: nest(setup[s].payload, f"design.{name}") for s in sites}
        parts = {s: p for s, p in parts.items() if p.get("kind") in ("numeric", "categorical")}
        kinds = {str(p["kind"]) for p in parts.values()}
        if not parts:
            design.left_out[name] = "not available at any site of the Cox cohort"
            continue
        if len(kinds) > 1:
            design.left_out[name] = "numeric at some sites and text at others"
            continue
        if kinds == {"numeric"}:
            n = sum(int(p["n"]) for p in parts.values())
            total = sum(float(p["sum"]) for p in parts.values())
            have[name] = list(parts)
            design.terms.append(name)
            design.kinds[name] = "numeric"
            design.term_columns.append((len(design.columns),))
            design.columns.append(name)
            sums.append(total / n if n else 0.0)
            continue
        levels: list[str] = []
        for p in parts.values():
            values = p.get("levels", [])
            values = [values] if isinstance(values, str) else [str(v) for v in values]
            levels += [v for v in values if v not in levels]
        order = list(HER2_CLASS_ORDER) if set(levels) <= set(HER2_CLASS_ORDER) else []
        levels = [v for v in order if v in levels] if order else sorted(levels)
        if reference and reference not in levels:
            design.left_out[name] = f"reference level {reference!r} is not among {levels}"
            continue
        if len(levels) < 2:
            design.left_out[name] = f"only one level ({', '.join(levels)}) at the sites"
            continue
        reference = reference or levels[0]
        kept = [v for v in levels if v != reference]
        have[name] = list(parts)
        design.terms.append(name)
        design.kinds[name] = "categorical"
        design.levels[name] = kept
        design.reference[name] = reference
        start = len(design.columns)
        design.columns += [f"{name}={v}" for v in kept]
        design.term_columns.append(tuple(range(start, start + len(kept))))
        sums += [0.0] * len(kept)
    design.center = np.asarray(sums, dtype=np.float64)
    design.cohort = [split_spec(spec)[0] for spec in requested]
    for s in sites:
        lacking = [t for t in design.terms if s not in have[t]]
        if lacking:
            design.without[s] = f"has no {', '.join(lacking)} (no complete case)"
    return design
