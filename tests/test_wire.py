"""The message codec: a payload's arrays as one npz blob, in the ConfigRecord when small
(3 Flower objects a message on a deployment), else one uint8 Array that Flower chunks; what
comes out is what went in, and messages with one Array per key still read."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from shared import schema
from wire import PACK_BYTES, PACKED, flower_patches, read_payload, to_records

STATISTICS = {"status": "ok", "n": 12, "site.name": "A", "levels": ["x", "y"],
              "sums": np.arange(6.0).reshape(2, 3), "counts": np.array([3, 4], np.int64),
              "mask": np.array([True, False])}


def same(a: schema.Payload, b: schema.Payload) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, np.ndarray):
            assert b[key].dtype == value.dtype and b[key].shape == value.shape, key
            np.testing.assert_array_equal(b[key], value)
        else:
            assert b[key] == value, key


def test_a_statistics_payload_is_three_flower_objects_and_comes_back_equal() -> None:
    records = to_records(STATISTICS)
    assert list(records) == [schema.CONFIG] and PACKED in records[schema.CONFIG]
    assert len(get_all_nested_objects(records)) == 2  # RecordDict + ConfigRecord (+ Message)
    same(STATISTICS, read_payload(records))


def test_a_large_payload_is_one_uint8_array_that_flower_chunks() -> None:
    weights = {"w.a": np.ones(PACK_BYTES // 8 + 1), "w.b": np.zeros(3, np.float32), "k": 1}
    records = to_records(weights)
    assert list(records.array_records[schema.ARRAYS]) == [PACKED]
    assert records.array_records[schema.ARRAYS][PACKED].dtype == "uint8"
    assert PACKED not in records[schema.CONFIG]
    same(weights, read_payload(records))
    many = {f"w.{i}": np.full(PACK_BYTES // 32, float(i)) for i in range(40)}  # 40 tensors
    assert len(get_all_nested_objects(to_records(many))) < 12  # ~ 5 chunks of 5 MiB + 4
    same(many, read_payload(to_records(many)))


def test_unpacked_messages_from_other_senders_still_read() -> None:
    records = RecordDict({schema.ARRAYS: ArrayRecord({"a": Array(np.ones(2))}),
                          schema.CONFIG: ConfigRecord({"status": "ok"})})
    same({"a": np.ones(2), "status": "ok"}, read_payload(records))


def test_the_reserved_key_and_bad_packed_blobs_are_refused() -> None:
    with pytest.raises(schema.SchemaError, match="reserved"):
        to_records({PACKED: 1})
    with pytest.raises(schema.SchemaError, match="not bytes"):
        read_payload(RecordDict({schema.CONFIG: ConfigRecord({PACKED: "text"})}))
    with pytest.raises(schema.SchemaError, match="not bytes"):
        read_payload(RecordDict({schema.ARRAYS: ArrayRecord({PACKED: Array(np.ones(3))})}))
    pickled = io.BytesIO()
    np.savez(pickled, a=np.array([object()], dtype=object))
    with pytest.raises(ValueError):  # np.load without pickle refuses object arrays
        read_payload(RecordDict({schema.CONFIG: ConfigRecord({PACKED: pickled.getvalue()})}))
    both = to_records({"a": np.ones(2)})
    both[schema.ARRAYS] = ArrayRecord({"a": Array(np.ones(2))})
    with pytest.raises(schema.SchemaError, match="both"):
        read_payload(both)


def test_missing_objects_are_asked_again_after_50_ms_not_flowers_second() -> None:
    changed = flower_patches.quick_object_pulls()
    assert set(changed) == {"flwr.supercore.inflatable.inflatable_utils",
                            "flwr.superlink.grid.http_grid",
                            "flwr.supernode.start_client_internal"}
    assert flower_patches.quick_object_pulls() == changed
    from flwr.supercore.inflatable import inflatable_utils

    quick = inflatable_utils.pull_objects  # idempotent: a partial of Flower's, not of itself
    assert quick.func.__name__ == "pull_objects" and not hasattr(quick.func, "func")

    asked: list[float] = []

    def pull(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) < 3:
            raise ObjectUnavailableError(object_id)
        return b"x"

    started = time.monotonic()
    assert inflatable_utils.pull_objects(["o"], pull) == {"o": b"x"}
    assert len(asked) == 3
    assert time.monotonic() - started < 0.6  # Flower's defaults: 1 s + 2 s
