"""The pooled reference of a simulation as its own process: one "site" named `pooled` that
holds every training site's data, trained by the same site code
(client.stages.training_round) as the federated sites, so the comparison measures
federation and nothing else.

Only a simulation can run it: it reads the site folders under `sites-dir` directly, which
a coordinator of a real consortium cannot. The ServerApp starts it
(`python -m simulation.pooled_site`, server.training.backends.PooledBackend) and talks to it with
payload frames on its stdin/stdout (wire.write_frame / read_frame), so the server imports no
site code. Nothing leaves the machine, so there is no egress guard and no coarsening.

1. hello: `sites_dir`, `task`, `sites`, `identity.<site>` (the handshake's data hashes),
   `state_dir`, `device` → `device` (cpu | cuda), or `failed` with the reason.
2. prepare: the round parameters (TrainParams fields) → `patients`, `n0`, `n1`: the training
   sites' prepared data, each with its own folds, concatenated in site order.
3. every further frame: `action` (`train.<model>` | `evaluate.<model>`) plus the query →
   the reply payload as a site would send it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, BinaryIO

from shared import schema
from shared.schema import Payload
from shared.training_params import IMAGES, TrainParams
from wire import read_frame, write_frame

SITE = "pooled"


class PooledError(Exception):
    """The pooled data cannot be read (the message says which site and why)."""


def site_folders(root: Path, sites: list[str]) -> dict[str, Path]:
    """The folder under `root` of each site id."""
    from client.site.folder import SiteError, read_site_config

    if not root.is_dir():
        raise PooledError(f"mode=pooled reads the site folders from sites-dir ({root}), "
                          "which this server cannot see (pooled training is for simulations)")
    folders = {}
    for folder in sorted(p for p in root.iterdir() if (p / "site.yaml").is_file()):
        try:
            folders[read_site_config(folder).site_id] = folder
        except SiteError:
            continue
    missing = [s for s in sites if s not in folders]
    if missing:
        raise PooledError(f"mode=pooled: no folder under {root} for site(s) {missing}")
    return folders


def pooled_data(hello: Payload, p: TrainParams) -> Any:  # client.local.training_data.ModelData
    """The training sites' prepared data with each site's own folds, concatenated; refused
    when a folder holds other data than the site that answered the handshake."""
    from client.local import training_data
    from client.site.session import open_session
    from client.stages.handshake import data_hash

    sites = [str(s) for s in hello["sites"]]
    folders = site_folders(Path(str(hello["sites_dir"])), sites)
    other = [s for s in sites if hello.get(f"identity.{s}")
             and data_hash(folders[s]) != hello[f"identity.{s}"]]
    if other:
        raise PooledError(f"mode=pooled: the folders of {other} hold other data than the "
                          "sites that answered (data hashes differ)")
    needs = tuple(sorted({"clinical", IMAGES[p.model]}))
    parts = [training_data.site_data(open_session(str(folders[s]), str(hello["task"]), needs), p)
             for s in sites]
    return training_data.concat(parts)


def answer(data: Any, query: Payload, state_dir: Path) -> Payload:
    """One training or evaluation round on the pooled data, as a site's reply payload."""
    from client.stages import training_round

    action = str(query.pop("action"))
    p = TrainParams.from_query(query)
    stats = training_round.run_round(data, p, query, state_dir, SITE,
                                     train=action.startswith("train."), min_cell=1)
    payload: Payload = {"status": schema.STATUS_OK}
    for stat in stats:
        payload.update({f"{stat.name}.{k}": v for k, v in stat.values.items()})
    return payload


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    import torch

    from client.local.local_training import pick_device

    hello = read_frame(stdin)
    if hello is None:
        return 0
    try:
        device = pick_device(str(hello.get("device", "auto")))
    except RuntimeError as err:
        write_frame(stdout, _failed(f"the pooled reference trains here: {err}"))
        return 1
    if device.type == "cpu":
        torch.set_num_threads(1)  # as each simulated site (Flower client resources num-cpus=1)
    write_frame(stdout, {"status": schema.STATUS_OK, "device": device.type})
    prepare = read_frame(stdin)
    if prepare is None:
        return 0
    try:
        data = pooled_data(hello, TrainParams.from_query(prepare))
    except (PooledError, ValueError) as err:
        write_frame(stdout, _failed(str(err)))
        return 1
    write_frame(stdout, {"status": schema.STATUS_OK, "patients": len(data.patients),
                         "n0": int((data.y == 0).sum()), "n1": int((data.y == 1).sum())})
    state_dir = Path(str(hello["state_dir"]))
    while (query := read_frame(stdin)) is not None:
        try:
            reply = answer(data, query, state_dir)
        except Exception as err:  # a round's failure is the reply, as at a site
            reply = _failed(f"{type(err).__name__}: {err}")
        write_frame(stdout, reply)
    return 0


def _failed(reason: str) -> Payload:
    return {"status": schema.STATUS_FAILED, "reason": reason[:2000]}


def main() -> int:
    frames = sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries frames only; anything printed goes to the log
    return serve(sys.stdin.buffer, frames)


if __name__ == "__main__":
    sys.exit(main())
