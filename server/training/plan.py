"""A CNN model's training plan: the run config (shared/settings.py) over the model's recipe
(`scratch` or `paper`), with the sizes resolved from where training runs. The server's
training engine (server/training/engine.py) runs it; its round parameters are
shared/training_params.TrainParams."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from shared.config import ConfigError
from shared.settings import config_values, parse, setting
from shared.training_params import TrainParams

# Recipes: per model, the defaults a run-config key overrides (README, "Training the CNNs").
# `scratch` learns from random initialisation on CPU in the demo's time: AdamW at 1e-3, a
# fixed number of local optimizer steps per round (a small site still moves the model),
# images resampled to 1 mm with a 3 mm ROI margin. `paper` is each paper's recipe, meant
# for pretrained weights on GPUs (the papers' code): DSFR Adam 1e-3, batch 6, focal loss, 64²;
# DL-MRI the authors' code (SGD 1e-3, wd 1e-2; the paper: AdamW 4e-6), batch 16, 96³, ROI
# margin 50 px at the native spacing; DL-US AdamW 2e-5, wd 0.05, batch 16, 256², cosine
# schedule, label smoothing 0.2, Mixup/CutMix, margin 50 px.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "scratch": {
        "dsfr": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 8,
                 "rounds": 6, "local_epochs": 1, "local_steps": 12, "dsfr_size": 64,
                 "spacing": 1.0, "margin_mm": 3.0, "margin": 0, "schedule": "constant",
                 "smoothing": 0.0, "mix": False, "augment": False, "focal_alpha": 0.75,
                 "reference": "tissue"},
        "dl_mri": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 8,
                   "rounds": 8, "local_epochs": 1, "local_steps": 10, "mri_size": 0,
                   "spacing": 1.0, "margin_mm": 3.0, "margin": 0, "schedule": "cosine",
                   "smoothing": 0.0, "mix": False, "augment": True, "reference": "tissue"},
        "dl_us": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "batch_size": 8,
                  "rounds": 8, "local_epochs": 1, "local_steps": 10, "us_size": 0,
                  "spacing": 0.0, "margin_mm": 3.0, "margin": 0, "reference": "roi",
                  "schedule": "cosine", "smoothing": 0.0, "mix": False, "augment": True},
    },
    "paper": {
        "dsfr": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 6,
                 "rounds": 4, "local_epochs": 3, "local_steps": 0, "dsfr_size": 64,
                 "spacing": 0.0, "margin_mm": 0.0, "margin": 50, "schedule": "constant",
                 "smoothing": 0.0, "mix": False, "augment": False, "focal_alpha": 0.25,
                 "reference": "tissue"},
        "dl_mri": {"optimizer": "sgd", "lr": 1e-3, "weight_decay": 1e-2, "batch_size": 16,
                   "rounds": 3, "local_epochs": 1, "local_steps": 0, "mri_size": 96,
                   "spacing": 0.0, "margin_mm": 0.0, "margin": 50, "schedule": "constant",
                   "smoothing": 0.0, "mix": False, "augment": True, "reference": "tissue"},
        "dl_us": {"optimizer": "adamw", "lr": 2e-5, "weight_decay": 0.05, "batch_size": 16,
                  "rounds": 3, "local_epochs": 1, "local_steps": 0, "us_size": 256,
                  "spacing": 0.0, "margin_mm": 0.0, "margin": 50, "reference": "roi",
                  "schedule": "cosine", "smoothing": 0.2, "mix": True, "augment": True},
    },
}
# "auto" sizes: (GPU at every training site, otherwise)
AUTO = {"width": (1.0, 0.125), "mri_size": (96, 32), "us_size": (256, 64)}


# What a Plan field takes for a model that does not use it, when the model's recipe does not
# set it and the run config leaves it at `default` (only the model's own size is its input
# size; only DSFR has a focal loss)
NOT_USED = {"mri_size": 0, "us_size": 0, "dsfr_size": 64, "focal_alpha": 0.25}
_DEFAULTS = parse({})


@dataclass(frozen=True)
class Plan:
    """One model's training configuration (run config → recipe defaults → sites)."""

    model: str
    recipe: str = setting("recipe", default=False)
    rounds: int = setting("rounds", default=False)
    local_epochs: int = setting("local-epochs", default=False)
    local_steps: int = setting("local-steps", default=False)
    lr: float = setting("lr", default=False)
    batch_size: int = setting("batch-size", default=False)
    optimizer: str = setting("optimizer", default=False)
    weight_decay: float = setting("weight-decay", default=False)
    width: float | str = setting("cnn-width", default=False)  # "auto" until resolved()
    strategy: str = setting("strategy", default=False)
    mu: float = setting("proximal-mu", default=False)
    server_lr: float | None = setting("server-lr", default=False)  # None: Flower's default
    server_momentum: float = setting("server-momentum", default=False)
    beta_1: float | None = setting("server-beta1", default=False)
    beta_2: float | None = setting("server-beta2", default=False)
    tau: float | None = setting("server-tau", default=False)
    fedbn: bool = setting("fedbn", default=False)
    wire: str = setting("wire-dtype", default=False)
    mode: str = setting("mode", default=False)
    mri_size: int = setting("mri-size", default=False)  # 0: auto until resolved()
    us_size: int = setting("us-size", default=False)
    dsfr_size: int = setting("dsfr-size", default=False)
    spacing: float = setting("spacing", default=False)
    margin_mm: float = setting("roi-margin-mm", default=False)
    margin: int = setting("roi-margin", default=False)
    reference: str = setting("intensity-reference", default=False)
    variant: str = setting("us-variant", default=False)
    device: str = setting("device", default=False)
    amp: str = setting("amp", default=False)
    cv_folds: int = setting("deep-cv-folds", default=False)
    select: str = setting("select", default=False)
    augment: bool = setting("augment", default=False)
    pretrained: str = setting("pretrained", default=False)
    gradcam: int = setting("gradcam-patients", default=False)
    seed: int = setting("seed", default=False)
    deterministic: bool = setting("deterministic", default=False)
    schedule: str  # (this and the next two: recipe values no run-config key sets)
    smoothing: float
    mix: bool
    focal_alpha: float = setting("focal-alpha", default=False)  # DSFR's tumour-pixel weight

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], model: str) -> Plan:
        """The typed run config over the recipe's values for `model`."""
        given = config_values(cls, settings, model)
        # a key at `default` (None) takes the recipe's value, else (the model does not use
        # it) NOT_USED's, else its declared default (`cnn-width` auto; a server optimizer's
        # parameter None: Flower's)
        values = {**config_values(cls, _DEFAULTS, model), **NOT_USED,
                  **RECIPES[given["recipe"]][model]}
        values.update({k: v for k, v in given.items() if v is not None})
        plan = cls(model=model, **values)
        plan.validate()
        return plan

    def validate(self) -> None:
        """Cross-key rules (each value alone was checked by shared/settings.py)."""
        from neural.networks import CONVNEXT_VARIANTS

        if self.variant not in CONVNEXT_VARIANTS:
            raise ConfigError(f"run config us-variant: {self.variant!r} is not one of "
                              f"{list(CONVNEXT_VARIANTS)}")
        try:
            self.server_optimizer()
        except ValueError as err:
            raise ConfigError(f"run config strategy {self.strategy}: {err}") from None

    def server_optimizer(self) -> Any:  # shared.fedopt.ServerOptimizer
        """The server's update rule: FedAvg (also for FedProx, whose term is at the sites),
        FedAvgM, FedAdam or FedYogi with the run config's hyper-parameters (unset ones:
        Flower's defaults)."""
        from shared import fedopt

        name = "fedavg" if self.strategy == "fedprox" else self.strategy
        wanted = {"server_lr": self.server_lr, "momentum": self.server_momentum,
                  "beta_1": self.beta_1, "beta_2": self.beta_2, "tau": self.tau}
        known = set(fedopt.make_optimizer(name).params())
        return fedopt.make_optimizer(name, **{k: v for k, v in wanted.items()
                                              if k in known and v is not None})

    def resolved(self, gpu: bool) -> Plan:
        """`auto` sizes for where training runs: GPU sizes when every training site (or the
        pooled process) has CUDA, small CPU sizes otherwise."""
        pick = 0 if gpu else 1
        return replace(self,
                       width=AUTO["width"][pick] if self.width == "auto" else float(self.width),
                       mri_size=self.mri_size or AUTO["mri_size"][pick],
                       us_size=self.us_size or AUTO["us_size"][pick])

    @property
    def size(self) -> int:
        return {"dsfr": self.dsfr_size, "dl_mri": self.mri_size, "dl_us": self.us_size}[
            self.model]

    @property
    def units(self) -> list[str]:
        return ["all"] if self.model == "dsfr" else [f"f{k}" for k in range(self.cv_folds)]

    @property
    def split_folds(self) -> int:
        """Folds of the site's patients: CV folds, or DSFR's 1/3 validation split."""
        return 3 if self.model == "dsfr" else self.cv_folds

    def lr_at(self, round_no: int) -> float:
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * (round_no - 1) / self.rounds))
        return self.lr

    def params(self, *, pooled: bool = False) -> dict[str, Any]:
        """The query fields of a round's TrainParams (shared/training_params.py; the caller
        adds round, units and weights)."""
        fields = {"model": self.model, "width": float(self.width), "variant": self.variant,
                  "size": self.size, "spacing": self.spacing, "margin_mm": self.margin_mm,
                  "margin": self.margin, "reference": self.reference,
                  "folds": self.split_folds, "seed": self.seed,
                  "epochs": self.local_epochs, "local_steps": self.local_steps,
                  "batch_size": self.batch_size,
                  "lr": self.lr, "optimizer": self.optimizer, "weight_decay": self.weight_decay,
                  "strategy": "fedprox" if self.strategy == "fedprox" else "fedavg",
                  "mu": self.mu,
                  "fedbn": self.fedbn and not pooled, "wire": self.wire, "device": self.device,
                  "amp": self.amp, "augment": self.augment, "mix": self.mix,
                  "pretrained": self.pretrained, "focal_alpha": self.focal_alpha,
                  "smoothing": self.smoothing, "deterministic": self.deterministic}
        TrainParams(**fields).validate()  # what the sites will check, checked here first
        return fields

