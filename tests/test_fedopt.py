"""Server optimizers (shared/fedopt.py) against Flower's own strategies, and their state.

Flower's strategies are driven through their real Message path: `Strategy.start(grid,
initial_arrays, num_rounds)` with a Grid whose `send_and_receive` plays the sites — each
reads the global weights from the `train` Message it received and replies
(`Message(content, reply_to=msg)`, as a ClientApp does) with its local weights in an
ArrayRecord and its patients as `num-examples` (Flower's `weighted_by_key` default) in a
MetricRecord. So `configure_train` keeps `current_arrays` as Flower itself does (FedOpt:
every round; FedAvgM: once, then its own result) and `aggregate_train` gets Flower's round
number. Our side runs the same sites against its own weights: Δ = fedavg.fedavg of
(local − current), new = optimizer.step(current, Δ).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.supercore.task_identity import TaskIdentity

from shared import fedavg, fedopt

SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (2, 36),
          "fc.bias": (2,)}
PATIENTS = {101: 23, 202: 57, 303: 11, 404: 38}  # node id → patients (the weights)
ROUNDS = 4


def initial_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def local_weights(node: int, server_round: int, received: dict[str, np.ndarray],
                  dtype: type) -> dict[str, np.ndarray]:
    """A site's 'local training': the weights received plus a seeded, site-specific drift
    (different per site and round, so sites disagree and the moments matter)."""
    rng = np.random.default_rng([node, server_round])
    bias = 0.05 * (node % 7 - 3)
    return {k: (v.astype(np.float64) + rng.normal(bias, 0.1, size=v.shape)).astype(dtype)
            for k, v in received.items()}


class SiteGrid(Grid):
    """The sites of PATIENTS behind a Grid, replying in `dtype`; records per round the
    global weights sent and the sites' replies."""

    def __init__(self, dtype: type) -> None:
        self.dtype = dtype
        self.sent: dict[int, dict[str, np.ndarray]] = {}
        self.replies: dict[int, list[tuple[float, dict[str, np.ndarray]]]] = {}

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self):
        return list(PATIENTS)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == "train"  # fraction_evaluate = 0
            server_round = int(msg.content["config"]["server-round"])
            received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            self.sent.setdefault(server_round, received)
            node = msg.metadata.dst_node_id
            local = local_weights(node, server_round, received, self.dtype)
            self.replies.setdefault(server_round, []).append((float(PATIENTS[node]), local))
            content = RecordDict({
                "arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
                "metrics": MetricRecord({"num-examples": PATIENTS[node]})})
            replies.append(Message(content, reply_to=msg))
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower's ServerApp runtime sets before a strategy builds Messages."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def flower_run(strategy, dtype: type) -> SiteGrid:
    """Flower's `start` over ROUNDS rounds from `initial_weights()` in `dtype`; the grid's
    `sent[r]` is w_{r−1}, and `sent[ROUNDS + 1]` is set to the final result w_ROUNDS."""
    grid = SiteGrid(dtype)
    start = {k: v.astype(dtype) for k, v in initial_weights().items()}
    result = strategy.start(grid, ArrayRecord({k: Array(v) for k, v in start.items()}),
                            num_rounds=ROUNDS)
    grid.sent[ROUNDS + 1] = {k: a.numpy() for k, a in result.arrays.items()}
    return grid


def our_steps(optimizer: fedopt.ServerOptimizer, grid: SiteGrid
              ) -> list[dict[str, np.ndarray]]:
    """Our w_1 … w_ROUNDS, each round from Flower's inputs of that round: the current
    weights it sent and the sites' replies, Δ = fedavg.fedavg(reply − current)."""
    out = []
    for server_round in range(1, ROUNDS + 1):
        current = grid.sent[server_round]
        updates = [(n, {k: local[k] - current[k] for k in current})
                   for n, local in grid.replies[server_round]]
        out.append(optimizer.step(current, fedavg.fedavg(updates)))
    return out


def max_relative_difference(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]
                            ) -> float:
    """max over elements of |ours − theirs| / max(|theirs|, 1): relative for |w| ≥ 1,
    absolute below (weights near 0 have no meaningful relative error)."""
    return max(float(np.max(np.abs(ours[k].astype(np.float64) - theirs[k])
                            / np.maximum(np.abs(theirs[k].astype(np.float64)), 1.0)))
               for k in theirs)


def make_flower(flower_name: str, params: dict):
    return getattr(flwr_strategy, flower_name)(
        min_train_nodes=len(PATIENTS), min_available_nodes=len(PATIENTS),
        fraction_evaluate=0.0, **params)


# (our name, Flower's class, Flower's keyword arguments — also given to make_optimizer)
CASES = [
    ("fedavgm", "FedAvgM", {"server_learning_rate": 0.7, "server_momentum": 0.9}),
    ("fedavgm", "FedAvgM", {"server_learning_rate": 1.5, "server_momentum": 0.0}),
    ("fedadagrad", "FedAdagrad", {}),
    ("fedadagrad", "FedAdagrad", {"eta": 0.03, "tau": 1e-2}),
    ("fedadam", "FedAdam", {}),
    ("fedadam", "FedAdam", {"eta": 0.05, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2}),
    ("fedyogi", "FedYogi", {}),
    ("fedyogi", "FedYogi", {"eta": 0.1, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-4}),
]


@pytest.mark.parametrize(("dtype", "tolerance"), [(np.float64, 1e-6), (np.float32, 1e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize(("name", "flower_name", "params"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_step_equals_flowers_strategy(task_identity, name, flower_name, params, dtype,
                                      tolerance) -> None:
    """Round by round on Flower's inputs, our weights equal Flower's. In float64 (arrays
    and replies float64: Flower then computes in float64) to the float32 rounding of our
    output, ~6e-8. In float32 Flower averages the sites' weights and subtracts the current
    ones in float32, so its Δ carries an absolute error ~ε₃₂·|w| (ours, from the updates,
    ~ε₃₂·|Δ|), which the adaptive step amplifies up to η/τ where |Δ| ≪ τ: measured ≤ 2.3e-6
    (FedYogi η/τ = 1000), ours then being the one within 6e-8 of the exact value."""
    grid = flower_run(make_flower(flower_name, params), dtype)
    ours = our_steps(fedopt.make_optimizer(name, **params), grid)
    # (Flower's FedAdam returns float64 from float32 arrays: its eta_norm is an np.float64)
    assert grid.sent[1]["conv.weight"].dtype == dtype
    for r in range(1, ROUNDS + 1):
        theirs = grid.sent[r + 1]
        # the optimizer moved the weights (a step of 0 would pass trivially)
        assert max_relative_difference(theirs, grid.sent[r]) > 1e-3
        assert max_relative_difference(ours[r - 1], theirs) < tolerance, f"round {r}"
        assert all(ours[r - 1][key].dtype == np.float32 for key in SHAPES)


def test_the_comparison_can_tell_the_rules_apart(task_identity) -> None:
    """On Flower's FedYogi inputs our FedAdam, FedAdagrad and FedAvg are far off: the
    agreement above is not a property of any rule."""
    grid = flower_run(make_flower("FedYogi", {"eta": 0.1}), np.float64)
    for other in (fedopt.FedAdam(server_lr=0.1), fedopt.FedAdagrad(), fedopt.ServerOptimizer()):
        assert max_relative_difference(our_steps(other, grid)[-1], grid.sent[ROUNDS + 1]) > 1e-3
    yogi = our_steps(fedopt.FedYogi(server_lr=0.1), grid)[-1]
    assert max_relative_difference(yogi, grid.sent[ROUNDS + 1]) < 1e-6


@pytest.mark.parametrize(("ours", "flower_name", "mapping"), [
    (fedopt.FedAvgM, "FedAvgM", {"server_lr": "server_learning_rate",
                                 "momentum": "server_momentum"}),
    (fedopt.FedAdagrad, "FedAdagrad", {"server_lr": "eta", "tau": "tau"}),
    (fedopt.FedAdam, "FedAdam", {"server_lr": "eta", "beta_1": "beta_1",
                                 "beta_2": "beta_2", "tau": "tau"}),
    (fedopt.FedYogi, "FedYogi", {"server_lr": "eta", "beta_1": "beta_1",
                                 "beta_2": "beta_2", "tau": "tau"}),
])
def test_defaults_are_flowers(ours, flower_name, mapping) -> None:
    flower = inspect.signature(getattr(flwr_strategy, flower_name)).parameters
    params = ours().params()
    for mine, theirs in mapping.items():
        assert params[mine] == flower[theirs].default, mine
    assert fedopt.FedAdagrad().beta_1 == 0.0  # Flower's FedAdagrad fixes beta_1 = 0


# ------------------------------------------------------------------ FedAvg and plain keys


def mixed_weights(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Global weights with conv, BatchNorm (affine, running stats, counter) keys and a
    mean update for all but `bn.weight`/`bn.bias` (FedBN: local)."""
    rng = np.random.default_rng(seed)
    current = {"conv.weight": rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
               "conv.bias": rng.normal(size=3).astype(np.float32),
               "bn.weight": rng.normal(size=3).astype(np.float32),
               "bn.bias": rng.normal(size=3).astype(np.float32),
               "bn.running_mean": rng.normal(size=3).astype(np.float32),
               "bn.running_var": rng.uniform(0.5, 2, size=3).astype(np.float32),
               "bn.num_batches_tracked": np.array(40, dtype=np.int64)}
    delta = {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32)
             for k, v in current.items() if k.startswith("conv") or "running" in k}
    delta["bn.num_batches_tracked"] = np.array(52, dtype=np.int64)
    return current, delta


PLAIN = {"bn.running_mean", "bn.running_var"}


@pytest.mark.parametrize("params", [{}, {"server_lr": 1.0, "momentum": 0.0}])
def test_fedavg_equals_apply_update_exactly(params) -> None:
    name = "fedavgm" if params else "fedavg"  # FedAvgM at Flower's defaults is FedAvg
    opt = fedopt.make_optimizer(name, **params)
    current, delta = mixed_weights(3)
    for _ in range(3):
        new = opt.step(current, delta, plain=PLAIN)
        expected = fedavg.apply_update(current, delta)
        assert set(new) == set(expected)
        for key in expected:
            assert new[key].dtype == expected[key].dtype
            np.testing.assert_array_equal(new[key], expected[key])
        current = new


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_integer_and_plain_keys_are_averaged_and_local_keys_unchanged(name) -> None:
    params = {"momentum": 0.9, "server_lr": 0.5} if name == "fedavgm" else {}
    opt = fedopt.make_optimizer(name, **params)
    current, delta = mixed_weights(4)
    for _ in range(3):
        new = opt.step(current, delta, plain=PLAIN)
        averaged = fedavg.apply_update(current, delta)
        for key in PLAIN | {"bn.num_batches_tracked"}:
            assert new[key].dtype == current[key].dtype
            np.testing.assert_array_equal(new[key], averaged[key])
        assert int(new["bn.num_batches_tracked"]) == 52
        for key in ("bn.weight", "bn.bias"):  # not in Δ
            np.testing.assert_array_equal(new[key], current[key])
        for key in ("conv.weight", "conv.bias"):  # adapted: not FedAvg
            assert new[key].dtype == np.float32
            assert np.max(np.abs(new[key] - averaged[key])) > 1e-3
        current = new
    state = opt.state_dict()
    moment_keys = {k.partition(".")[2] for k in state
                   if k not in ("optimizer", "t") and not k.startswith("param.")}
    assert moment_keys == {"conv.weight", "conv.bias"}


def test_plain_keys_are_adapted_when_not_listed() -> None:
    """The `plain` argument is what keeps running statistics out of the adaptive rule."""
    current, delta = mixed_weights(5)
    new = fedopt.FedAdam().step(current, delta)
    averaged = fedavg.apply_update(current, delta)
    assert np.max(np.abs(new["bn.running_mean"] - averaged["bn.running_mean"])) > 1e-3


def test_step_rejects_updates_that_do_not_fit() -> None:
    opt = fedopt.FedAdam()
    current, delta = mixed_weights(6)
    with pytest.raises(ValueError, match=r"conv\.bias"):
        opt.step(current, {**delta, "conv.bias": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="global weights lack"):
        opt.step(current, {**delta, "fc.weight": np.zeros(2, np.float32)})
    opt.step(current, delta)
    grown = {**current, "conv.bias": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match=r"optimizer state for 'conv\.bias'"):
        opt.step(grown, {**delta, "conv.bias": np.zeros(5, np.float32)})


# ------------------------------------------------------------------ checkpoint / resume


def run_rounds(opt: fedopt.ServerOptimizer, current: dict[str, np.ndarray], first: int,
               last: int) -> dict[str, np.ndarray]:
    for server_round in range(first, last + 1):
        rng = np.random.default_rng(100 + server_round)
        delta = {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32)
                 for k, v in current.items() if k != "bn.weight"}
        delta["bn.num_batches_tracked"] = np.array(10 * server_round, dtype=np.int64)
        current = opt.step(current, delta, plain=PLAIN)
    return current


RESUME = [("fedavg", {}), ("fedavgm", {"momentum": 0.9, "server_lr": 0.5}),
          ("fedadagrad", {}), ("fedadam", {}), ("fedyogi", {})]


@pytest.mark.parametrize(("name", "params"), RESUME, ids=[n for n, _ in RESUME])
def test_resume_from_saved_state_is_bit_identical(tmp_path, name, params) -> None:
    start, _ = mixed_weights(7)
    straight = run_rounds(fedopt.make_optimizer(name, **params), start, 1, 6)

    first = fedopt.make_optimizer(name, **params)
    halfway = run_rounds(first, start, 1, 3)
    np.savez(tmp_path / "weights.npz", **halfway)
    np.savez(tmp_path / "optimizer.npz", **first.state_dict())
    del first

    resumed = fedopt.make_optimizer(name, **params)
    with np.load(tmp_path / "optimizer.npz", allow_pickle=False) as saved:
        resumed.load_state_dict(dict(saved))
    with np.load(tmp_path / "weights.npz", allow_pickle=False) as saved:
        weights = dict(saved)
    assert resumed.t == 3
    end = run_rounds(resumed, weights, 4, 6)
    assert set(end) == set(straight)
    for key in straight:
        assert end[key].dtype == straight[key].dtype
        assert end[key].tobytes() == straight[key].tobytes(), key


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_resume_without_the_state_differs(name) -> None:
    """Restarting the optimizer fresh (moments and counter lost) gives other weights: the
    bit-identity above depends on the state."""
    params = {"momentum": 0.9} if name == "fedavgm" else {}
    start, _ = mixed_weights(7)
    straight = run_rounds(fedopt.make_optimizer(name, **params), start, 1, 6)
    halfway = run_rounds(fedopt.make_optimizer(name, **params), start, 1, 3)
    fresh = run_rounds(fedopt.make_optimizer(name, **params), halfway, 4, 6)
    assert np.max(np.abs(fresh["conv.weight"] - straight["conv.weight"])) > 1e-4


def test_state_of_another_optimizer_or_other_parameters_is_refused() -> None:
    opt = fedopt.FedAdam()
    current, delta = mixed_weights(8)
    opt.step(current, delta)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="'fedadam', not 'fedyogi'"):
        fedopt.FedYogi().load_state_dict(state)
    with pytest.raises(ValueError, match="beta_2"):
        fedopt.FedAdam(beta_2=0.999).load_state_dict(state)
    with pytest.raises(ValueError, match="unknown entry"):
        fedopt.FedAdam().load_state_dict({**state, "w.conv.bias": np.zeros(3)})
    fresh = fedopt.FedAdam()
    fresh.load_state_dict(state)
    assert fresh.t == 1 and set(fresh.state["m"]) == {"conv.weight", "conv.bias",
                                                      "bn.running_mean", "bn.running_var"}


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize(("name", "params", "match"), [
    ("fedavgm", {"server_lr": -0.1}, "server_lr"),
    ("fedavgm", {"server_learning_rate": 0.0}, "server_lr"),
    ("fedavgm", {"momentum": 1.0}, "momentum"),
    ("fedavgm", {"server_momentum": -0.5}, "momentum"),
    ("fedadagrad", {"eta": -1.0}, "server_lr"),
    ("fedadagrad", {"tau": 0.0}, "tau"),
    ("fedadam", {"server_lr": -1e-3}, "server_lr"),
    ("fedadam", {"beta_1": 1.0}, "beta_1"),
    ("fedadam", {"beta_1": -0.1}, "beta_1"),
    ("fedadam", {"beta_2": float("nan")}, "beta_2"),
    ("fedadam", {"tau": -1e-3}, "tau"),
    ("fedyogi", {"beta_2": 1.5}, "beta_2"),
    ("fedyogi", {"server_lr": "fast"}, "server_lr"),
    ("fedyogi", {"momentum": 0.9}, "momentum"),  # not a FedYogi parameter
    ("fedadagrad", {"beta_2": 0.5}, "beta_2"),  # nor a FedAdagrad one
    ("fedavg", {"server_lr": 0.5}, "server_lr"),
    ("fedadam", {"eta": 0.1, "server_lr": 0.2}, "server_lr"),
    ("fedsgd", {}, "fedsgd"),
])
def test_bad_parameters_raise_naming_them(name, params, match) -> None:
    with pytest.raises(ValueError, match=match):
        fedopt.make_optimizer(name, **params)


def test_constructors_validate_too() -> None:
    with pytest.raises(ValueError, match=r"beta_1 must be in \[0, 1\)"):
        fedopt.FedYogi(beta_1=1.2)
    with pytest.raises(ValueError, match=r"server_lr must be in \(0, inf\)"):
        fedopt.FedAdam(server_lr=-0.1)


def test_factory_knows_every_name() -> None:
    assert set(fedopt.SERVER_OPTIMIZERS) == set(fedopt.OPTIMIZERS)
    for name in fedopt.SERVER_OPTIMIZERS:
        assert fedopt.make_optimizer(name.upper()).name == name
