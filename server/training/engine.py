"""The federated training engine of the CNN stages (`dsfr`, `deep`), one for all models.

A *plan* is one model's resolved training configuration (run config, per-model recipe
defaults, sizes resolved from the sites' devices: server/training/plan.py); the setup round
picks the training sites (server/training/setup.py); rounds go to the sites or to the
pooled reference (server/training/backends.py). A *unit* is one network trained
federated: a CV fold `f<k>` for DL-MRI/DL-US (so training-site probabilities are
out-of-fold), `all` for the DSFR U-Net. All units of a model travel in one message per
site and round.

Round r (1 … rounds): the server sends `train.<model>` with the global weights w_{r−1} of
every unit (in the wire dtype); each site validates them on its held-out rows, trains
`local-epochs` epochs (FedProx: with the proximal term) and returns its update; the server
adds the patient-weighted mean update (shared/fedavg.py) to its float32 weights (FedBN:
normalization layers are not sent and stay at the sites) and checkpoints. After the last
round one `evaluate.<model>` message validates w_R. The best round by pooled federated
validation (deep: BCE loss; DSFR: Dice) is kept in `best.npz`; the weights used
afterwards are the final ones (`select = final`, default: choosing the round on the
held-out folds would leak into the out-of-fold probabilities) or the best (`select = best`).

Checkpoints (`OUT/training/<name>/`): after every round `round-<r>.npz` (weights of every
unit) and `checkpoint.json` (round, history, best round, strategy state, the resolved
plan, the sites and their data hashes), each replaced atomically. With `-c resume=true`
and the same out-dir, a run whose plan, run config and sites are unchanged continues after
the last checkpointed round and — every random draw being seeded per (site, unit, round) —
ends with the same weights as an uninterrupted run.

`mode = pooled` trains the same units on all training sites' data at once, in a process of
its own running the site code (simulation/pooled_site.py, which reads `sites-dir`:
simulation only), the centralized reference; `both` does the two
and compares them. Either way the weights are then sent to the sites for scoring, so AUCs
are computed the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from neural.networks import network_of
from server.core.progress import report_round
from server.core.results import plain as _plain
from server.core.transport import (
    Reply,
    StageError,
    StudyError,
    Transport,
    answered,
)
from server.training.backends import FederatedBackend, PooledBackend
from server.training.dp import ServerDP, dp_postprocess, dp_settings
from server.training.plan import Plan
from server.training.setup import Setup, server_pretrained
from shared import fedavg, roc, schema
from shared.config import StudyConfig
from shared.dp import DPConfig
from shared.schema import nest
from shared.training_params import IMAGES

log = logging.getLogger("feddlr")


# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """`OUT/training/<name>/`: round-<r>.npz + checkpoint.json, best.npz, final.npz."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _write_npz(self, name: str, weights: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **{f"{unit}::{key}": value for unit, arrays in weights.items()
                         for key, value in arrays.items()})
        os.replace(tmp, path)
        return path

    @staticmethod
    def read_npz(path: Path) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        with np.load(path, allow_pickle=False) as saved:
            for name in saved.files:
                unit, _, key = name.partition("::")
                out.setdefault(unit, {})[key] = saved[name]
        return out

    def save_round(self, round_no: int, weights: Mapping[str, Mapping[str, np.ndarray]],
                   state: dict[str, Any],
                   server_state: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        """Weights of every unit after `round_no`, the server optimizers' state (moments,
        step count) and the engine's record, each replaced atomically."""
        self._write_npz(f"round-{round_no}.npz", weights)
        self._write_npz(f"server-state-{round_no}.npz", server_state or {})
        record = dict(state, round=round_no, weights=f"round-{round_no}.npz",
                      server_state=f"server-state-{round_no}.npz",
                      written=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        path = self.folder / "checkpoint.json"
        tmp = path.with_name(f".checkpoint.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_plain(record), indent=1, allow_nan=False) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
        for pattern in ("round-*.npz", "server-state-*.npz"):
            for old in self.folder.glob(pattern):
                if not old.name.endswith(f"-{round_no}.npz"):
                    old.unlink(missing_ok=True)

    def save(self, name: str, weights: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
        return self._write_npz(name, weights)

    def load(self, fingerprint: str) -> tuple[dict[str, Any] | None, str]:
        """(state, weights) of the last round when it was written for this fingerprint;
        else (None, why)."""
        path = self.folder / "checkpoint.json"
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, "no training checkpoint yet"
        except (OSError, ValueError) as err:
            return None, f"training checkpoint unreadable ({err})"
        if state.get("fingerprint") != fingerprint:
            return None, ("the plan, run config or sites changed since the training "
                          "checkpoint")
        try:
            state["weights_arrays"] = self.read_npz(self.folder / state["weights"])
            state["server_arrays"] = self.read_npz(self.folder / state["server_state"])
        except (OSError, KeyError, ValueError) as err:
            return None, f"checkpoint weights unreadable ({err})"
        return state, "ok"


# --------------------------------------------------------------------------- the engine


@dataclass
class Outcome:
    """A finished training: the weights to use and everything to report."""

    name: str
    plan: Plan
    weights: dict[str, dict[str, np.ndarray]]
    round: int
    result: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains one model's units federated (or pooled) with checkpoints; see the module."""

    def __init__(self, backend: FederatedBackend | PooledBackend, plan: Plan, name: str,
                 sites: list[str], config: StudyConfig, out: Path, stage: str,
                 identity: Mapping[str, Any], pos_weight: float,
                 sizes: Mapping[str, int] | None = None,
                 dp_config: DPConfig | None = None) -> None:
        self.backend, self.plan, self.name, self.stage = backend, plan, name, stage
        self.sizes = dict(sizes or {})  # patients per site (setup): caps an update's weight
        self.sites = list(sites)
        self.config, self.out = config, out
        self.pos_weight = pos_weight
        self.checkpoints = Checkpoints(out / "training" / name)
        from server.core.checkpoint import fingerprint as study_fingerprint

        record = {"study": study_fingerprint(config), "plan": asdict(plan), "name": name,
                  "mode": backend.kind, "identity": identity, "sites": self.sites}
        if dp_config is not None:
            record["dp"] = dp_config.as_dict()
        blob = json.dumps(_plain(record), sort_keys=True)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        self.train_id = self.fingerprint[:16]
        self.dp = (None if dp_config is None else
                   ServerDP(dp_config, plan.units, self.sites, self.sizes, self.checkpoints.folder))
        self.failed: dict[str, str] = {}  # site -> when and why it fell out of training

    # -- helpers -----------------------------------------------------------------------
    def _base(self, round_no: int, lr: float, epochs: int) -> dict[str, Any]:
        pooled = self.backend.kind == "pooled"
        query = {"task": self.config.task, "needs": IMAGES[self.plan.model],
                 **self.plan.params(pooled=pooled), "lr": lr, "epochs": epochs,
                 "round": round_no, "units": self.plan.units, "train_id": self.train_id,
                 "pos_weight": self.pos_weight}
        return query

    def weights_query(self, weights: Mapping[str, Mapping[str, np.ndarray]],
                      keys: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for unit in self.plan.units:
            encoded = fedavg.encode({k: weights[unit][k] for k in keys}, self.plan.wire)
            out.update({f"w.{unit}.{k}": v for k, v in encoded.items()})
        return out

    def run(self) -> Outcome:
        from neural import networks

        plan = self.plan
        net = network_of(plan).build(plan.seed)
        pretrained: dict[str, Any] = {}
        if plan.pretrained:
            from neural import pretrained as files

            target = server_pretrained(plan.pretrained)
            try:
                notes = files.load_into(plan.model, net, target)
            except ValueError as err:
                raise StageError(str(err)) from None
            pretrained = {"path": plan.pretrained, "sha256": files.file_sha256(target),
                          "notes": notes}
        init = {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
        self.checkpoints.save("init.npz", {u: init for u in plan.units})
        local = networks.norm_keys(net) if plan.fedbn and self.backend.kind == "federated" \
            else set()
        keys = [k for k in init if k not in local]
        buffers = set(init) - {k for k, _ in net.named_parameters()}  # BatchNorm statistics
        weights = {u: {k: v.copy() for k, v in init.items()} for u in plan.units}
        optimizers = {u: plan.server_optimizer() for u in plan.units}
        history: list[dict[str, Any]] = []
        validation: dict[int, dict[str, Any]] = {}
        best: dict[str, Any] = {"round": None, "value": None}
        start, resumed = 1, None
        if self.config.resume:
            state, why = self.checkpoints.load(self.fingerprint)
            if state is not None:
                weights = state.pop("weights_arrays")
                for unit, arrays in state.pop("server_arrays").items():
                    optimizers[unit].load_state_dict(arrays)
                start = int(state["round"]) + 1
                history = state["history"]
                validation = {int(k): v for k, v in state["validation"].items()}
                best = state["best"]
                if self.dp is not None:
                    self.dp.load(state.get("dp") or {})
                resumed = {"from_round": int(state["round"]), "written": state.get("written")}
                log.info("[%s] %s: resuming after round %d from %s", self.stage, self.name,
                         state["round"], self.checkpoints.folder)
            else:
                resumed = {"from_round": None, "reason": why}
                log.info("[%s] %s: starting afresh (%s)", self.stage, self.name, why)
        sites = list(self.sites)
        started = time.perf_counter()
        if self.dp is not None:
            self.dp.open_key(fresh=resumed is None or resumed.get("from_round") is None)
        for r in range(start, plan.rounds + 1):
            t0 = time.perf_counter()
            query = {**self._base(r, plan.lr_at(r), plan.local_epochs),
                     **self.weights_query(weights, keys)}
            if self.dp is not None:
                query.update(self.dp.query())
            down = fedavg.wire_bytes({k: v for k, v in query.items()
                                      if isinstance(v, np.ndarray)})
            replies = self.backend.ask(f"train.{plan.model}", query, sites)
            report_round(f"{self.stage}:{self.name}", r, plan.rounds, replies)
            sites = self._survivors(replies, sites, f"round {r}")
            self._validation(validation, r - 1, replies, sites, weights, best)
            entry = {"round": r, "lr": plan.lr_at(r), "sites": {}, "units": {}}
            for unit in plan.units:
                updates = self._collect(unit, replies, sites, entry, down, weights[unit], keys)
                if self.dp is not None:
                    mean = self.dp.aggregate(unit, r, updates, entry, local)
                else:
                    mean = fedavg.fedavg([(n, d) for _, n, d in updates],
                                         skip=local) if updates else None
                if mean is not None:
                    weights[unit] = optimizers[unit].step(weights[unit], mean, plain=buffers)
                    if self.dp is not None:
                        weights[unit] = dp_postprocess(weights[unit])
                entry["units"][unit] = {"sites": len(updates)}
            for site in sites:
                payload = replies[site].payload
                up = fedavg.wire_bytes({k: v for k, v in payload.items()
                                        if isinstance(v, np.ndarray) and ".delta." in k})
                info = entry["sites"].setdefault(site, {"wire": {"down": down}})
                info["wire"]["up"] = up
                info["seconds"] = float(payload.get("device.seconds", float("nan")))
                info["device"] = payload.get("device.type")
            entry["seconds"] = time.perf_counter() - t0
            history.append(entry)
            self.checkpoints.save_round(r, weights, {
                "format": 1, "fingerprint": self.fingerprint, "name": self.name,
                "model": plan.model, "mode": self.backend.kind,
                "plan": asdict(plan), "sites": sites, "history": history,
                "validation": validation, "best": best, "train_id": self.train_id,
                "strategy": {"name": plan.strategy, "proximal_mu": plan.mu,
                             "fedbn": bool(local),
                             "server_optimizer": repr(optimizers[plan.units[0]])},
                **({} if self.dp is None else {"dp": self.dp.state()})},
                {u: o.state_dict() for u, o in optimizers.items()})
        # validation of the final weights
        query = {**self._base(plan.rounds + 1, 0.0, 0), **self.weights_query(weights, keys)}
        replies = self.backend.ask(f"evaluate.{plan.model}", query, sites)
        report_round(f"{self.stage}:{self.name}:evaluate", 1, 1, replies)
        sites = self._survivors(replies, sites, "final evaluation")
        self._validation(validation, plan.rounds, replies, sites, weights, best)
        self.checkpoints.save("final.npz", weights)
        chosen_round = plan.rounds
        chosen = weights
        if plan.select == "best" and best["round"] is not None:
            chosen_round = int(best["round"])
            chosen = Checkpoints.read_npz(self.checkpoints.folder / "best.npz")
        result = {
            "name": self.name, "model": plan.model, "mode": self.backend.kind,
            "plan": asdict(plan), "network": {
                "parameters": int(sum(v.size for v in init.values()
                                      if np.issubdtype(v.dtype, np.floating))),
                "input": [1, *([plan.size] * (3 if plan.model == "dl_mri" else 2))],
                "fedbn_local_keys": len(local)},
            "sites": sites, "failed_sites": dict(self.failed),
            "units": plan.units, "rounds": history,
            "validation": {str(k): validation[k] for k in sorted(validation)},
            "best_round": best, "select": plan.select, "chosen_round": chosen_round,
            "seconds": time.perf_counter() - started,
            "resume": resumed,
            "checkpoint": str(self.checkpoints.folder),
            "wire": (wire_summary(history, plan.wire) if self.backend.kind == "federated"
                     else {"note": "pooled: trained in one process, nothing sent"}),
            "pos_weight": self.pos_weight,
            "train_id": self.train_id,
            "pretrained": pretrained or None,
        }
        if self.dp is not None:
            result["dp"] = self.dp.summary()
            self.dp.close_key()
        return Outcome(self.name, plan, chosen, chosen_round, result)

    def _collect(self, unit: str, replies: Mapping[str, Reply], sites: list[str],
                 entry: dict[str, Any], down: int, weights: Mapping[str, np.ndarray],
                 keys: list[str]) -> list[tuple[str, float, dict[str, np.ndarray]]]:
        """The round's usable updates of `unit`, as (site, patients, decoded update), in
        site order; a site's refusal, or why its update is left out, goes in `entry`."""
        updates = []
        for site in sites:
            payload = replies[site].payload
            info = entry["sites"].setdefault(site, {"wire": {"down": down}})
            if f"{unit}.n" not in payload:
                info.setdefault("refused", {})[unit] = str(
                    payload.get(f"refused.{unit}", "no update"))
                continue
            if self.dp is not None:
                self.dp.sent(site)
            delta = fedavg.decode(nest(payload, f"{unit}.delta"), self.plan.wire, like=weights)
            problem = _bad_update(delta, weights, keys)
            claimed, size = float(payload[f"{unit}.n"]), self.sizes.get(site)
            if not problem and (claimed <= 0 or (size is not None and claimed > size)):
                problem = f"it claims {claimed:g} patients (the site has {size})"
            if not problem and self.dp is not None:
                delta, problem = self.dp.admit(site, unit, delta, payload)
            if problem:
                log.warning("[%s] %s: %s's update of %s left out: %s", self.stage,
                            self.name, site, unit, problem)
                info.setdefault("refused", {})[unit] = f"left out: {problem}"
                continue
            updates.append((site, float(payload[f"{unit}.n"]), delta))
            if f"{unit}.loss" in payload:  # under DP the loss stays at the site
                info.setdefault("loss", {})[unit] = float(payload[f"{unit}.loss"])
            info.setdefault("n", {})[unit] = int(payload[f"{unit}.n"])
        return updates

    def _survivors(self, replies: Mapping[str, Reply], sites: list[str], when: str) -> list[str]:
        bad = {s: r for s, r in replies.items() if not r.ok}
        for site, reply in bad.items():
            log.warning("[%s] %s: %s %s at %s (%s); training goes on without it",
                        self.stage, self.name, site, reply.status, when, reply.reason)
            # kept for results.json: the stage is not `ok` with a site fallen out of it
            self.failed.setdefault(site, f"{reply.status} at {when}: {reply.reason}")
        left = answered(replies, sites, min_replies=self.config.min_replies,
                        what=f"{self.name} {when}")
        dropped = [s for s, r in bad.items() if r.status == schema.STATUS_DROPPED]
        if dropped and len(left) < self.config.min_sites:
            raise StudyError(f"{self.stage}: only {len(left)} site(s) left after "
                             f"{', '.join(dropped)} dropped, min-sites is "
                             f"{self.config.min_sites}")
        return left

    def _validation(self, validation: dict[int, dict[str, Any]], weights_round: int,
                    replies: Mapping[str, Reply], sites: list[str],
                    weights: Mapping[str, Mapping[str, np.ndarray]],
                    best: dict[str, Any]) -> None:
        summary = summarize_validation(self.plan.model, {s: replies[s].payload for s in sites})
        validation[weights_round] = summary
        value = summary["pooled"].get(summary["metric"])
        if weights_round < 1 or value is None:
            return
        better = (best["value"] is None or
                  (value > best["value"] if summary["metric"] == "dice"
                   else value < best["value"]))
        if better:
            best.update(round=weights_round, value=value, metric=summary["metric"])
            self.checkpoints.save("best.npz", weights)


def _bad_update(delta: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray],
                keys: list[str]) -> str | None:
    """Why a site's update cannot be averaged (other keys or shapes, non-finite values)."""
    if set(delta) != set(keys):
        return "its weight keys differ from the model's"
    for key in keys:
        value = np.asarray(delta[key])
        if value.shape != np.shape(weights[key]):
            return f"{key} has shape {value.shape}"
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            return f"{key} is not finite (training diverged?)"
    return None


def summarize_validation(model: str, payloads: Mapping[str, Mapping[str, Any]]) -> dict:
    """Per site and pooled validation of one set of weights: deep models BCE loss and AUC
    (from coarsened histograms, with its bound); DSFR focal loss and Dice."""
    sites: dict[str, Any] = {}
    if model == "dsfr":
        sums = {"loss_sum": 0.0, "n_slices": 0, "dice_sum": 0.0, "n": 0}
        for site, p in payloads.items():
            if "val.n" not in p:
                sites[site] = {"refused": str(p.get("refused.val", "no validation rows"))}
                continue
            for key in sums:
                sums[key] += float(p[f"val.{key}"])
            sites[site] = {"dice": float(p["val.dice_sum"]) / max(float(p["val.n"]), 1),
                           "loss": float(p["val.loss_sum"]) / max(float(p["val.n_slices"]), 1),
                           "n": int(p["val.n"])}
        pooled = ({"dice": sums["dice_sum"] / sums["n"],
                   "loss": sums["loss_sum"] / max(sums["n_slices"], 1), "n": int(sums["n"])}
                  if sums["n"] else {"dice": None, "loss": None, "n": 0})
        return {"metric": "dice", "pooled": pooled, "sites": sites}
    loss_sum, n = 0.0, 0
    for site, p in payloads.items():
        if "val.n" not in p:
            sites[site] = {"refused": str(p.get("refused.val", "no validation rows"))}
            continue
        loss_sum += float(p["val.loss_sum"])
        n += int(p["val.n"])
        sites[site] = {"loss": float(p["val.loss_sum"]) / max(int(p["val.n"]), 1),
                       "n": int(p["val.n"]), **auc_of({site: p})}
    pooled = {"loss": loss_sum / n if n else None, "n": n, **auc_of(payloads)}
    return {"metric": "loss", "pooled": pooled, "sites": sites}


def auc_of(payloads: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """AUC from the label-stratified coarsened histograms of the sites that sent both."""
    from shared import refine  # kept inside: this function is the whole of the edit here

    cells: dict[int, list] = {0: [], 1: []}
    missing = []
    for site, p in payloads.items():
        if not all(f"hist{g}.count" in p for g in (0, 1)):
            missing.append(site)
            continue
        for g in (0, 1):
            cells[g].append((p[f"hist{g}.first"], p[f"hist{g}.last"], p[f"hist{g}.count"]))
    if not cells[0] or not cells[1]:
        return {"auc": None, "auc_sites_missing": sorted(missing)}
    result = roc.combine_auc(cells[0], cells[1])
    # exact on the raw scores only when no bin holds both labels (these per-round scores
    # are not kept at the sites, so no refinement round can split the bins); the bound
    # holds for the raw scores in any case
    return {"auc": _num(result.auc), "auc_bound": [_num(result.lower), _num(result.upper)],
            "auc_exact": refine.no_mixed_bins(cells[0], cells[1]),
            "auc_sites_missing": sorted(missing)}


def site_failures(block: Any, parent: str = "") -> dict[str, str]:
    """Every site that fell out of a CNN stage's work, with when and why: a training's
    `failed_sites` (a round or the final evaluation it did not answer `ok`), a scoring's
    `auc.failed`, the DSFR features' `failed_sites`, wherever they sit in the result."""
    found: dict[str, str] = {}
    if isinstance(block, dict):
        for key, value in block.items():
            if (key == "failed_sites" or (key == "failed" and parent == "auc")) \
                    and isinstance(value, dict):
                for site, why in value.items():
                    found.setdefault(str(site), str(why))
            else:
                for site, why in site_failures(value, str(key)).items():
                    found.setdefault(site, why)
    elif isinstance(block, list):
        for value in block:
            for site, why in site_failures(value, parent).items():
                found.setdefault(site, why)
    return found


def wire_summary(history: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
    """Bytes of weights per round per site, down (global weights) and up (update)."""
    per_site: dict[str, dict[str, list[int]]] = {}
    for entry in history:
        for site, info in entry["sites"].items():
            wire = info.get("wire", {})
            row = per_site.setdefault(site, {"down": [], "up": []})
            row["down"].append(int(wire.get("down", 0)))
            row["up"].append(int(wire.get("up", 0)))
    return {"dtype": dtype, "per_round": per_site,
            "mean_down": _mean([b for s in per_site.values() for b in s["down"]]),
            "mean_up": _mean([b for s in per_site.values() for b in s["up"]])}


def _mean(values: list[int]) -> float | None:
    return float(np.mean(values)) if values else None


def _num(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def train_model(transport: Transport, config: StudyConfig, plan: Plan, setup_: Setup,
                stage: str) -> list[Outcome]:
    """Train one model as `plan.mode` says: federated, pooled, or both (federated first);
    returns one Outcome per training (the federated one first)."""
    out = Path(config.out_dir)
    outcomes = []
    if plan.mode in ("federated", "both"):
        resolved = plan.resolved(setup_.gpu)
        trainer = Trainer(FederatedBackend(transport), resolved, plan.model, setup_.train,
                          config, out, stage, setup_.identity, setup_.pos_weight,
                          setup_.sizes, dp_settings(config))
        outcome = trainer.run()
        outcome.result["devices"] = setup_.devices
        outcomes.append(outcome)
    if plan.mode in ("pooled", "both"):
        name = plan.model if plan.mode == "pooled" else f"{plan.model}_pooled"
        with PooledBackend(config, setup_.train, setup_.identity,
                           out / "training" / name / "state", plan.device) as backend:
            # nothing travels, one "site"; with local-steps it takes the steps of all the
            # training sites together, so both see the same number of batches per round
            gpu = backend.device == "cuda"
            resolved = replace(plan.resolved(gpu if plan.mode == "pooled" else setup_.gpu),
                               wire="float32", fedbn=False,
                               local_steps=plan.local_steps * max(len(setup_.train), 1))
            counts = backend.prepare(resolved)
            weight = counts["n0"] / counts["n1"] if counts["n0"] and counts["n1"] else 1.0
            trainer = Trainer(backend, resolved, name, [PooledBackend.site], config, out,
                              stage, setup_.identity, weight)
            outcome = trainer.run()
        outcome.result["devices"] = {"pooled": {"type": backend.device}}
        outcome.result["pooled_patients"] = counts["patients"]
        outcomes.append(outcome)
    return outcomes


def comparison(federated: dict[str, Any], pooled: dict[str, Any], auc_federated: Any,
               auc_pooled: Any) -> dict[str, Any]:
    """Federated vs pooled: out-of-fold AUC difference and wall-time ratios — of the whole
    training, and of the median round after the first (the first holds each process's
    warm-up)."""
    def steady(result: dict[str, Any]) -> float:
        seconds = [e["seconds"] for e in result["rounds"]]
        return float(np.median(seconds[1:] if len(seconds) > 1 else seconds))

    fs, ps = federated["seconds"], pooled["seconds"]
    fr, pr = steady(federated), steady(pooled)
    return {"auc_federated": auc_federated, "auc_pooled": auc_pooled,
            "delta_auc": (None if auc_federated is None or auc_pooled is None
                          else auc_federated - auc_pooled),
            "seconds_federated": fs, "seconds_pooled": ps,
            "wall_time_ratio": fs / max(ps, 1e-9),
            "round_seconds_federated": fr, "round_seconds_pooled": pr,
            "round_time_ratio": fr / max(pr, 1e-9)}


def weights_payload(outcome: Outcome, fedbn_local: bool) -> dict[str, np.ndarray]:
    """The chosen weights of every unit, as a query's `w.<unit>.<key>` arrays."""
    from neural import networks

    net = network_of(outcome.plan).build(outcome.plan.seed)
    local = networks.norm_keys(net) if fedbn_local else set()
    out = {}
    for unit, arrays in outcome.weights.items():
        encoded = fedavg.encode({k: v for k, v in arrays.items() if k not in local},
                                outcome.plan.wire)
        out.update({f"w.{unit}.{k}": v for k, v in encoded.items()})
    return out
