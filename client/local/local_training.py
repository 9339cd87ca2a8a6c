"""One unit's network at a site, for a round of the CNN stages (`dsfr`, `deep`): the
device (CUDA or CPU, autocast dtype) and deterministic kernels, the round's seed per
(seed, site, model, unit, round), the network and its weights (the received global weights,
the state sent back, FedBN's local normalization layers per unit and round in
`cache/training/<train-id>/`), the losses (focal for DSFR, class-weighted BCE otherwise)
and the local optimizer loop (`train_unit`; optimizer state starts afresh each round).
A round that uses them is client/stages/training_round.py, the messages client/stages/training.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from client.local import imaging
from client.local.training_data import ModelData
from neural import networks
from neural.networks import network_of
from shared import fedavg
from shared.queries.params import QueryRejected
from shared.schema import Payload, nest
from shared.training_params import TrainParams

P = ParamSpec("P")
R = TypeVar("R")

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS


# --------------------------------------------------------------------------- devices


def pick_device(wanted: str) -> torch.device:
    """`auto`: CUDA when this machine has it, else CPU. `cuda` without a GPU is an error."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but this site has no CUDA GPU")
    if wanted in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def amp_dtype(device: torch.device, wanted: str) -> torch.dtype | None:
    """Autocast dtype on CUDA: bf16 where the GPU supports it, else fp16 (`auto`); None on
    CPU or with `off`."""
    if device.type != "cuda" or wanted == "off":
        return None
    if wanted == "fp16":
        return torch.float16
    if wanted == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def device_info() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "name": torch.cuda.get_device_name(0) if cuda else "cpu",
            "count": torch.cuda.device_count() if cuda else 0,
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
            "torch": torch.__version__}


def flushing_denormals(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` with subnormal floats flushed to zero on the CPU (tiny focal-loss gradients
    would take the subnormal slow path), then switch that off again: the flag is process
    state, and the statistics this process computes afterwards (the site's exact federated
    sums, a test's hypothesis floats) need IEEE subnormals."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        torch.set_flush_denormal(True)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_flush_denormal(False)

    return wrapper


def set_determinism(on: bool, device: torch.device) -> None:
    """Deterministic kernels on CUDA (cuDNN, cuBLAS); CPU kernels already are, for a given
    thread count (and `torch.use_deterministic_algorithms` costs seconds of imports)."""
    if device.type != "cuda":
        return
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def round_seed(seed: int, site: str, model: str, unit: str, round_no: int) -> int:
    key = json.dumps([seed, site, model, unit, round_no]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------- weights


def build(p: TrainParams, device: torch.device) -> nn.Module:
    return network_of(p).build(p.seed).to(device)


def shared_keys(net: nn.Module, p: TrainParams) -> list[str]:
    """State keys that travel and are averaged (all but normalization layers with FedBN)."""
    local = networks.norm_keys(net) if p.fedbn else set()
    return [k for k in net.state_dict() if k not in local]


def load_weights(net: nn.Module, received: dict[str, np.ndarray],
                 local: dict[str, np.ndarray] | None) -> None:
    state = net.state_dict()
    merged = dict(local or {})
    merged.update(received)
    missing = [k for k in merged if k not in state]
    if missing:
        raise QueryRejected(f"weights for unknown keys {missing[:3]}")
    for key, value in merged.items():
        target = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise QueryRejected(f"weight {key}: shape {tuple(value.shape)} is not "
                             f"{tuple(target.shape)}")
        state[key] = torch.from_numpy(np.asarray(value)).to(target.dtype)
    net.load_state_dict(state)


def numpy_state(net: nn.Module, keys: list[str] | set[str]) -> dict[str, np.ndarray]:
    state = net.state_dict()
    return {k: state[k].detach().cpu().numpy().copy() for k in keys}


def received_weights(query: Payload, unit: str, p: TrainParams,
                     like: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The unit's global weights in the message, for the keys in `like` (the shared keys:
    with FedBN, normalization layers in a message are ignored), as float32."""
    raw = nest(query, f"w.{unit}")
    if not raw:
        raise QueryRejected(f"no weights for unit {unit!r} in the message")
    missing = [k for k in like if k not in raw]
    if missing:
        raise QueryRejected(f"the message lacks weights {missing[:3]} for unit {unit!r}")
    return fedavg.decode({k: raw[k] for k in like}, p.wire,
                         like={k: v.cpu().numpy() for k, v in like.items()})


def local_state_path(state_dir: Path, p: TrainParams, unit: str, round_no: int) -> Path:
    return state_dir / p.train_id / f"{p.model}-{unit}-r{round_no}.npz"


def load_local(state_dir: Path, p: TrainParams, unit: str,
               round_no: int) -> dict[str, np.ndarray] | None:
    """FedBN: this site's own normalization layers after round `round_no` (None: initial)."""
    if not p.fedbn or round_no <= 0:
        return None
    path = local_state_path(state_dir, p, unit, round_no)
    if not path.is_file():
        raise ValueError(f"FedBN: no local normalization state for {unit} after round "
                         f"{round_no} at this site")
    with np.load(path, allow_pickle=False) as saved:
        return {k: saved[k] for k in saved.files}


def save_local(state_dir: Path, p: TrainParams, unit: str, round_no: int,
               net: nn.Module) -> None:
    if not p.fedbn:
        return
    path = local_state_path(state_dir, p, unit, round_no)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **numpy_state(net, networks.norm_keys(net)))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- losses


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float,
               reduction: str = "mean") -> torch.Tensor:
    """Binary focal loss (Lin et al.), per pixel: −α_t (1 − p_t)^γ log p_t."""
    target = target.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    loss = alpha_t * (1 - p_t) ** gamma * ce
    return loss.mean() if reduction == "mean" else loss.flatten(1).mean(dim=1)


def classification_loss(logits: torch.Tensor, target: torch.Tensor,
                        p: TrainParams) -> torch.Tensor:
    """Class-weighted BCE (pos_weight = negatives/positives), on smoothed targets."""
    target = target.to(logits.dtype)
    if p.smoothing:
        target = target * (1 - p.smoothing) + 0.5 * p.smoothing
    weight = torch.tensor(p.pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.view(-1), target.view(-1),
                                              pos_weight=weight)


# --------------------------------------------------------------------------- training


def _optimizer(net: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    params = [q for q in net.parameters() if q.requires_grad]
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum,
                               weight_decay=p.weight_decay)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    return torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)


def _batches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Batches of `size`; a last batch of one joins the previous one (BatchNorm needs two)."""
    chunks = list(torch.split(order, size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        last = chunks.pop()  # popped first: chunks[-2] in one statement would name another
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


def local_batches(samples: np.ndarray, p: TrainParams,
                  gen: torch.Generator) -> list[np.ndarray]:
    """The round's batches: `p.local_steps` batches when set (reshuffling at each pass over
    the samples, so a small site still moves the model each round), else `p.epochs`
    passes."""
    batches: list[np.ndarray] = []
    passes = 0
    while len(samples) and (len(batches) < p.local_steps if p.local_steps
                            else passes < p.epochs):
        order = torch.from_numpy(samples)[torch.randperm(len(samples), generator=gen)]
        batches += [b.numpy() for b in _batches(order, p.batch_size)]
        passes += 1
    return batches[:p.local_steps] if p.local_steps else batches


def train_unit(net: nn.Module, data: ModelData, samples: np.ndarray, p: TrainParams,
               device: torch.device, gen: torch.Generator,
               anchor: dict[str, torch.Tensor] | None,
               batches: list[np.ndarray] | None = None) -> tuple[float, int]:
    """Local training on `samples` in `batches` (default `local_batches(samples, p, gen)`,
    drawn first from `gen` as here); returns (mean training loss, steps)."""
    if batches is None:
        batches = local_batches(samples, p, gen)
    dtype = amp_dtype(device, p.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    optimizer = _optimizer(net, p)
    spatial = data.x.ndim - 2
    augmenter = imaging.augmenter(spatial, p.size) if p.augment and p.model != "dsfr" else None
    net.train()
    total, steps = 0.0, 0
    for idx in batches:
        x = torch.from_numpy(data.x[idx])
        if p.model == "dsfr":
            target = torch.from_numpy(data.mask[idx]).float()
        else:
            target = torch.from_numpy(data.y[data.owner[idx]]).float()
            if augmenter is not None:
                seeds = torch.randint(2**31, (len(idx),), generator=gen).tolist()
                x = imaging.augment(x, seeds, augmenter)
            if p.mix:
                x, target = imaging.mix_batch(x, target,
                                              int(torch.randint(2**31, (1,), generator=gen)))
        x, target = x.to(device), target.to(device)
        autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype
                    else nullcontext())
        with autocast:
            logits = net(x)
            if p.model == "dsfr":
                loss = focal_loss(logits.float(), target, p.focal_alpha, p.focal_gamma)
            else:
                loss = classification_loss(logits.float(), target, p)
        if anchor is not None and p.strategy == "fedprox" and p.mu > 0:
            prox = sum(((w - anchor[n]) ** 2).sum() for n, w in net.named_parameters()
                       if n in anchor)
            loss = loss + 0.5 * p.mu * prox
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1), steps
