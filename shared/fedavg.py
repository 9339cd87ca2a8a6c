"""Federated averaging of CNN weights, and the weights' form on the wire. Pure numpy.

- FedAvg (McMahan et al., 2017): the new global weights are the mean of the sites' weights
  after local training, weighted by the patients each site trained on. Sites send their
  *update* (local − the global weights they received), so the server adds the weighted
  mean update to its own float32 copy: with a lossy wire dtype the rounding of what the
  server sent never accumulates in the global model.
- FedProx (Li et al., 2020) is FedAvg on the server; its proximal term μ/2·‖w − w_global‖²
  is added to the local loss at the site (client/local/local_training.py).
- FedBN (Li et al., 2021): normalization layers (their keys: `neural.networks.norm_keys`)
  are neither sent nor averaged; each site keeps its own.

Wire dtypes: float32 (as is), float16, or bfloat16. numpy has no bfloat16, so a bfloat16
array travels as the uint16 view of its bits (the upper half of the float32, rounded to
nearest even) and the message says `wire.dtype = bfloat16`. Integer arrays (e.g.
BatchNorm's `num_batches_tracked`) travel unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

WIRE_DTYPES = ("float32", "float16", "bfloat16")


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ wᵢ·aᵢ / Σ wᵢ in float64, returned as float32 (integers: rounded, original dtype)."""
    if not arrays or len(arrays) != len(weights):
        raise ValueError("need one weight per array, at least one array")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"arrays of different shapes: {sorted(shapes)}")
    total = np.zeros(np.shape(arrays[0]), dtype=np.float64)
    for a, wi in zip(arrays, w, strict=True):
        total += wi * np.asarray(a, dtype=np.float64)
    mean = total / w.sum()
    if np.issubdtype(np.asarray(arrays[0]).dtype, np.integer):
        return np.rint(mean).astype(np.asarray(arrays[0]).dtype)
    return mean.astype(np.float32)


def fedavg(updates: Sequence[tuple[float, Mapping[str, np.ndarray]]],
           skip: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Weighted mean per key of the sites' (weight, {key: array}) updates, without the
    `skip` keys (FedBN). Every site must send the same keys."""
    if not updates:
        raise ValueError("no updates to average")
    skip = set(skip)
    keys = [k for k in updates[0][1] if k not in skip]
    for _, update in updates[1:]:
        if {k for k in update if k not in skip} != set(keys):
            raise ValueError("sites sent different weight keys")
    weights = [w for w, _ in updates]
    return {k: weighted_mean([u[k] for _, u in updates], weights) for k in keys}


def apply_update(global_weights: Mapping[str, np.ndarray],
                 mean_update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """global + mean update for the keys in the update (others unchanged). Integer buffers
    (counters) take the mean of the sites' values, which is what their update holds."""
    out = {k: np.array(v, copy=True) for k, v in global_weights.items()}
    for key, delta in mean_update.items():
        base = np.asarray(global_weights[key])
        if np.issubdtype(base.dtype, np.integer):
            out[key] = np.asarray(delta).astype(base.dtype)
        else:
            out[key] = (base.astype(np.float32) + np.asarray(delta, dtype=np.float32))
    return out


# --------------------------------------------------------------------------- the wire


def check_dtype(dtype: str) -> str:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; known: {list(WIRE_DTYPES)}")
    return dtype


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):
        out[nan] = np.uint16(0x7FC0)
    return out


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) → float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode(arrays: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Floating arrays in the wire dtype (bfloat16 as uint16 bits); others unchanged."""
    check_dtype(dtype)
    out = {}
    for key, value in arrays.items():
        a = np.asarray(value)
        if not np.issubdtype(a.dtype, np.floating):
            out[key] = a
        elif dtype == "bfloat16":
            out[key] = to_bfloat16_bits(a)
        else:
            out[key] = np.ascontiguousarray(a, dtype=np.dtype(dtype))
    return out


def decode(arrays: Mapping[str, np.ndarray], dtype: str,
           like: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inverse of `encode`: floating arrays back to float32. For bfloat16 a uint16 array is
    decoded when `like` says the key is floating (or, without `like`, always)."""
    check_dtype(dtype)
    out = {}
    for key, value in arrays.items():
        a = np.asarray(value)
        floating = (np.issubdtype(np.asarray(like[key]).dtype, np.floating)
                    if like is not None and key in like else None)
        if dtype == "bfloat16" and a.dtype == np.uint16 and floating is not False:
            out[key] = from_bfloat16_bits(a)
        elif np.issubdtype(a.dtype, np.floating):
            out[key] = a.astype(np.float32)
        else:
            out[key] = a
    return out


def wire_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Raw bytes of the arrays as sent (their buffers; a payload under `wire.PACK_BYTES`
    adds its npz headers, about 100 bytes an array)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def parameter_bytes(arrays: Mapping[str, np.ndarray], dtype: str) -> int:
    """What `encode(arrays, dtype)` will weigh, without encoding."""
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[check_dtype(dtype)]
    total = 0
    for a in arrays.values():
        a = np.asarray(a)
        total += a.size * size if np.issubdtype(a.dtype, np.floating) else a.nbytes
    return int(total)
