"""The message codec both apps use: Payload ⇄ Flower RecordDict, arrays in one
ArrayRecord, the rest in one ConfigRecord.

A payload whose arrays hold at most `PACK_BYTES` (every statistics query and reply) sends
them instead as one npz blob (no pickle) in the ConfigRecord, under the reserved key
`__arrays__`: on a deployment every Flower object of a message (each Array, each of its
chunks, each record) is one HTTPS request to the SuperLink and one of its database writes,
so a message of 3 objects instead of 5–20 takes a fraction of the round (docs/BENCHMARKS.md
§9). Larger payloads (CNN weights) keep one Array per key, which Flower chunks.

Its own package because the ClientApp and the ServerApp both need it while neither may
import the other, and `shared/` stays free of Flower (the payload rules themselves,
`split_payload`/`join_payload`, are shared/schema.py's). The same payloads also travel as
npz frames on a pipe to a local process (`write_frame`/`read_frame`): the pooled reference
of a simulation (simulation/pooled_site.py).
"""

from __future__ import annotations

import io
import json
import struct
from typing import BinaryIO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared import schema

PACK_BYTES = 1 << 20  # arrays up to this many bytes travel packed in the ConfigRecord
PACKED = "__arrays__"  # the reserved ConfigRecord key of packed arrays


def to_records(payload: schema.Payload) -> RecordDict:
    arrays, config = schema.split_payload(payload)
    if PACKED in config or PACKED in arrays:
        raise schema.SchemaError(f"payload key {PACKED!r} is reserved by the codec")
    if arrays and sum(a.nbytes for a in arrays.values()) <= PACK_BYTES:
        return RecordDict({schema.CONFIG: ConfigRecord({**config, PACKED: _npz(arrays)})})
    return RecordDict({
        schema.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        schema.CONFIG: ConfigRecord(config),
    })


def read_payload(content: RecordDict) -> schema.Payload:
    records = content.array_records.get(schema.ARRAYS)
    config = dict(content.config_records.get(schema.CONFIG) or {})
    arrays = {k: v.numpy() for k, v in (records or {}).items()}
    packed = config.pop(PACKED, None)
    if packed is not None:
        if not isinstance(packed, bytes):
            raise schema.SchemaError(f"{PACKED!r} is not bytes")
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
    buffer = io.BytesIO()
    np.savez(buffer, **{_CONFIG: np.frombuffer(json.dumps(config).encode(), np.uint8)},
             **arrays)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> schema.Payload:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        config = json.loads(npz[_CONFIG].tobytes().decode())
        arrays = {k: npz[k] for k in npz.files if k != _CONFIG}
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
