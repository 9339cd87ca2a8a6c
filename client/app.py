"""The FedDLR ClientApp: one per hospital. Every query goes through `client.handlers.serve`,
whose egress guard is the only producer of reply content.

Hostile input stops at the edge: every message gets a reply whose payload carries `status`,
and the node keeps serving. A message type this site does not answer, a query larger than
the node config `max-query-bytes` (default 256 MiB), records other than the schema's
`arrays`/`config`, values of a type the schema does not allow, or arrays that cannot be
read are answered `failed` with the reason, through the guard (so the refusal is audited and
its text scrubbed of patient ids). Flower alone would raise for an unregistered message type
and send an `Error` reply instead.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.handlers import error_reply, serve
from shared import schema, settings
from wire import read_payload, to_records

DEFAULT_MAX_QUERY_BYTES = 256 * 2**20


class SiteClientApp(ClientApp):
    """Flower's ClientApp, except that a message of a type no handler is registered for gets
    a `failed` payload reply (through the guard) instead of Flower's exception."""

    def __call__(self, message: Message, context: Context) -> Message:
        if schema.action_of(str(message.metadata.message_type)) is not None:
            return super().__call__(message, context)
        return answer(message, context)


app = SiteClientApp()


def site_dir(context: Context) -> Path:
    """The site folder this node serves.

    Deployment: node config `site-dir` (`flower-supernode --node-config 'site-dir="…"'`).
    Simulation: the `partition-id`-th site folder (sorted) under run config `sites-dir`.
    """
    if "site-dir" in context.node_config:
        return Path(str(context.node_config["site-dir"])).resolve()
    root = Path(settings.value(context.run_config, "sites-dir")).resolve()
    folders = sorted(p for p in root.iterdir() if (p / "site.yaml").is_file())
    index = int(context.node_config["partition-id"])
    if index >= len(folders):
        raise RuntimeError(f"node {index} has no site folder: {len(folders)} under {root}")
    return folders[index]


def max_query_bytes(context: Context) -> int:
    """The largest query this node reads (node config `max-query-bytes`)."""
    try:
        return int(context.node_config.get("max-query-bytes", DEFAULT_MAX_QUERY_BYTES))
    except (TypeError, ValueError):
        return DEFAULT_MAX_QUERY_BYTES


def answer(msg: Message, context: Context) -> Message:
    """Answer one message; never raises, always a payload with `status`."""
    message_type = str(msg.metadata.message_type)
    action = schema.action_of(message_type)
    run_id = str(msg.metadata.run_id)
    try:
        root = site_dir(context)
    except Exception as err:  # no site folder: nothing to audit into, nothing to leak
        return _reply(msg, {"status": schema.STATUS_FAILED,
                            "reason": f"this node has no usable site folder: {err}"[:2000]})
    limit = max_query_bytes(context)
    if action is None:
        reply = error_reply(root, f"unknown:{message_type}"[:200], run_id,
                            f"unknown message type {message_type[:200]!r}; this site answers "
                            f"query.<action> for {', '.join(schema.query_actions())} and "
                            f"{', '.join(schema.TRAIN_ACTIONS)}")
        return _reply(msg, reply)
    try:
        size = content_bytes(msg.content)
        if size > limit:
            reply = error_reply(root, action, run_id, f"query of {size} bytes is larger than "
                                f"this site's max-query-bytes ({limit}); not read")
        else:
            reply = serve(root, action, read_query(msg.content), run_id)
    except Exception as err:
        reply = error_reply(root, action, run_id,
                            f"malformed query: {type(err).__name__}: {err}"[:2000])
    return _reply(msg, reply)


def content_bytes(content: RecordDict) -> int:
    """Bytes a message's records hold (array buffers, config values as text)."""
    size = 0
    for record in content.array_records.values():
        size += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        size += sum(len(k) + (len(v) if isinstance(v, bytes | str) else len(str(v)))
                    for k, v in record.items())
    for record in content.metric_records.values():
        size += sum(len(k) + len(str(v)) for k, v in record.items())
    return size


def read_query(content: RecordDict) -> schema.Payload:
    """The query a message carries, held to the schema: only the `arrays` ArrayRecord and
    the `config` ConfigRecord, values of the schema's types, arrays readable without pickle."""
    extra = sorted(set(content) - {schema.ARRAYS, schema.CONFIG})
    if extra:
        raise schema.SchemaError(f"unexpected record(s) {extra[:5]}; a query holds only "
                                 f"{schema.ARRAYS!r} and {schema.CONFIG!r}")
    if schema.ARRAYS in content and schema.ARRAYS not in content.array_records:
        raise schema.SchemaError(f"record {schema.ARRAYS!r} is not an ArrayRecord")
    if schema.CONFIG in content and schema.CONFIG not in content.config_records:
        raise schema.SchemaError(f"record {schema.CONFIG!r} is not a ConfigRecord")
    query = read_payload(content)
    schema.split_payload(query)  # raises SchemaError for a value of another type
    return query


def _reply(msg: Message, payload: schema.Payload) -> Message:
    return Message(to_records(payload), reply_to=msg)


for _action in schema.query_actions():
    app.query(_action)(answer)
for _category, _, _model in (t.partition(".") for t in schema.TRAIN_ACTIONS):
    getattr(app, _category)(_model)(answer)  # train.<model>, evaluate.<model>
