"""The FedDLR ClientApp: one per hospital. Every query goes through `client.handlers.serve`,
whose egress guard is the only producer of reply content."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.handlers import serve
from client.wire import read_payload, to_records
from shared import schema

app = ClientApp()


def site_dir(context: Context) -> Path:
    """The site folder this node serves.

    Deployment: node config `site-dir` (`flower-supernode --node-config 'site-dir="…"'`).
    Simulation: the `partition-id`-th site folder (sorted) under run config `sites-dir`.
    """
    if "site-dir" in context.node_config:
        return Path(str(context.node_config["site-dir"])).resolve()
    root = Path(str(context.run_config["sites-dir"])).resolve()
    folders = sorted(p for p in root.iterdir() if (p / "site.yaml").is_file())
    index = int(context.node_config["partition-id"])
    if index >= len(folders):
        raise RuntimeError(f"node {index} has no site folder: {len(folders)} under {root}")
    return folders[index]


def answer(msg: Message, context: Context) -> Message:
    action = msg.metadata.message_type.partition(".")[2]
    run_id = str(msg.metadata.run_id)
    try:
        query = read_payload(msg.content)
    except (KeyError, TypeError, ValueError) as err:
        query, action = {}, f"malformed:{action}:{type(err).__name__}"
    reply = serve(site_dir(context), action, query, run_id)
    return Message(to_records(reply), reply_to=msg)


for _action in schema.ACTIONS:
    app.query(_action)(answer)
