"""`dp=…` on the CNN weight rounds (shared/dp.py, client/local/dp.py, server/training/engine.py).

Against outside references: Flower's own DP pieces (`fixedclipping_mod`, `LocalDpMod`,
`DifferentialPrivacyServerSideFixedClipping`, `compute_stdv`,
`compute_adaptive_noise_params`), Opacus' RDP accountant, an independent implementation of
its RDP → (ε, δ) conversion, and the exact (ε, δ) curve of the Gaussian mechanism (Balle &
Wang 2018). Through the real engine and site handlers (in process): clipping bounds every
update that leaves a site, the ε in results is the accountant's for the steps taken, a site
that requires DP refuses a plain update and one over its budget, and DP that clips nothing
and adds no noise is plain FedAvg to the bit.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv
from flwr.supercore.task_identity import TaskIdentity

from client.local.dp import LEDGER_FILE, SiteDP
from client.site.session import open_session
from neural import accounting
from server.training.engine import ServerDP
from shared import dp, fedavg
from shared.policy import DPRequirement
from shared.schema import nest
from simulation.cohort import simulate_cohort
from simulation.in_process import InProcessTransport
from tests.test_training_engine import run as engine_run

TINY = {"cnn-width": 0.0625, "mri-size": 16, "deep-cv-folds": 2, "rounds": 2,
        "local-steps": 3, "batch-size": 4, "gradcam-patients": 0, "seed": 5}
ROUNDS, UNITS = 2, 2


def _update(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"a": (rng.normal(size=(40, 50)) * scale).astype(np.float32),
            "b": (rng.normal(size=300) * scale).astype(np.float32),
            "n": np.array(7, dtype=np.int64)}


# --------------------------------------------------------------------------- Flower's pieces


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's runtime sets before Messages are built."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _message(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type="train")


def _reply(msg: Message, arrays: dict[str, np.ndarray], examples: int = 1) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples})})
    return Message(content, reply_to=msg)


def _floats(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in update.items() if np.issubdtype(v.dtype, np.floating)}


def _through_mod(mod: Any, sent: dict[str, np.ndarray], update: dict[str, np.ndarray],
                 config: dict[str, Any]) -> dict[str, np.ndarray]:
    """What a Flower client mod makes of `sent + update`, as an update again."""
    msg = _message(sent, config)
    out = mod(msg, Context(1, 1, {}, {}, {}),
              lambda m, c: _reply(m, {k: sent[k] + update[k] for k in sent}))
    assert not out.has_error(), out.error
    received = out.content.array_records["arrays"]
    return {k: received[k].numpy().astype(np.float64) - sent[k] for k in sent}


@pytest.mark.usefixtures("task_identity")
def test_site_clipping_is_flowers_fixedclipping_mod() -> None:
    rng = np.random.default_rng(1)
    update = _floats(_update(rng, 0.1))
    sent = {k: rng.normal(size=v.shape) for k, v in update.items()}  # float64: exact
    norm = dp.update_norm(update)
    for clip_norm in (norm / 3, norm * 2):
        theirs = _through_mod(fixedclipping_mod, sent, {k: v.astype(np.float64)
                                                        for k, v in update.items()},
                              {"clipping_norm": clip_norm})
        mine, was_clipped = dp.clip(update, clip_norm)
        assert was_clipped == (clip_norm < norm)
        for key in update:
            np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-6, atol=1e-9)
        encoded, _ = dp.clip_encoded(update, clip_norm, "bfloat16")
        sent_norm = dp.update_norm(fedavg.decode(encoded, "bfloat16", like=update))
        assert sent_norm <= clip_norm and sent_norm > 0.99 * min(norm, clip_norm)


@pytest.mark.usefixtures("task_identity")
def test_local_noise_is_localdpmods(tmp_path: Path) -> None:
    """`local`: clipped to C, then N(0, (σC)²) — LocalDpMod's std √(2 ln(1.25/δ))·C/ε for
    the ε, δ of that σ; both measured on 200,000 values."""
    sigma, clip_norm = 0.7, 0.5
    big = {"a": np.zeros((400, 500), np.float32)}
    big["a"][0, 0] = 3.0  # norm 3 > C: clipped to 0.5
    delta = 1e-5
    eps = math.sqrt(2 * math.log(1.25 / delta)) / sigma
    np.random.seed(3)
    theirs = _through_mod(LocalDpMod(clip_norm, clip_norm, eps, delta),
                          {"a": np.zeros((400, 500))}, {"a": big["a"].astype(np.float64)}, {})
    site = SiteDP(dp.RoundDP("local", sigma, {"f0": clip_norm}), None, 40,
                  tmp_path / LEDGER_FILE, tmp_path / "key", ("abc", "dl_mri", 1))
    values, refused = site.release("f0", big, "float32")
    mine = values["delta.a"].astype(np.float64)
    assert refused is None
    for noised in (theirs["a"], mine):
        rest = noised.reshape(-1)[1:]
        assert abs(rest.std() / (sigma * clip_norm) - 1) < 0.01
        assert abs(noised[0, 0] - clip_norm) < 5 * sigma * clip_norm
    # the site's noise key makes a replayed round the same release, not a new one
    again, _ = site.release("f0", big, "float32")
    np.testing.assert_array_equal(again["delta.a"], values["delta.a"])


@pytest.mark.usefixtures("task_identity")
def test_server_clipping_and_mean_are_flowers_wrapper() -> None:
    """server-fixed without noise: Flower's DifferentialPrivacyServerSideFixedClipping over
    FedAvg (equal weights) and the engine's ServerDP give the same new weights."""
    rng = np.random.default_rng(2)
    current = {k: v for k, v in _floats(_update(rng)).items()}
    updates = [_floats(_update(rng, s)) for s in (0.01, 0.05, 0.2)]
    clip_norm = dp.update_norm(updates[1])
    wrapper = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 0.0, clip_norm, 3)
    wrapper.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    msg = _message(current, {})
    replies = [_reply(msg, {k: current[k] + u[k] for k in current}, 10) for u in updates]
    arrays, _ = wrapper.aggregate_train(1, replies)
    theirs = {k: arrays[k].numpy() for k in current}
    server = ServerDP(dp.DPConfig("server-fixed", clip_norm, 0.0), ["f0"], ["a", "b", "c"],
                      {}, Path("/nonexistent"))
    admitted = [server.admit(s, "f0", u, {})[0] for s, u in zip("abc", updates, strict=True)]
    assert all(dp.update_norm(u) <= clip_norm * (1 + 1e-6) for u in admitted)
    mean = server.aggregate("f0", 1, [(s, 1.0, u) for s, u in zip("abc", admitted,
                                                                   strict=True)], {}, set())
    for key in current:
        np.testing.assert_allclose(current[key] + mean[key], theirs[key], atol=1e-6)


def test_noise_on_the_aggregate_has_the_configured_std(tmp_path: Path) -> None:
    """Central modes: over 4000 rounds of the same three clipped updates, the released mean
    scatters around the true mean with std σC/m (Flower's compute_stdv), element by
    element; the count noise of client-adaptive with std σ_b."""
    rng = np.random.default_rng(4)
    updates = [_floats(_update(rng, 0.01)) for _ in range(3)]
    truth = fedavg.fedavg([(1.0, u) for u in updates])
    for mode, sigma in (("client-fixed", 0.8), ("server-fixed", 2.0)):
        clip_norm = 2.0
        server = ServerDP(dp.DPConfig(mode, clip_norm, sigma), ["f0"], ["a", "b", "c"], {},
                          tmp_path)
        server.open_key(fresh=True)
        draws = np.array([server.aggregate("f0", r, [(s, 1.0, u) for s, u in
                                                     zip("abc", updates, strict=True)],
                                           {}, set())["b"][:20] - truth["b"][:20]
                          for r in range(4000)])
        expected = compute_stdv(sigma, clip_norm, 3)
        assert expected == pytest.approx(sigma * clip_norm / 3)
        measured = draws.std(axis=0, ddof=1)
        assert np.all(np.abs(measured / expected - 1) < 0.06), measured / expected
        assert abs(draws.std() / expected - 1) < 0.015
        assert abs(draws.mean()) < 4 * expected / math.sqrt(draws.size)
        assert server.releases == 4000


def test_adaptive_noise_is_flowers_and_the_norm_follows_the_quantile(tmp_path: Path) -> None:
    for sigma, sites, count in ((0.5, 3, 1.0), (1.0, 100, None), (0.1, 4, 0.3)):
        theirs = compute_adaptive_noise_params(sigma, sites, count)
        assert dp.adaptive_noise(sigma, sites, count) == pytest.approx(theirs)
    with pytest.raises(ValueError, match="dp-count-stddev"):
        dp.adaptive_noise(1.0, 3, None)  # Flower's default m/20 is too small for 3 sites
    # Andrew et al.: with norms 1…5 and γ = 0.5 the clipping norm settles at the median
    norms = [1.0, 2.0, 3.0, 4.0, 5.0]
    server = ServerDP(dp.DPConfig("client-adaptive", 0.1, 0.0), ["f0"], list("abcde"), {},
                      tmp_path)
    server.open_key(fresh=True)
    seen = []
    for r in range(200):
        clip_norm = server.clip["f0"]
        batch = []
        for site, size in zip("abcde", norms, strict=True):
            update = {"w": np.array([size], np.float32)}
            sent, was = dp.clip_encoded(update, clip_norm, "float32")  # as a site does
            admitted, problem = server.admit(site, "f0", fedavg.decode(sent, "float32"),
                                             {"f0.dp_unclipped": int(not was)})
            assert problem is None
            batch.append((site, 1.0, admitted))
        server.aggregate("f0", r, batch, {}, set())
        seen.append(server.clip["f0"])
    assert min(seen[-50:]) > 2.0 and max(seen[-50:]) < 4.0


def test_flowers_message_api_adaptive_update_moves_the_other_way() -> None:
    """Why shared.dp has its own adaptive rule: Flower's wrapper feeds the *clipped*
    fraction into C·exp(−η(f − γ)), so with every update clipped C shrinks (README)."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    theirs = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, 3,
                                                           initial_clipping_norm=0.1)
    theirs._geometric_update(1.0)  # every update clipped
    assert theirs.clipping_norm < 0.1
    assert dp.adaptive_norm(0.1, 0.0, 0.5, 0.2) > 0.1  # ours: none within C, C grows


# --------------------------------------------------------------------------- the accountant


def _balle_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Independent: RDP of T Gaussian steps, T·α/(2σ²), converted as Balle et al. 2020
    (Opacus' rule), minimized over the same orders."""
    orders = np.array(dp.ORDERS, dtype=float)
    rdp = steps * orders / (2 * sigma ** 2)
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.nanmin(eps))


def _exact_epsilon(sigma: float, steps: int, delta: float) -> float:
    """The exact ε(δ) of T compositions of the Gaussian mechanism (one Gaussian with
    s = σ/√T): Balle & Wang 2018's δ(ε) = Φ(1/2s − εs) − e^ε Φ(−1/2s − εs), bisected."""
    from scipy.stats import norm

    s = sigma / math.sqrt(steps)

    def excess(eps: float) -> float:
        return norm.cdf(0.5 / s - eps * s) - math.exp(eps) * norm.cdf(-0.5 / s - eps * s) - delta

    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return hi


@pytest.mark.parametrize(("sigma", "steps", "delta"),
                         [(1.0, 16, 1 / 40), (0.7, 8, 1e-3), (3.0, 100, 1 / 116),
                          (0.3, 2, 1 / 29)])
def test_epsilon_is_opacus_rdp_accountant(sigma: float, steps: int, delta: float) -> None:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=1.0)
    theirs = accountant.get_epsilon(delta=delta, alphas=dp.ORDERS)
    mine = accounting.epsilon(sigma, steps, delta)
    assert mine == pytest.approx(theirs, rel=1e-12)
    assert mine == pytest.approx(_balle_epsilon(sigma, steps, delta), rel=1e-9)
    exact = _exact_epsilon(sigma, steps, delta)
    assert exact <= mine <= 1.5 * exact  # RDP bounds the exact curve, and not loosely
    assert accounting.epsilon(0.0, steps, delta) is None
    assert accounting.epsilon(sigma, 0, delta) == 0.0


# --------------------------------------------------------------------------- the engine


class Capture(InProcessTransport):
    """In-process transport that keeps every train reply."""

    def __init__(self, roots: list[Path]) -> None:
        super().__init__(roots)
        self.train: list[tuple[int, str, dict]] = []

    def ask(self, action: str, query: Any, sites: Any) -> Any:
        replies = super().ask(action, query, sites)
        if action.startswith("train."):
            self.train += [(int(query["round"]), s, r.payload) for s, r in replies.items()]
        return replies


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dp")
    simulate_cohort(root, n_sites=3, n_patients=40, seed=12, image_size=24)
    return root


def _sites(cohort: Path, tmp: Path, require: dict[str, float] | None = None) -> Path:
    """A fresh copy of the cohort (site ledgers start empty); `require`: site → max_epsilon."""
    root = tmp / "sites"
    shutil.copytree(cohort, root)
    for site, max_epsilon in (require or {}).items():
        path = root / site / "site.yaml"
        config = yaml.safe_load(path.read_text())
        config["privacy"]["require_dp"] = {"max_epsilon": max_epsilon}
        path.write_text(yaml.safe_dump(config))
    return root


def _train(sites: Path, out: Path, names: list[str], **extra: Any) -> tuple[dict, Capture]:
    transport = Capture([sites / n for n in names])
    (outcome,), _, _ = engine_run(sites, out, names, base=TINY, transport=transport, **extra)
    return {"result": outcome.result, "weights": outcome.weights}, transport


def _sent_norms(transport: Capture) -> list[float]:
    norms = []
    for _, _, payload in transport.train:
        for unit in ("f0", "f1"):
            raw = nest(payload, f"{unit}.delta")
            if raw:
                norms.append(dp.update_norm(fedavg.decode(raw, "float32")))
    return norms


def _patients(site_dir: Path) -> int:
    return len(open_session(str(site_dir), "her2-positive", ("clinical", "mri")).labels())


SITES = ["site-1", "site-2", "site-3"]


def test_clipping_bounds_every_update_and_epsilon_is_the_accountants(
        cohort: Path, tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    sites = _sites(cohort, tmp_path)
    _, plain = _train(sites, tmp_path / "plain", SITES)
    plain_norms = _sent_norms(plain)
    clip_norm = float(np.median(plain_norms))
    run, clipped = _train(sites, tmp_path / "dp", SITES, dp="client-fixed",
                          **{"dp-clipping-norm": clip_norm, "dp-noise-multiplier": 0.5})
    norms = _sent_norms(clipped)
    assert len(norms) == len(plain_norms) == len(SITES) * ROUNDS * UNITS
    assert max(plain_norms) > clip_norm  # clipping had work to do
    assert max(norms) <= clip_norm  # … and bounds every update that left a site
    assert all(f"{u}.loss" not in p for _, _, p in clipped.train for u in ("f0", "f1"))
    result = run["result"]["dp"]
    n = {s: _patients(sites / s) for s in SITES}
    for site in SITES:
        assert result["steps"][site] == ROUNDS * UNITS and result["rounds"][site] == ROUNDS
        assert result["delta"][site] == 1 / n[site]
        accountant = RDPAccountant()
        for _ in range(ROUNDS * UNITS):
            accountant.step(noise_multiplier=0.5, sample_rate=1.0)
        assert result["epsilon"][site] == pytest.approx(
            accountant.get_epsilon(delta=1 / n[site], alphas=dp.ORDERS), rel=1e-12)
        # the site's own account of the same releases
        ledger = SiteDP(None, None, n[site], sites / site / "audit" / LEDGER_FILE,
                        tmp_path, ("", "", 0))
        assert ledger.epsilon() == pytest.approx(result["epsilon"][site], rel=1e-12)
    assert result["delta"]["overall"] == 1 / sum(n.values())
    assert result["epsilon"]["overall"] == pytest.approx(
        accounting.epsilon(0.5, ROUNDS * UNITS, 1 / sum(n.values())), rel=1e-12)
    for entry in run["result"]["rounds"]:
        for unit in ("f0", "f1"):
            info = entry["dp"][unit]
            assert info["sites"] == 3
            assert info["noise_std"] == pytest.approx(compute_stdv(0.5, clip_norm, 3))
    assert not (tmp_path / "dp" / "training" / "dl_mri" / ServerDP.KEY).exists()


def test_a_site_that_requires_dp_refuses_plain_and_over_budget_updates(
        cohort: Path, tmp_path: Path) -> None:
    sites = _sites(cohort, tmp_path, {"site-1": 1000.0})
    run, _ = _train(sites, tmp_path / "plain", SITES)
    for entry in run["result"]["rounds"]:
        refused = entry["sites"]["site-1"]["refused"]
        assert refused == dict.fromkeys(
            ("f0", "f1"), "policy requires DP with ε ≤ 1000; this update is not noised")
        assert all(u["sites"] == 2 for u in entry["units"].values())  # the others train
    audit = (sites / "site-1" / "audit" / "egress.jsonl").read_text()
    assert "this update is not noised" in audit

    # a budget for exactly three releases at σ = 1: the fourth is refused, and said why
    n = _patients(sites / "site-1")
    budget = (accounting.epsilon(1.0, 3, 1 / n) + accounting.epsilon(1.0, 4, 1 / n)) / 2
    sites = _sites(cohort, tmp_path / "b", {"site-1": budget})
    run, _ = _train(sites, tmp_path / "dp", SITES, dp="client-fixed",
                    **{"dp-noise-multiplier": 1.0})
    rounds = run["result"]["rounds"]
    assert "refused" not in rounds[0]["sites"]["site-1"]
    last = rounds[1]["sites"]["site-1"]
    assert set(last.get("refused", {})) == {"f1"}
    assert last["refused"]["f1"].startswith(
        f"over budget: ε would be {accounting.epsilon(1.0, 4, 1 / n):.3g} (policy: ε ≤ {budget:g}")
    assert run["result"]["dp"]["steps"]["site-1"] == 3
    ledger = SiteDP(None, None, n, sites / "site-1" / "audit" / LEDGER_FILE, tmp_path,
                    ("", "", 0))
    assert ledger.epsilon() == pytest.approx(accounting.epsilon(1.0, 3, 1 / n))
    assert ledger.epsilon() <= budget
    # a round that asks no noise (σ = 0) or server-fixed gets the site's own clipping to its
    # C and its own noise σC (σ, C: its require_dp's), never the raw update
    update = {"a": np.zeros((300, 300), np.float32), "n": np.array(3, np.int64)}
    update["a"][0, 0] = 4.0
    for mode, sigma in (("client-fixed", 0.0), ("server-fixed", 50.0)):
        site = SiteDP(dp.RoundDP(mode, sigma, {"f0": 1e9}), DPRequirement(10.0, 0.8, 0.5), n,
                      tmp_path / f"{mode}.json", tmp_path, ("", "", 1))
        assert site.refusal("f0") is None
        values, refused = site.release("f0", update, "float32")
        assert refused is None and values[dp.SITE_NOISED] == 1
        sent = values["delta.a"].astype(np.float64)
        sent[0, 0] -= 0.5  # clipped to C = 0.5
        assert np.std(sent) == pytest.approx(0.8 * 0.5, rel=0.02)
        assert site.epsilon() == pytest.approx(accounting.epsilon(0.8, 1, 1 / n))


def test_dp_that_clips_nothing_and_adds_no_noise_is_plain_fedavg(cohort: Path,
                                                                 tmp_path: Path) -> None:
    """One site (equal weights = patient weights), C far above any update, σ = 0: the same
    weights to the bit as without DP, whose queries carry no DP field."""
    sites = _sites(cohort, tmp_path)
    plain, transport = _train(sites, tmp_path / "plain", ["site-1"])
    inert, _ = _train(sites, tmp_path / "inert", ["site-1"], dp="server-fixed",
                      **{"dp-clipping-norm": 1e9, "dp-noise-multiplier": 0.0})
    for unit, arrays in plain["weights"].items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(inert["weights"][unit][key], value, err_msg=key)
    assert "dp" not in plain["result"]
    assert not any(k.startswith("dp") for _, _, p in transport.train for k in p)
