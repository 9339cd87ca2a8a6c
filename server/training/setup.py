"""The setup round of a CNN model: which sites can train it (role, usable patients,
device, their copy of the pretrained file), its class weight and its sizes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.core.progress import report_round
from server.core.transport import (
    StageError,
    StageSkipped,
    Transport,
)
from shared import schema
from shared.config import StudyConfig
from shared.training_params import IMAGES

log = logging.getLogger("feddlr")


@dataclass
class Setup:
    train: list[str]
    external: list[str]
    devices: dict[str, dict[str, Any]]
    pos_weight: float
    identity: dict[str, Any]
    gpu: bool
    excluded: dict[str, str]
    sizes: dict[str, int] = field(default_factory=dict)
    pretrained: dict[str, str] = field(default_factory=dict)  # path and sha256


def server_pretrained(path: str) -> Path:
    """The coordinator's copy of the pretrained file (relative to the working directory)."""
    from neural import pretrained as files

    try:
        target = files.resolve(path, Path.cwd())
    except ValueError as err:
        raise StageError(str(err)) from None
    if not target.is_file():
        raise StageError(f"pretrained file {path}: the coordinator needs its own copy of "
                         f"the file the sites use (not found at {target})")
    return target


def setup(transport: Transport, config: StudyConfig, model: str, sites: list[str],
          stage: str, pretrained: str = "") -> Setup:
    """Ask every site which patients can serve `model`, its roles and device (and the
    sha256 of its copy of the pretrained file); training sites are those with role train,
    usable patients and, with pretrained weights, the coordinator's file."""
    reference = ""
    if pretrained:
        from neural.pretrained import file_sha256

        reference = file_sha256(server_pretrained(pretrained))
    query = {"task": config.task, "needs": IMAGES[model], "model": model,
             "pretrained": pretrained}
    replies = transport.ask(schema.TRAIN_SETUP, query, sites)
    report_round(f"{stage}:{model}:setup", 1, 1, replies)
    train, external, devices, excluded = [], [], {}, {}
    neg = pos = 0
    counted = True
    identity: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for site in sites:
        reply = replies[site]
        p = reply.payload
        if not reply.ok:
            excluded[site] = f"{reply.status}: {reply.reason}"
            continue
        if not p.get("setup.usable", False):
            excluded[site] = f"no patient with the images {model} needs"
            continue
        roles = list(p.get("setup.roles", []))
        devices[site] = {k[len("device."):]: v for k, v in p.items()
                         if k.startswith("device.")}
        identity[site] = p.get("setup.data_sha256")
        size = int(np.asarray(p.get("counts.n", [-1])).reshape(-1)[0])
        if size >= 0:
            sizes[site] = size
        if "train" in roles and reference:
            problem = _pretrained_problem(p, pretrained, reference)
            if problem:
                excluded[site] = problem
                log.warning("[%s] %s: %s is left out: %s", stage, model, site, problem)
                continue
        if "train" in roles:
            train.append(site)
            labels = np.asarray(p.get("counts.labels", [-1, -1])).reshape(-1)
            if np.any(labels < 0):
                counted = False
            else:
                neg, pos = neg + int(labels[0]), pos + int(labels[1])
        elif "external" in roles:
            external.append(site)
    weight = float(neg / pos) if counted and pos > 0 and neg > 0 else 1.0
    gpu = bool(train) and all(bool(devices[s].get("cuda")) for s in train)
    return Setup(train, external, devices, weight, identity, gpu, excluded, sizes,
                 {"path": pretrained, "sha256": reference} if pretrained else {})


def _pretrained_problem(payload: Mapping[str, Any], path: str, reference: str) -> str:
    """Why a training site cannot start from the pretrained file ("" when it can)."""
    error = str(payload.get("pretrained.error", "") or "")
    digest = str(payload.get("pretrained.sha256", "") or "")
    if error:
        return error
    if not digest:
        return f"pretrained file {path}: the site sent no sha256"
    if digest != reference:
        return (f"pretrained file {path} at the site has sha256 {digest[:16]}…, the "
                f"coordinator's {reference[:16]}… (a different file)")
    return ""


def skip_if_empty(setup_: Setup, model: str) -> None:
    if not setup_.train:
        reasons = "; ".join(f"{s}: {r}" for s, r in setup_.excluded.items())
        raise StageSkipped(f"no training site has the images {model} needs"
                           + (f" ({reasons})" if reasons else ""))
