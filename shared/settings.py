"""Every run-config key, declared once: name, type, default, allowed values, meaning, stage.

`SETTINGS` is the one declaration. From it come the parser (`parse`: an unknown key names
the nearest known one, each value is typed and checked against its choices and range),
the `[tool.flwr.app.config]` block of pyproject.toml (`toml_block`) and the README's
run-config tables (`markdown_table`); `tests/test_settings.py` fails when either file
disagrees, and `make settings` rewrites both. Cross-key rules (calibration bins dividing
the validation bins, a server optimizer's parameters) stay with the stage that reads them.

Values a stage reads are typed: `int`, `float`, `bool`, `str`, `tuple[str, ...]` for
comma-separated names, `dict[str, float]` for `model=value,…` pairs. A *word* such as
`default` or `auto` parses to what it stands for (`None`: the recipe's or the library's
value). A per-model key (CNN training) parses to `{model: value or None}` for every model
of `shared.schema.TRAIN_MODELS`: `0.01` sets all, `"dl_us=2e-5"` one, the others `None`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import stages
from shared.labels import TASKS
from shared.schema import DEEP_MODELS, TRAIN_MODELS

STAGES = stages.NAMES
# Sections of settings no one stage owns; each stage's own comes with its declaration
_SECTIONS = {"study": stages.Section("the study"),
             "training": stages.Section("CNN stages `dsfr` and `deep` (one training engine, "
                                        "server/training/engine.py)", "training")}
_SECTIONS |= {s.name: s.section for s in stages.STAGES if s.section is not None}
SECTION_TITLES = {name: section.title for name, section in _SECTIONS.items()}
# README tables: (heading marker, sections in it)
TABLES = {table: tuple(n for n, s in _SECTIONS.items() if s.table == table)
          for table in ("run", "training")}
_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+|-inf)\s*,\s*([\d.e+-]+|inf)\s*([\])])$")


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Setting:
    """One run-config key. `kind` is int | float | bool | str | word (lower-cased, one of
    `choices`) | names (comma-separated; each one of `choices` when given) | pairs
    (`name=number,…`). `within` is an interval such as `(0, 100]` for numbers; `words`
    maps literal words to the value they stand for."""

    key: str
    kind: str
    default: str | int | float | bool
    meaning: str
    section: str
    choices: tuple[str, ...] = ()
    within: str = ""
    words: Mapping[str, Any] = field(default_factory=dict)
    per_model: bool = False
    step: int = 0  # > 0: an int must be a multiple of it

    def parse(self, value: Any) -> Any:
        """The typed value of `value` (a TOML scalar or the text a user typed)."""
        if self.per_model:
            return self._per_model(value)
        return self._one(value)

    def _one(self, value: Any) -> Any:
        text = value.strip().lower() if isinstance(value, str) else None
        if text is not None and text in self.words:
            return self.words[text]
        parsed = _KINDS[self.kind](value)
        self._check(parsed)
        return parsed

    def _per_model(self, value: Any) -> dict[str, Any]:
        text = value.strip() if isinstance(value, str) else None
        if text is None or "=" not in text:
            one = self._one(value)
            return dict.fromkeys(TRAIN_MODELS, one)
        given: dict[str, Any] = dict.fromkeys(TRAIN_MODELS)
        for item in text.split(","):
            model, sep, raw = item.partition("=")
            if not sep or model.strip() not in TRAIN_MODELS:
                raise ValueError(f"expected model=value pairs for {list(TRAIN_MODELS)}, "
                                 f"got {item.strip()!r}")
            given[model.strip()] = None if raw.strip() in ("", "default") else self._one(raw)
        return given

    def _check(self, value: Any) -> None:
        if self.choices:
            for one in value if isinstance(value, tuple) else (value,):
                if one not in self.choices:
                    near = difflib.get_close_matches(str(one), self.choices, n=1)
                    hint = f"; did you mean {near[0]!r}?" if near else ""
                    raise ValueError(f"{one!r} is not one of {list(self.choices)}{hint}")
        if self.within and not _in_interval(value, self.within):
            raise ValueError(f"{value!r} is not in {self.within}")
        if self.step and value % self.step:
            raise ValueError(f"{value!r} is not a multiple of {self.step}")

    def allowed(self) -> str:
        """What the key takes, in words (README, pyproject comments)."""
        parts = [f"`{w}`" for w in self.words]
        if self.choices:
            joined = " \\| ".join(f"`{c}`" for c in self.choices)
            parts.append(f"each of {joined}" if self.kind == "names" else joined)
        elif self.kind in ("int", "float"):
            number = "an integer" if self.kind == "int" else "a number"
            step = f", a multiple of {self.step}" if self.step else ""
            parts.append(number + _interval_words(self.within) + step)
        else:
            parts.append(_KIND_WORDS[self.kind])
        return " or ".join(parts)


_KIND_WORDS = {"bool": "`true` \\| `false`", "str": "text", "word": "a word",
               "names": "comma-separated names", "pairs": "`name=number,…`"}


def _interval_words(interval: str) -> str:
    """` in [0, 20]`, or ` ≥ 1` / ` > 0` for an interval open to infinity."""
    match = _INTERVAL.match(interval)
    if not match:
        return ""
    left, low, high, _ = match.groups()
    if high == "inf":
        return f" {'≥' if left == '[' else '>'} {low}"
    return f" in {interval}"


def _in_interval(value: float, interval: str) -> bool:
    match = _INTERVAL.match(interval)
    if not match:
        raise ValueError(f"bad interval {interval!r}")
    left, low, high, right = match.groups()
    lo, hi = float(low), float(high)
    return ((value >= lo if left == "[" else value > lo)
            and (value <= hi if right == "]" else value < hi))


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    return int(str(value).strip())


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    number = float(str(value).strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def flag(value: Any) -> bool:
    """A run-config boolean: true/false, 1/0, yes/no (TOML booleans as they are)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def names(value: Any) -> tuple[str, ...]:
    """Comma-separated names (`a,b`) or a TOML list."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value)
    raise ValueError(f"expected a comma-separated string, got {value!r}")


def _pairs(value: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in names(value):
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected name=number pairs, got {item!r}")
        out[name.strip()] = _float(raw)
    return out


_KINDS: dict[str, Callable[[Any], Any]] = {
    "int": _int, "float": _float, "bool": flag, "str": lambda v: str(v).strip(),
    "word": lambda v: str(v).strip().lower(), "names": names, "pairs": _pairs,
}
DEFAULT = {"default": None}  # the recipe's (or the library's) value


def _s(key: str, kind: str, default: Any, meaning: str, section: str, **more: Any) -> Setting:
    return Setting(key, kind, default, meaning, section, **more)


SETTINGS: tuple[Setting, ...] = (
    # the study
    _s("sites-dir", "str", "data/demo", "folder of site folders (simulation: SuperNode *i* "
       "serves the *i*-th, sorted)", "study"),
    _s("out-dir", "str", "runs/latest", "where `results.json`, `report.html` and figures go",
       "study"),
    _s("stages", "names", ",".join(STAGES), "comma-separated, run in the order of docs/DESIGN.md",
       "study", choices=STAGES),
    _s("task", "word", "her2-positive", "`her2-positive`, `her2-low` (HER2-negative "
       "patients: low vs zero) or `label` (a 0/1 `label` column)", "study", choices=TASKS),
    _s("min-sites", "int", 1, "stop with a clear error when fewer sites can serve (at the "
       "handshake, and whenever sites drop)", "study", within="[1, inf)"),
    _s("round-timeout", "float", 600.0, "seconds to wait for replies; a silent site is "
       "`dropped` for the rest of the run", "study", within="(0, inf)"),
    _s("connect-timeout", "float", 120.0, "seconds to wait for SuperNodes to connect",
       "study", within="(0, inf)"),
    _s("min-replies", "int", 1, "the fewest sites a stage's result may rest on, in every "
       "stage: when fewer of the sites a round asks reply `ok`, or fewer are left to fit on "
       "after sites failed or dropped, the stage fails (`run.stages.<stage>.status: failed`, "
       "with the reason) and the next stages still run (survival keeps its curves and gives "
       "the Cox model's reason instead); it never stops the study, `min-sites` does",
       "study", within="[1, inf)"),
    _s("resume", "bool", False, "take the stages completed by an earlier run from "
       "`OUT/checkpoint.json` (same `out-dir`)", "study"),
    _s("seed", "int", 0, "seed of every random draw: CV folds drawn at each site, CNN "
       "initialisation and batches", "study", within="[0, 1e18]"),
    # cohort
    _s("cohort-covariates", "names", "age,tumour_size_mm,ki67,hr_status,lesion_type",
       "numeric columns get mean ± sd and t-tests, text columns level counts and chi-square",
       "cohort"),
    # radiomics
    _s("radiomics-params", "str", "", "pyradiomics parameters: a preset shipped with the app "
       "(`paper`: `shared/radiomics_params.yaml`, 1130 features) or a YAML file inside each "
       "site folder (relative to it, ≤ 256 kB); nothing else is opened; empty = `paper`",
       "radiomics"),
    _s("radiomics-workers", "int", 0, "extraction processes per site (0 = the site's CPU "
       "count)", "radiomics", within="[0, 256]"),
    _s("icc-threshold", "float", 0.75, "drop features with ICC(2,1) ≤ this (skipped with the "
       "reason when no site has `mri_mask_r2`)", "radiomics", within="[-1, 1]"),
    _s("lasso-loss", "word", "logistic", "`logistic`: L1-logistic with scikit-learn's `C` "
       "(`lasso-C`); `squared`: `Lasso(alpha)` on the 0/1 label (the authors' code, "
       "`lasso-alpha`)", "radiomics", choices=("logistic", "squared")),
    _s("lasso-C", "float", 0.1, "the L1-logistic LASSO's inverse penalty", "radiomics",
       within="(0, inf)"),
    _s("lasso-alpha", "float", 0.02, "the squared-loss Lasso's penalty", "radiomics",
       within="(0, inf)"),
    _s("screen", "word", "chi2", "univariate screening after (or before) the LASSO",
       "radiomics", choices=("chi2", "mi")),
    _s("screen-percentile", "float", 50.0, "the screening keeps this top percentile",
       "radiomics", within="(0, 100]"),
    _s("screen-order", "word", "lasso-first", "LASSO then screening, or screening first",
       "radiomics", choices=("lasso-first", "screen-first")),
    _s("mi-bins", "int", 4, "bins per feature of the binned mutual information", "radiomics",
       within="[2, 64]"),
    _s("lr-C", "float", 1.0, "the L2 logistic-regression head's `C`", "radiomics",
       within="(0, inf)"),
    _s("cv-folds", "int", 10, "stratified folds, drawn at each site from `seed`", "radiomics",
       within="[2, 100]"),
    _s("harmonize", "word", "none", "`combat`: ComBat harmonization of the features over "
       "the sites (neuroCombat's model, fitted federated on every training row before "
       "the in-fold steps; also for the DSFR features); `none`: as extracted", "radiomics",
       choices=("none", "combat")),
    _s("combat-eb", "bool", True, "ComBat's empirical-Bayes shrinkage of each site's "
       "location and scale across features (`false`: the site's own estimates)",
       "radiomics"),
    _s("combat-parametric", "bool", True, "parametric priors (`false`: neuroCombat's "
       "non-parametric ones)", "radiomics"),
    _s("combat-covariates", "names", "", "numeric clinical.csv columns whose effect ComBat "
       "keeps (e.g. `age`; code a category 0/1); never the task label", "radiomics"),
    _s("selection", "word", "in-fold", "`in-fold`: selection inside each CV fold; `paper`: "
       "select once on all training rows first, as the authors did", "radiomics",
       choices=("in-fold", "paper")),
    # fusion
    _s("fusion-models", "names", "dl_mri,dl_us", "the late-fusion LR's inputs (two or more "
       "models' probabilities)", "fusion"),
    _s("fusion-C", "float", 1.0, "the late-fusion LR's scikit-learn `C`", "fusion",
       within="(0, inf)"),
    # validation
    _s("validation", "word", "pooled", "`loso` adds, for each training site, the radiomics "
       "model fitted federated on the other sites and validated on it (`validation.loso`); "
       "the CNNs are not refitted per site", "validation", choices=("pooled", "loso")),
    _s("validation-models", "names", "", "models to validate; empty = every model the sites "
       "have", "validation"),
    _s("validation-grid", "word", "adaptive", "the score grid: `adaptive` places each "
       "model's bins uniform in logit over the pooled mean ± 4 SD of its logit scores (one "
       "round of sums), plus the calibration edges; `uniform` = bins on [0, 1]",
       "validation", choices=("adaptive", "uniform")),
    _s("validation-bins", "int", 200, "bins of the score grid", "validation",
       within="[2, 100000]"),
    _s("calibration-bins", "int", 10, "calibration-curve bins (must divide "
       "`validation-bins`)", "validation", within="[1, 1000]"),
    _s("subgroups", "names", "hr_status,lesion_type", "clinical columns (≤ 12 levels) whose "
       "levels are validated apart (`validation.<model>.subgroups`)", "validation"),
    _s("prediction-runs", "names", "", "earlier run ids whose prediction files the sites "
       "read too (stages taken from a checkpoint add theirs)", "validation"),
    # survival
    _s("survival-group", "str", "label", "Kaplan–Meier curves and log-rank by this "
       "(comma-separated for several groupings, e.g. `label,predicted:dlr`; "
       "`survival.logrank` is the first, `survival.logrank_by.<group>` each): a clinical "
       "column, `label` (the task label), `her2_class` or `predicted:<model>` (a model's "
       "predicted label at each site: score ≥ the validation stage's training-site Youden "
       "threshold, `survival.thresholds`; 0.5 without validation); empty = overall curve "
       "only", "survival"),
    _s("survival-thresholds", "pairs", "", "`model=threshold,…` for `predicted:<model>`; "
       "empty = the validation stage's", "survival"),
    _s("survival-covariates", "names", "her2_class,age,tumour_size_mm,hr_status,ki67,"
       "lesion_type", "Cox covariates: numeric columns as they are, text columns dummy "
       "coded against their first level (`column:level` picks the reference); `her2_class` "
       "= zero / low / positive from IHC/ISH (reference zero); `score:<model>` = a model's "
       "probability, `predicted:<model>` its predicted label; a patient missing any is left "
       "out of the Cox cohort", "survival"),
    _s("stepwise", "word", "both", "R `step()` on AIC from the full model "
       "(`survival.cox_stepwise`)", "survival", choices=("both", "backward", "none")),
    # CNN training (server/training/engine.py Plan; `default` = the recipe's value)
    _s("recipe", "word", "scratch", "`scratch` (random init, CPU, the demo's time) or "
       "`paper` (each paper's, for pretrained weights on GPUs); every key below at "
       "`default` takes the recipe's value (README, \"Training the CNNs\")", "training",
       choices=("scratch", "paper")),
    _s("rounds", "int", "default", "federated rounds", "training", words=DEFAULT,
       within="[1, 10000]", per_model=True),
    _s("local-epochs", "int", "default", "local epochs per round (when `local-steps` is 0)",
       "training", words=DEFAULT, within="[1, 1000]", per_model=True),
    _s("local-steps", "int", "default", "optimizer steps per round and unit; 0 = "
       "`local-epochs`", "training", words=DEFAULT, within="[0, 100000]", per_model=True),
    _s("lr", "float", "default", "local learning rate", "training", words=DEFAULT,
       within="(0, 10]", per_model=True),
    _s("batch-size", "int", "default", "local batch size", "training", words=DEFAULT,
       within="[1, 4096]", per_model=True),
    _s("optimizer", "word", "default", "local optimizer", "training", words=DEFAULT,
       choices=("adam", "adamw", "sgd"), per_model=True),
    _s("weight-decay", "float", "default", "local weight decay", "training", words=DEFAULT,
       within="[0, 10]", per_model=True),
    _s("cnn-width", "float", "auto", "channel multiplier; `auto`: 1.0 when every training "
       "site has a GPU, 0.125 on CPU", "training", words={"default": None, "auto": "auto"},
       within="[0.015625, 4]", per_model=True),
    _s("augment", "bool", "default", "paper 2's augmentations (MONAI)", "training",
       words=DEFAULT, per_model=True),
    _s("pretrained", "str", "", "PATH of round-0 weights, e.g. `dl_mri=resnet_18.pth`: at "
       "each site a file inside its site folder or its site.yaml's `pretrained_dir` (see "
       "Pretrained weights)", "training", per_model=True),
    _s("spacing", "float", "default", "common spacing in mm before cropping; 0 = the native "
       "grid", "training", words=DEFAULT, within="[0, 20]", per_model=True),
    _s("roi-margin-mm", "float", "default", "ROI margin around the tumour box, mm",
       "training", words=DEFAULT, within="[0, 200]", per_model=True),
    _s("roi-margin", "int", "default", "> 0: the ROI margin in pixels at the native spacing "
       "(paper 2: 50)", "training", words=DEFAULT, within="[0, 1000]", per_model=True),
    _s("intensity-reference", "word", "default", "z-score over `tissue` around the tumour "
       "or the whole `roi` (DL-US)", "training", words=DEFAULT, choices=("tissue", "roi"),
       per_model=True),
    _s("focal-alpha", "float", "default", "DSFR's focal-loss weight of tumour pixels "
       "(scratch 0.75, paper 0.25)", "training", words=DEFAULT, within="(0, 1)",
       per_model=True),
    _s("strategy", "word", "fedavg", "the server's update rule", "training",
       choices=("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox")),
    _s("proximal-mu", "float", 0.01, "FedProx's proximal term", "training",
       within="[0, 1000]"),
    _s("server-lr", "float", "default", "server learning rate (fedavgm, fedadagrad, "
       "fedadam, fedyogi); `default` = Flower's", "training", words=DEFAULT,
       within="(0, inf)"),
    _s("server-momentum", "float", 0.9, "fedavgm's server momentum", "training",
       within="[0, 1)"),
    _s("server-beta1", "float", "default", "fedadam/fedyogi β1; `default` = Flower's",
       "training", words=DEFAULT, within="[0, 1)"),
    _s("server-beta2", "float", "default", "fedadam/fedyogi β2; `default` = Flower's",
       "training", words=DEFAULT, within="[0, 1)"),
    _s("server-tau", "float", "default", "adaptive optimizers' τ; `default` = Flower's",
       "training", words=DEFAULT, within="(0, inf)"),
    _s("fedbn", "bool", False, "normalization layers stay local at each site (FedBN)",
       "training"),
    _s("wire-dtype", "word", "float32", "weights on the wire (numpy has no bfloat16: sent as "
       "uint16 bits, tagged)", "training", choices=("float32", "float16", "bfloat16")),
    _s("mode", "word", "federated", "`pooled` = the centralized reference (simulation "
       "only); `both` trains the two and compares them", "training",
       choices=("federated", "pooled", "both")),
    _s("mri-size", "int", "default", "DL-MRI input cube; `auto`: 96 with GPUs, 32 on CPU",
       "training", words={"default": None, "auto": 0}, within="[8, 160]"),
    _s("us-size", "int", "default", "DL-US input square; `auto`: 256 with GPUs, 64 on CPU",
       "training", words={"default": None, "auto": 0}, within="[8, 512]"),
    _s("dsfr-size", "int", "default", "DSFR U-Net input square (paper: 64)", "training",
       words=DEFAULT, within="[16, 512]", step=16),
    _s("us-variant", "word", "atto", "ConvNeXt V2 size", "training",
       choices=("atto", "femto", "pico", "nano", "tiny", "base")),
    _s("device", "word", "auto", "where each site trains", "training",
       choices=("auto", "cpu", "cuda")),
    _s("amp", "word", "auto", "CUDA autocast: `auto` = bf16 where supported, else fp16",
       "training", choices=("auto", "bf16", "fp16", "off")),
    _s("deterministic", "bool", True, "deterministic kernels (see Devices)", "training"),
    _s("deep-models", "names", ",".join(DEEP_MODELS), "which deep models the `deep` stage trains",
       "training", choices=DEEP_MODELS),
    _s("deep-cv-folds", "int", 4, "paper 2's CV folds; training-site probabilities are "
       "out-of-fold", "training", within="[2, 20]"),
    _s("select", "word", "final", "weights used for scoring: the last round, or the `best` "
       "by federated validation", "training", choices=("final", "best")),
    _s("gradcam-patients", "int", 2, "Grad-CAM maps written at each site (never sent)",
       "training", within="[0, 1000]"),
    _s("dp", "word", "off", "differential privacy of the weight updates (shared/dp.py): "
       "clip at the sites or the server, Gaussian noise on the aggregate or at each site; "
       "ε at δ = 1/n in `dp` of the model's results (README, Differential privacy)",
       "training", choices=("off", "client-fixed", "client-adaptive", "server-fixed",
                            "local")),
    _s("dp-clipping-norm", "float", 1.0, "clipping norm C of a site's update (all weights "
       "of one unit, L2); `client-adaptive`: its initial value", "training",
       within="(0, inf)"),
    _s("dp-noise-multiplier", "float", 1.0, "noise multiplier σ: noise std σC/m on the "
       "mean of m updates (`local`: σC on each)", "training", within="[0, inf)"),
    _s("dp-target-quantile", "float", 0.5, "`client-adaptive`: the fraction of updates "
       "the clipping norm should leave unclipped", "training", within="[0, 1]"),
    _s("dp-clip-lr", "float", 0.2, "`client-adaptive`: the clipping norm's geometric "
       "learning rate", "training", within="(0, inf)"),
    _s("dp-count-stddev", "float", "default", "`client-adaptive`: noise std of the count "
       "of unclipped updates; `default` = Flower's sites/20 (must exceed σ/2)", "training",
       words=DEFAULT, within="[0, inf)"),
    # DSFR's head: the radiomics stage's selection with its own values
    _s("dsfr-layer", "str", "default", "the U-Net ReLU whose feature maps are the DSFR "
       "features (scratch `activation_7`, paper `activation_9`)", "dsfr", words=DEFAULT),
    _s("dsfr-screen", "word", "default", "DSFR's screening (paper 1: `mi` first, then "
       "LASSO)", "dsfr", words=DEFAULT, choices=("chi2", "mi")),
    _s("dsfr-screen-order", "word", "default", "DSFR's selection order (`screen-first`)",
       "dsfr", words=DEFAULT, choices=("lasso-first", "screen-first")),
    _s("dsfr-screen-percentile", "float", "default", "DSFR's screening percentile "
       "(scratch 50, paper 10)", "dsfr", words=DEFAULT, within="(0, 100]"),
    _s("dsfr-lasso-C", "float", "default", "DSFR's LASSO `C` (scratch 1.0, paper 0.1); "
       "`lasso-loss`, `lr-C`, `cv-folds`, `selection`, `seed` are the radiomics stage's",
       "dsfr", words=DEFAULT, within="(0, inf)"),
)
BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


class Settings(dict):
    """Every key's typed value (a plain dict, so results and checkpoints serialize it);
    reading an undeclared key is a programming error and says so."""

    def __missing__(self, key: str) -> Any:
        raise KeyError(f"{key!r} is not a declared run-config key (shared/settings.py)")


def defaults() -> dict[str, Any]:
    """The TOML default of every key, in declaration order (what pyproject.toml holds)."""
    return {s.key: s.default for s in SETTINGS}


def check_keys(keys: Any) -> None:
    """ConfigError for the first key not declared, naming the nearest declared one."""
    for key in keys:
        if key not in BY_KEY:
            near = difflib.get_close_matches(str(key), list(BY_KEY), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown run-config key {key!r}{hint}")


def parse(raw: Mapping[str, Any]) -> Settings:
    """Every declared key typed: the value in `raw`, else its default. Unknown keys and
    bad values raise ConfigError naming the key."""
    check_keys(raw)
    return Settings({s.key: value(raw, s.key) for s in SETTINGS})


def value(raw: Mapping[str, Any], key: str) -> Any:
    """One key's typed value from a raw run config (its default when absent)."""
    setting = BY_KEY[key]
    try:
        return setting.parse(raw.get(key, setting.default))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"run config {key}: {err}") from None


# --------------------------------------------------------------------------- stage configs
# A stage's typed config is a frozen dataclass whose fields name their run-config key with
# `setting(key)`: the default, type, choices and range are the key's, stated only above;
# `config_values` reads the fields from the typed run config and `check_value` checks a
# value against its key (e.g. a site checking what a query asked).


def setting(key: str, *, default: bool = True) -> Any:
    """A config dataclass field read from run-config key `key`, defaulting to the key's
    parsed default; `default=False`: no default (the value is resolved elsewhere, e.g. over
    a recipe)."""
    s = BY_KEY[key]
    meta = {"setting": key}
    if not default:
        return field(metadata=meta)
    if s.per_model:
        return field(default_factory=lambda: s.parse(s.default), metadata=meta)
    return field(default=s.parse(s.default), metadata=meta)


def config_values(cls: type, settings: Mapping[str, Any],
                  model: str | None = None) -> dict[str, Any]:
    """The values of `cls`'s `setting(...)` fields from a typed run config (`parse`); a
    per-model key gives `model`'s value (None: `default`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f.metadata.get("setting")
        if key is None:
            continue
        value = settings[key]
        if BY_KEY[key].per_model:
            if model is None:
                raise ValueError(f"{cls.__name__}.{f.name}: {key} is per model")
            value = value[model]
        out[f.name] = value
    return out


def check_value(key: str, value: Any, *, words: bool = True) -> None:
    """ValueError when a typed value is not one `key` allows (its choices, range, step);
    the value a word stands for (`default` → None) passes unless `words` is False."""
    s = BY_KEY[key]
    if words and any(value is w or (w is not None and type(value) is type(w) and value == w)
                     for w in s.words.values()):
        return
    try:
        s._check(value)
    except TypeError:
        raise ValueError(f"{value!r} is not a value of {key}") from None


def bounds(key: str) -> tuple[float | None, float | None]:
    """The ends of a numeric key's interval (None: unbounded), e.g. for a query parameter."""
    match = _INTERVAL.match(BY_KEY[key].within)
    if not match:
        return None, None
    _, low, high, _ = match.groups()
    return (None if low == "-inf" else float(low)), (None if high == "inf" else float(high))


# --------------------------------------------------------------------------- documents


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_block() -> str:
    """The `[tool.flwr.app.config]` table of pyproject.toml."""
    lines = ["[tool.flwr.app.config]",
             "# Generated from shared/settings.py by `make settings`; meanings in README."]
    section = ""
    for s in SETTINGS:
        if s.section != section:
            section = s.section
            lines.append(f"# {SECTION_TITLES[section]}")
        hint = s.allowed().replace("\\|", "|").replace("`", "")
        hint += " (per model)" if s.per_model else ""
        entry = f"{s.key} = {_toml(s.default)}"
        lines.append(f"{entry:<30} # {hint}")
    return "\n".join(lines) + "\n"


def _shown_default(s: Setting) -> str:
    if s.default == "":
        return '`""`'
    if isinstance(s.default, bool):
        return f"`{str(s.default).lower()}`"
    return f"`{s.default}`"


def markdown_table(table: str) -> str:
    """A README run-config table: one row per key of the table's sections."""
    rows = ["| key | default | values | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        if s.section in TABLES[table]:
            values = ("per model: " if s.per_model else "") + s.allowed()
            rows.append(f"| `{s.key}` | {_shown_default(s)} | {values} | {s.meaning} |")
    return "\n".join(rows) + "\n"
