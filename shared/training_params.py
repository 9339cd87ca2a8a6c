"""One CNN training round's parameters, as the server resolves them (server.training.Plan)
and a site reads them from the query (client.training): one type for both sides.

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
from shared.settings import BY_KEY

DSFR_UNIT = "all"
IMAGES = {"dsfr": "mri", "dl_mri": "mri", "dl_us": "us"}  # the image each model reads
_HEX = re.compile(r"^[0-9a-f]{1,64}$")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")  # a unit or model name

# Each number's range (inclusive), checked by the site (validate) and declared as the query
# parameter's bound (shared/queries/training.py): finite values only, so no inf/NaN lr,
# momentum or loss weight reaches the optimizer. A bound on lr or local steps does not stop
# a batch-1 update from showing one patient (the head's ΔW/Δb is her embedding at any lr);
# the site's min_batch_size and min_update_patients do (client/training_round.py).
BOUNDS: dict[str, tuple[float, float]] = {
    "width": (1 / 64, 4), "size": (8, 512), "spacing": (0, 20), "margin_mm": (0, 200),
    "margin": (0, 1000), "folds": (2, 100), "seed": (0, 2**62), "epochs": (0, 1000),
    "local_steps": (0, 100_000), "batch_size": (1, 4096), "lr": (0, 10),
    "weight_decay": (0, 10), "momentum": (0, 1), "mu": (0, 1000), "smoothing": (0, 1),
    "pos_weight": (0, 1000), "focal_alpha": (0, 1), "focal_gamma": (0, 10),
    "round": (0, 1_000_000),
}


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
    pretrained: str = ""  # PATH of the round-0 weights (shared/pretrained.py), "" = none
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
        for name, value, allowed in (("optimizer", self.optimizer, _choices("optimizer")),
                                     ("strategy", self.strategy, ("fedavg", "fedprox")),
                                     ("device", self.device, _choices("device")),
                                     ("amp", self.amp, _choices("amp")),
                                     ("reference", self.reference,
                                      _choices("intensity-reference"))):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {list(allowed)}")
        for name, (lo, hi) in BOUNDS.items():
            value = getattr(self, name)
            if not lo <= value <= hi:  # NaN fails too
                raise ValueError(f"training parameter {name} = {value!r} is outside "
                                 f"[{lo:g}, {hi:g}]")
        if self.model == "dl_mri" and self.size > 160:  # a site's memory: 160³ per patient
            raise ValueError("training parameter size is over 160 for dl_mri")

    def spec(self) -> Any:  # shared.networks.NetworkSpec (torch is imported only here)
        from shared.networks import NetworkSpec

        return NetworkSpec(self.model, width=self.width, variant=self.variant)


def _choices(key: str) -> tuple[str, ...]:
    return BY_KEY[key].choices
