"""The stages of a study, each declared once: `STAGES`, in the order a study runs them.

A declaration says everything the rest of the system needs to know of a stage:

- `needs`: what it reads of a site folder (client.site.folder NEEDS; `x?` = used where present,
  `a|b` = either), the task label included where it reads it;
- `roles`: the site roles it asks (None: every usable site);
- `reads_earlier`: whether its runner takes what earlier stages left (`Earlier`);
- `runner`: the server half, `run(transport, config, sites[, earlier]) -> dict`, the
  stage's block of results.json;
- `handlers`: the site half, one function per query action, `f(session, query) ->
  [Statistic]`; `queries`: the module declaring those queries (`QUERY_TYPES`, checked at
  the site before a handler runs);
- `settings`: a function parsing and checking the stage's run-config settings (called
  before any site is contacted), and the settings `section` it owns (title, README table);
- `report`: its section of report.html, `f(results, out) -> html`.

Server, site and report code is named by reference ("module:function"), so this module
imports neither: the workflow (server.workflow), the site's dispatch (client.handlers), the
query registry (shared.queries), the settings (shared.settings) and the report
(server.report.page) loop over `STAGES`. A new stage is its code plus one line here
(docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import schema

MODEL_ROLES = ("train", "external")  # the model stages fit on train sites, score external ones


@dataclass(frozen=True)
class Section:
    """A run-config section a stage owns: its title, and the README table it is shown in."""

    title: str
    table: str = "run"


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    runner: str
    handlers: Mapping[str, str] = field(default_factory=dict)
    queries: str | None = None
    roles: tuple[str, ...] | None = None
    reads_earlier: bool = False
    settings: str | None = None
    section: Section | None = None
    report: str | None = None


def load(reference: str) -> Callable[..., Any]:
    """The object a "module:attribute[.attribute]" reference names (imported on first use,
    so a site answering a cohort query does not import pyradiomics)."""
    module, _, attributes = reference.partition(":")
    found: Any = importlib.import_module(module)
    for name in attributes.split("."):
        found = getattr(found, name)
    return found


_TRAINING = {schema.TRAIN_SETUP: "client.stages.training:train_setup",
             schema.TRAIN_SCORE: "client.stages.training:train_score"}


def _rounds(*models: str) -> dict[str, str]:
    """Flower's own train/evaluate messages of the CNN models (`train.<model>`, …)."""
    return {action: f"client.stages.training:{action.split('.')[0]}_round"
            for action in schema.TRAIN_ACTIONS if action.split(".")[1] in models}


STAGES: tuple[Stage, ...] = (
    Stage("cohort", ("clinical", "label"), "server.stages.cohort:run_cohort",
          {schema.COHORT_SUMS: "client.stages.cohort:cohort_sums",
           schema.COHORT_SQUARES: "client.stages.cohort:cohort_squares",
           schema.COHORT_HISTOGRAMS: "client.stages.cohort:cohort_histograms"},
          queries="shared.queries.cohort", section=Section("cohort stage"),
          report="server.report.page:cohort_part"),
    Stage("radiomics", ("clinical", "label", "mri|features"),
          "server.stages.radiomics:run_radiomics",
          {schema.RADIOMICS_EXTRACT: "client.stages.radiomics:radiomics_extract",
           schema.RADIOMICS_COLUMNS: "client.stages.radiomics:radiomics_columns",
           schema.RADIOMICS_STEP: "client.stages.radiomics:radiomics_step",
           schema.RADIOMICS_SCREEN: "client.stages.radiomics:radiomics_screen",
           schema.RADIOMICS_SCORE: "client.stages.radiomics:radiomics_score",
           schema.RADIOMICS_COMBAT: "client.stages.harmonize:radiomics_combat"},
          queries="shared.queries.radiomics", roles=MODEL_ROLES,
          settings="server.stages.radiomics:RadiomicsConfig.from_settings",
          section=Section("radiomics stage"), report="server.report.page:radiomics_part"),
    Stage("dsfr", ("clinical", "label", "mri"), "server.stages.dsfr:run_dsfr",
          {**_TRAINING, schema.DSFR_FEATURES: "client.stages.training:dsfr_features",
           **_rounds("dsfr")},
          queries="shared.queries.training", roles=MODEL_ROLES,
          settings="server.stages.dsfr:dsfr_settings",
          section=Section("DSFR's own head (paper 1)", "training"),
          report="server.report.training:training_sections"),
    Stage("deep", ("clinical", "label", "mri", "us"), "server.stages.deep:run_deep",
          {**_TRAINING, **_rounds("dl_mri", "dl_us")},
          queries="shared.queries.training", roles=MODEL_ROLES,
          settings="server.stages.deep:deep_settings",
          report="server.report.training:training_sections"),
    Stage("fusion", ("clinical", "label"), "server.stages.fusion:run_fusion",
          {schema.FUSION_SETUP: "client.stages.fusion:fusion_setup",
           schema.FUSION_STEP: "client.stages.fusion:fusion_step",
           schema.FUSION_SCORE: "client.stages.fusion:fusion_score"},
          queries="shared.queries.fusion", roles=MODEL_ROLES, reads_earlier=True,
          settings="server.stages.fusion:FusionConfig.from_settings",
          section=Section("fusion stage"), report="server.report.page:fusion_part"),
    Stage("validation", ("clinical", "label", "predictions?"),
          "server.stages.validation:run_validation",
          {schema.VALIDATION_RANGES: "client.stages.validation:validation_ranges",
           schema.VALIDATION_SCORES: "client.stages.validation:validation_scores",
           schema.VALIDATION_MOMENTS: "client.stages.validation:validation_moments",
           schema.SCORES_REFINE: "client.stages.refine:scores_refine"},
          queries="shared.queries.validation", roles=MODEL_ROLES, reads_earlier=True,
          settings="server.stages.validation:ValidationConfig.from_settings",
          section=Section("validation stage"),
          report="server.report.validation:validation_sections"),
    # the task label only to group or adjust by `label` (server.stages.survival.needs_label)
    Stage("survival", ("clinical", "survival", "predictions?"),
          "server.stages.survival:run_survival",
          {schema.SURVIVAL_SETUP: "client.stages.survival:survival_setup",
           schema.SURVIVAL_COX: "client.stages.survival:survival_cox",
           schema.SURVIVAL_EVENTS: "client.stages.survival:survival_events",
           schema.SURVIVAL_PAIRS: "client.stages.survival:survival_pairs",
           schema.SURVIVAL_HISTOGRAMS: "client.stages.survival:survival_histograms",
           schema.SURVIVAL_BOUNDS: "client.stages.survival:survival_bounds"},
          queries="shared.queries.survival", roles=("survival",), reads_earlier=True,
          section=Section("survival stage"), report="server.report.page:survival_part"),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The declaration of stage `name` (KeyError naming the known ones)."""
    for declared in STAGES:
        if declared.name == name:
            return declared
    raise KeyError(f"no stage {name!r}; stages: {', '.join(NAMES)}")


def handlers() -> dict[str, str]:
    """Every stage's query actions and the site function answering each; an action two
    stages share (the CNN stages' setup and scoring) must name the same function."""
    found: dict[str, str] = {}
    for declared in STAGES:
        for action, reference in declared.handlers.items():
            if found.setdefault(action, reference) != reference:
                raise ValueError(f"action {action!r} is answered by {found[action]} and "
                                 f"{reference}")
    return found


# Every query action a site answers (`query.<action>` messages): the study's handshake, each
# stage's queries and a batch of them (server.core.in_step). The CNN rounds travel as Flower's own
# train/evaluate messages (schema.TRAIN_ACTIONS).
ACTIONS: tuple[str, ...] = (schema.HANDSHAKE,
                            *(a for a in handlers() if a not in schema.TRAIN_ACTIONS),
                            schema.BATCH)
