"""One CNN training round's parameters, as the server resolves them (server.training.engine.Plan)
and a site reads them from the query (client.stages.training): one type for both sides.

Only plain values: the model, the data path's settings, the local optimizer, the strategy's
site part (FedProx), the wire dtype, the device wishes. No patient data; validated on both
sides, so a site refuses a query a hand-written server could send out of range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from shared import fedavg
from shared.schema import TRAIN_MODELS, Payload
from shared.settings import bounds, check_value

DSFR_UNIT = "all"
IMAGES = {"dsfr": "mri", "dl_mri": "mri", "dl_us": "us"}  # the image each model reads
_HEX = re.compile(r"^[0-9a-f]{1,64}$")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")  # a unit or model name

# The run-config key (shared/settings.py) whose range or choices bound each field: a site
# checks a query against the declaration the server parsed the run config with; `size`
# against its model's size key. The ranges are finite, so no inf/NaN lr or loss weight
# reaches the optimizer. A bound on lr or local steps does not stop a batch-1 update from
# showing one patient (the head's ΔW/Δb is her embedding at any lr); the site's
# min_batch_size and min_update_patients do (client/stages/training_round.py).
SETTING_OF: dict[str, str] = {
    "width": "cnn-width", "variant": "us-variant", "spacing": "spacing",
    "margin_mm": "roi-margin-mm", "margin": "roi-margin", "reference": "intensity-reference",
    "seed": "seed", "epochs": "local-epochs", "local_steps": "local-steps",
    "batch_size": "batch-size", "lr": "lr", "optimizer": "optimizer",
    "weight_decay": "weight-decay", "mu": "proximal-mu", "device": "device", "amp": "amp",
    "focal_alpha": "focal-alpha",
}
SIZE_SETTING = {"dsfr": "dsfr-size", "dl_mri": "mri-size", "dl_us": "us-size"}
# The final evaluation's query says lr 0 and epochs 0 (server/training/engine.py): zero passes too
EVALUATION_ZERO = ("lr", "epochs")
# Fields no run-config key sets (inclusive ranges; `folds` is the deep CV folds or DSFR's
# 1/folds validation split)
BOUNDS: dict[str, tuple[float, float]] = {
    "folds": (2, 100), "momentum": (0, 1), "smoothing": (0, 1), "pos_weight": (0, 1000),
    "focal_gamma": (0, 10), "round": (0, 1_000_000),
}


def query_bounds(name: str) -> tuple[float | None, float | None]:
    """A field's (lo, hi) as its query parameter declares them (shared/queries/training.py):
    its key's interval, the widest of the models' sizes, or BOUNDS."""
    if name == "size":
        ends = [bounds(key) for key in SIZE_SETTING.values()]
        return min(lo for lo, _ in ends), max(hi for _, hi in ends)  # type: ignore[type-var]
    if name in SETTING_OF:
        lo, hi = bounds(SETTING_OF[name])
        return (0.0 if name in EVALUATION_ZERO else lo), hi
    return BOUNDS.get(name, (None, None))


@dataclass(frozen=True)
class TrainParams:
    """Everything a site needs for a round, as the server resolved it (query fields)."""

    model: str
    width: float = 1.0
    variant: str = "atto"
    size: int = 64
    spacing: float = 1.0  # common spacing (mm) the images are resampled to; 0 = native
    margin_mm: float = 3.0  # ROI margin around the tumour's bounding box
    margin: int = 0  # > 0: the paper's ROI margin in pixels at the native spacing
    reference: str = "tissue"  # intensity z-score over: tissue around the tumour | roi
    folds: int = 4  # CV folds (deep) or validation split 1/folds (dsfr)
    seed: int = 0
    epochs: int = 1
    local_steps: int = 0  # > 0: optimizer steps per round instead of `epochs`
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    momentum: float = 0.9
    strategy: str = "fedavg"  # fedavg | fedprox
    mu: float = 0.0
    fedbn: bool = False
    wire: str = "float32"
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto | off | bf16 | fp16 (CUDA only)
    augment: bool = True
    mix: bool = False  # Mixup/CutMix (dl_us)
    smoothing: float = 0.0  # label smoothing
    pos_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    deterministic: bool = True
    pretrained: str = ""  # PATH of the round-0 weights (neural/pretrained.py), "" = none
    train_id: str = "local"
    round: int = 0
    units: tuple[str, ...] = (DSFR_UNIT,)

    @classmethod
    def from_query(cls, query: Payload) -> TrainParams:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in query:
                continue
            raw = query[f.name]
            if f.name == "units":
                values[f.name] = tuple(str(u) for u in raw)
            elif f.type == "bool":
                values[f.name] = (raw if isinstance(raw, bool)
                                  else str(raw).strip().lower() in ("1", "true", "yes"))
            elif f.type == "int":
                values[f.name] = int(raw)
            elif f.type == "float":
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        if self.model not in TRAIN_MODELS:
            raise ValueError(f"unknown model {self.model!r}")
        if not _HEX.match(self.train_id) and self.train_id != "local":
            raise ValueError("train_id must be hexadecimal")
        if any(not NAME.match(u) for u in self.units):
            raise ValueError(f"bad unit names {list(self.units)}")
        fedavg.check_dtype(self.wire)
        if self.strategy not in ("fedavg", "fedprox"):  # the sites' part of the strategies
            raise ValueError(f"strategy {self.strategy!r} is not one of ['fedavg', 'fedprox']")
        # each field as its run-config key allows (mri-size ≤ 160: a site's memory, 160³)
        for name, key in (*SETTING_OF.items(), ("size", SIZE_SETTING[self.model])):
            value = getattr(self, name)
            if name in EVALUATION_ZERO and value == 0 and not isinstance(value, bool):
                continue
            try:
                check_value(key, value, words=False)
            except ValueError as err:
                raise ValueError(f"training parameter {name} ({key}): {err}") from None
        for name, (lo, hi) in BOUNDS.items():
            value = getattr(self, name)
            if not lo <= value <= hi:  # NaN fails too
                raise ValueError(f"training parameter {name} = {value!r} is outside "
                                 f"[{lo:g}, {hi:g}]")

