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
        largest = 160 if self.model == "dl_mri" else 512  # a site's memory: 160³ per patient
        if not (8 <= self.size <= largest and 0 <= self.margin <= 1000 and self.folds >= 2
                and 0 <= self.margin_mm <= 200 and 0 <= self.spacing <= 20
                and self.batch_size >= 1 and self.epochs >= 0 and 0 < self.width <= 4
                and 0 <= self.local_steps <= 100_000):
            raise ValueError("training parameters out of range")

    def spec(self) -> Any:  # shared.networks.NetworkSpec (torch is imported only here)
        from shared.networks import NetworkSpec

        return NetworkSpec(self.model, width=self.width, variant=self.variant)


def _choices(key: str) -> tuple[str, ...]:
    return BY_KEY[key].choices
