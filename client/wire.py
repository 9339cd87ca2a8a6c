"""Payload ⇄ Flower RecordDict: arrays in one ArrayRecord, the rest in one ConfigRecord.

Used by both apps (the server imports it too); `shared/` stays free of Flower.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared import schema


def to_records(payload: schema.Payload) -> RecordDict:
    arrays, config = schema.split_payload(payload)
    return RecordDict({
        schema.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        schema.CONFIG: ConfigRecord(config),
    })


def read_payload(content: RecordDict) -> schema.Payload:
    arrays = content.array_records.get(schema.ARRAYS)
    config = content.config_records.get(schema.CONFIG)
    return schema.join_payload(
        {k: v.numpy() for k, v in (arrays or {}).items()}, dict(config or {})
    )
