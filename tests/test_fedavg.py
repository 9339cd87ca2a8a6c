"""FedAvg math and the weights' wire form (shared/fedavg.py), against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neural.networks import NetworkSpec, norm_keys
from shared import fedavg


def random_sites(seed: int = 0, n_sites: int = 3) -> list[tuple[float, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return [(float(rng.integers(10, 60)),
             {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
              "conv.bias": rng.normal(size=4).astype(np.float32),
              "bn.weight": rng.normal(size=4).astype(np.float32),
              "bn.num_batches_tracked": np.array(rng.integers(5, 50))})
            for _ in range(n_sites)]


def test_fedavg_is_the_patient_weighted_mean() -> None:
    sites = random_sites()
    mean = fedavg.fedavg(sites)
    weights = [w for w, _ in sites]
    for key in ("conv.weight", "conv.bias", "bn.weight"):
        direct = np.average(np.stack([u[key] for _, u in sites]), axis=0, weights=weights)
        np.testing.assert_allclose(mean[key], direct, rtol=1e-6, atol=1e-7)
        assert mean[key].dtype == np.float32
    counts = np.average([u["bn.num_batches_tracked"] for _, u in sites], weights=weights)
    assert mean["bn.num_batches_tracked"] == np.rint(counts)


def test_fedbn_keys_are_neither_averaged_nor_required_to_agree() -> None:
    sites = random_sites(1)
    mean = fedavg.fedavg(sites, skip={"bn.weight", "bn.num_batches_tracked"})
    assert set(mean) == {"conv.weight", "conv.bias"}
    with pytest.raises(ValueError, match="different weight keys"):
        fedavg.fedavg([sites[0], (5.0, {"conv.weight": sites[0][1]["conv.weight"]})])


def test_updates_added_to_the_global_model_equal_fedavg_of_the_local_models() -> None:
    """Sites send local − global; global + weighted mean update = weighted mean of locals."""
    rng = np.random.default_rng(2)
    start = {"w": rng.normal(size=(5, 5)).astype(np.float32)}
    locals_ = [(n, {"w": (start["w"] + rng.normal(size=(5, 5)) * 0.1).astype(np.float32)})
               for n in (12.0, 30.0, 18.0)]
    updates = [(n, {"w": w["w"] - start["w"]}) for n, w in locals_]
    new = fedavg.apply_update(start, fedavg.fedavg(updates))
    np.testing.assert_allclose(new["w"], fedavg.fedavg(locals_)["w"], rtol=1e-5, atol=1e-6)


def test_weighted_mean_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        fedavg.weighted_mean([np.zeros(2)], [0.0])
    with pytest.raises(ValueError):
        fedavg.weighted_mean([np.zeros(2), np.zeros(3)], [1, 1])


def test_bfloat16_bits_match_torch_round_to_nearest_even() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(scale=s, size=2000) for s in (1e-6, 1e-2, 1.0, 1e4)]
                       ).astype(np.float32)
    x = np.concatenate([x, np.array([0.0, -0.0, np.inf, -np.inf, 1.00390625, 1.01171875],
                                    dtype=np.float32)])
    ours = fedavg.to_bfloat16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    back = fedavg.from_bfloat16_bits(ours)
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(fedavg.from_bfloat16_bits(fedavg.to_bfloat16_bits(
        np.array([np.nan], np.float32))))[0]


@pytest.mark.parametrize("dtype", fedavg.WIRE_DTYPES)
def test_wire_round_trip_and_byte_counts_on_a_real_network(dtype: str) -> None:
    net = NetworkSpec("dl_mri", width=0.0625).build(0)  # BatchNorm: integer buffers too
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    encoded = fedavg.encode(state, dtype)
    floats = sum(v.size for v in state.values() if np.issubdtype(v.dtype, np.floating))
    ints = sum(v.nbytes for v in state.values() if not np.issubdtype(v.dtype, np.floating))
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    assert fedavg.wire_bytes(encoded) == floats * size + ints
    assert fedavg.parameter_bytes(state, dtype) == fedavg.wire_bytes(encoded)
    if dtype == "bfloat16":
        assert all(encoded[k].dtype == np.uint16 for k in state
                   if np.issubdtype(state[k].dtype, np.floating))
    decoded = fedavg.decode(encoded, dtype, like=state)
    for key, value in state.items():
        assert decoded[key].dtype == (np.float32 if np.issubdtype(value.dtype, np.floating)
                                      else value.dtype)
        if dtype == "float32" or not np.issubdtype(value.dtype, np.floating):
            np.testing.assert_array_equal(decoded[key], value)
        else:
            # half precision: relative error of one rounding (10 / 7 mantissa bits)
            rel = 2.0 ** -11 if dtype == "float16" else 2.0 ** -8
            np.testing.assert_allclose(decoded[key], value, rtol=rel, atol=1e-7)


def test_decode_leaves_integer_uint16_arrays_alone_with_like() -> None:
    arrays = {"counts": np.arange(4, dtype=np.uint16), "w": fedavg.to_bfloat16_bits(
        np.ones(3, np.float32))}
    like = {"counts": np.zeros(4, np.uint16), "w": np.zeros(3, np.float32)}
    out = fedavg.decode(arrays, "bfloat16", like=like)
    np.testing.assert_array_equal(out["counts"], np.arange(4))
    np.testing.assert_array_equal(out["w"], np.ones(3, np.float32))


def test_norm_keys_cover_every_normalization_layer() -> None:
    for model in ("dsfr", "dl_mri", "dl_us"):
        net = NetworkSpec(model, width=0.0625).build(0)
        keys = norm_keys(net)
        assert keys and keys < set(net.state_dict())
        assert not any("conv" in k and k.endswith("weight") and "norm" not in k and "bn" not in k
                       for k in keys)
    unet = NetworkSpec("dsfr", width=0.0625).build(0)
    assert {k for k in unet.state_dict() if ".norm." in k} == norm_keys(unet)
