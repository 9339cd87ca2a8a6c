"""The message codec both apps use: Payload ⇄ Flower RecordDict, the scalars in one
ConfigRecord, the arrays packed beside them.

All of a payload's arrays travel as one npz blob (no pickle) under the reserved key
`__arrays__`: on a deployment every Flower object of a message (each Array, each of its
chunks, each record) is one HTTPS request to the SuperLink and one of its writes, so a
statistics message of 3 objects instead of 5–20, and a CNN weight message of a few 5 MiB
chunks instead of two objects per tensor, take a fraction of the time (docs/BENCHMARKS.md
§9). Up to `PACK_BYTES` the blob is a bytes value of the ConfigRecord (no ArrayRecord at
all); above, it is one uint8 Array in the ArrayRecord, which Flower chunks. `read_payload`
also reads messages with one Array per key (other senders, older FedDLR).
"""

from __future__ import annotations

import io
import json
import struct
from typing import BinaryIO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared import schema

PACK_BYTES = 1 << 20  # a packed blob up to this size travels in the ConfigRecord
PACKED = "__arrays__"  # the reserved ConfigRecord key of packed arrays


def to_records(payload: schema.Payload) -> RecordDict:
    arrays, config = schema.split_payload(payload)
    if PACKED in config or PACKED in arrays:
        raise schema.SchemaError(f"payload key {PACKED!r} is reserved by the codec")
    if not arrays:
        return RecordDict({schema.CONFIG: ConfigRecord(config)})
    blob = _npz(arrays)
    if len(blob) <= PACK_BYTES:
        return RecordDict({schema.CONFIG: ConfigRecord({**config, PACKED: blob})})
    return RecordDict({
        schema.ARRAYS: ArrayRecord({PACKED: Array(np.frombuffer(blob, np.uint8))}),
        schema.CONFIG: ConfigRecord(config),
    })


def read_payload(content: RecordDict) -> schema.Payload:
    records = content.array_records.get(schema.ARRAYS)
    config = dict(content.config_records.get(schema.CONFIG) or {})
    arrays = {k: v.numpy() for k, v in (records or {}).items()}
    blobs = [("config", config.pop(PACKED, None)), ("arrays", arrays.pop(PACKED, None))]
    for where, packed in blobs:
        if packed is None:
            continue
        if isinstance(packed, np.ndarray) and packed.dtype == np.uint8 and packed.ndim == 1:
            packed = packed.tobytes()
        if not isinstance(packed, bytes):
            raise schema.SchemaError(f"{PACKED!r} in {where} is not bytes")
        unpacked = _unnpz(packed)
        if set(unpacked) & set(arrays):
            raise schema.SchemaError(f"keys both packed and in {schema.ARRAYS!r}")
        arrays.update(unpacked)
    return schema.join_payload(arrays, config)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _unnpz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


_CONFIG = "__config__"


def to_bytes(payload: schema.Payload) -> bytes:
    """A payload as one npz blob (the config as JSON in a reserved entry; no pickle)."""
    arrays, config = schema.split_payload(payload)
    return _npz({_CONFIG: np.frombuffer(json.dumps(config).encode(), np.uint8), **arrays})


def from_bytes(blob: bytes) -> schema.Payload:
    arrays = _unnpz(blob)
    config = json.loads(arrays.pop(_CONFIG).tobytes().decode())
    return schema.join_payload(arrays, config)


def write_frame(stream: BinaryIO, payload: schema.Payload) -> None:
    """One payload on a byte stream (a pipe to a local process): its length, then it."""
    blob = to_bytes(payload)
    stream.write(struct.pack("<Q", len(blob)) + blob)
    stream.flush()


def read_frame(stream: BinaryIO) -> schema.Payload | None:
    """The next payload on the stream; None when the other side closed it."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    blob = stream.read(size)
    if len(blob) < size:
        raise EOFError(f"stream closed inside a frame ({len(blob)} of {size} bytes)")
    return from_bytes(blob)
