"""A hospital's SuperNode runs only the FedDLR app its operator approved (issue 25, point 1).

Flower runs the ClientApp of whatever FAB (Flower App Bundle) the coordinator submits: the
SuperNode fetches the run's FAB from the SuperLink, stores it, and the ClientApp process
installs and imports it. A coordinator could send a ClientApp without FedDLR's egress guard.

Here the SuperNode checks each run's FAB when it fetches it — before it is stored, so before
any ClientApp process can install or import it — and serves the run only if
- the sha256 of the FAB's bytes is recorded in the site's approval list
  (`<site-dir>/approved_apps.txt`, or the file named by the node-config key
  `approved-apps`: both set by the operator on the SuperNode's command line, never by
  anything the coordinator sends), or
- it carries a valid signature by a key in Flower's `--trusted-entities` file (Flower's own
  check, `_verify_fab`; the SuperLink's unsigned `valid_license` flag is not required).
Otherwise every message of that run is answered with a Flower Error reply (`INVALID_FAB`,
the reason below) that the ServerApp receives as the site's reply (FedDLR's server reports
the site `failed`, "site error: …"), and the refusal is appended to the site's audit log
(`<site-dir>/audit/egress.jsonl`, the guard's record with `message_type` "app").

The approval list holds one line per approved FAB: its sha256 (64 hex digits) first, then
anything (what was reviewed, by whom, when); lines starting with `#` are comments.

    python deploy/approval.py hash APP_DIR|FAB                 # print the FAB's sha256
    python deploy/approval.py approve APP_DIR|FAB --site SITE  # record it for SITE
    python deploy/approval.py supernode <flower-supernode arguments>

`hash`/`approve` of an app folder build its FAB exactly as `flwr run APP_DIR` does (Flower's
`build_fab_from_disk`: fixed file dates, so the same files give the same hash). `supernode`
is Flower's plain `flower-supernode` with this check (`deploy/supernode.sh`,
`FEDDLR_FAST=0`); `deploy/warm_supernode.py` applies the same check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

APPROVED_APPS = "approved_apps.txt"  # in the site folder, unless node config says otherwise
APPROVED_APPS_KEY = "approved-apps"  # node-config key: the operator's approval list
SITE_DIR_KEY = "site-dir"
AUDIT_LOG = Path("audit") / "egress.jsonl"
AUDIT_MESSAGE_TYPE = "app"  # the audit record of a refused app (not a query)
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Unapproved(Exception):
    """A run's FAB that this site does not run."""

    def __init__(self, run_id: int, digest: str, reason: str) -> None:
        super().__init__(reason)
        self.run_id, self.digest, self.reason = run_id, digest, reason


def fab_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def fab_bytes(app: Path) -> bytes:
    """A FAB file's bytes, or the FAB `flwr run APP_DIR` builds from an app folder."""
    if app.is_dir():
        from flwr.cli.build import build_fab_from_disk

        return build_fab_from_disk(app)
    return app.read_bytes()


def approval_list(node_config: dict[str, Any]) -> Path | None:
    """The operator's approval list for this node: node config `approved-apps`, else
    `approved_apps.txt` in the site folder; None without either."""
    if node_config.get(APPROVED_APPS_KEY):
        return Path(str(node_config[APPROVED_APPS_KEY])).expanduser()
    if node_config.get(SITE_DIR_KEY):
        return Path(str(node_config[SITE_DIR_KEY])).expanduser() / APPROVED_APPS
    return None


def approved_hashes(path: Path | None) -> set[str]:
    """The sha256 digests recorded in an approval list (none if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8") if path else ""
    except (OSError, UnicodeDecodeError):
        return set()
    words = (line.split(maxsplit=1)[0] for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {w.lower() for w in words if SHA256.match(w.lower())}


def signed_by_trusted(fab: Any, trusted_entities: dict[str, str] | None) -> bool:
    """Flower's signature check of a FAB against the operator's trusted entities; a
    malformed verification record (it comes from the SuperLink) is no signature."""
    if not trusted_entities:
        return False
    from flwr.supernode.start_client_internal import _verify_fab

    try:
        return bool(_verify_fab(fab, trusted_entities))
    except Exception:  # hostile records: bad JSON, a key of another type, bad base64
        return False


def refusal(fab: Any, requested_hash: str, approved: set[str],
            trusted_entities: dict[str, str] | None) -> str | None:
    """Why this site does not run this FAB, or None when its operator approved it."""
    digest = fab_sha256(fab.content)
    if fab.hash_str != digest or requested_hash != digest:
        return (f"app refused: the FAB's content (sha256 {digest}) does not match the hash "
                f"the run names ({requested_hash[:64]}); it is not approved by this site")
    if digest in approved or signed_by_trusted(fab, trusted_entities):
        return None
    return (f"app refused: FAB sha256 {digest} is not approved by this site's operator "
            "(not in its approval list, no signature by a trusted entity); none of its "
            "code was installed or run")


def audit_refusal(node_config: dict[str, Any], refused: Unapproved, app: str,
                  message_type: str) -> None:
    """The refusal in the site's egress log, as the guard writes a reply it sends (keys,
    bytes and sha256 are of what left: the Error's reason)."""
    if not node_config.get(SITE_DIR_KEY):
        return
    site = Path(str(node_config[SITE_DIR_KEY])).expanduser()
    sent = refused.reason.encode("utf-8")
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": str(refused.run_id),
        "site_id": _site_id(site),
        "message_type": AUDIT_MESSAGE_TYPE,
        "status": "refused",
        "keys": ["error"],
        "arrays": {},
        "bytes": len(sent),
        "sha256": hashlib.sha256(sent).hexdigest(),
        "refused": {"app": refused.reason},
        "fab_sha256": refused.digest,
        "app": app[:200],
        "query": message_type[:200],
    }
    path = site / AUDIT_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def _site_id(site: Path) -> str:
    """The site's name as its guard writes it (site.yaml's site_id, else the folder's)."""
    try:
        from client.handlers import _site_name

        return _site_name(site)
    except Exception:
        return site.name


def enforce(node: Any) -> None:
    """Patch Flower's SuperNode (`flwr.supernode.start_client_internal`, or a stand-in) so
    that a run's FAB is checked when it is fetched, before the SuperNode stores it
    (`wire.flower_patches`: "supernode.approved-apps"; without its Flower names the
    SuperNode does not start)."""
    from wire import flower_patches

    flower_patches.apply("supernode.approved-apps", node, into=node)


def approved_pull(pull: Callable[..., int | None], node: Any) -> Callable[..., int | None]:
    """Flower's `_pull_and_store_message` (`pull`) that refuses an unapproved FAB with an
    Error reply and an audit record instead of storing it."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    def pull_approved(**kw: Any) -> int | None:
        seen: dict[str, Any] = {}
        config = dict(kw["node_config"])
        trusted = kw.get("trusted_entities")
        kw["trusted_entities"] = None  # checked here: an approved hash OR a signature
        kw["receive"] = _keeping(kw["receive"], seen, "message", lambda got: got[0])
        kw["get_run"] = _keeping(kw["get_run"], seen, "run", lambda run: run)
        get_fab = kw["get_fab"]

        def get_approved_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            reason = refusal(fab, fab_hash, approved_hashes(approval_list(config)), trusted)
            if reason is not None:
                raise Unapproved(run_id, fab_sha256(fab.content), reason)
            return fab

        kw["get_fab"] = get_approved_fab
        try:
            return pull(**kw)
        except Unapproved as refused:
            message, run = seen["message"], seen.get("run")
            app = f"{run.fab_id}=={run.fab_version}" if run is not None else ""
            node.log(node.ERROR, "%s", refused.reason)
            try:
                audit_refusal(config, refused, app, str(message.metadata.message_type))
            except OSError as err:  # still refused; the node's log says why it is not audited
                node.log(node.ERROR, "the refusal could not be audited: %s", err)
            reply = Message(Error(ErrorCode.INVALID_FAB, refused.reason), reply_to=message)
            node._insert_message(reply, kw["state"], kw["object_store"])
            return refused.run_id

    return pull_approved


def _keeping(call: Callable[..., Any], seen: dict[str, Any], key: str,
             pick: Callable[[Any], Any]) -> Callable[..., Any]:
    """`call`, remembering what it returned (for the Error reply and the audit record)."""
    def kept(*a: Any, **kw: Any) -> Any:
        got = call(*a, **kw)
        if got is not None:
            seen[key] = pick(got)
        return got

    return kept


def approve(app: Path, site: Path, note: str = "") -> str:
    """Record the FAB's sha256 in the site's approval list; returns the digest."""
    content = fab_bytes(app)
    digest = fab_sha256(content)
    path = site / APPROVED_APPS
    if digest not in approved_hashes(path):
        line = f"{digest}  {app.resolve().name} approved {time.strftime('%Y-%m-%d %H:%M')}"
        with path.open("a", encoding="utf-8") as fh:
            fh.write(f"{line} {note}".rstrip() + "\n")
    return digest


def run_supernode(args: list[str]) -> None:
    """Flower's plain `flower-supernode` with the approval check."""
    import flwr.supernode.start_client_internal as node
    from flwr.supernode.cli.flower_supernode import flower_supernode

    enforce(node)
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:
        run_supernode(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="deploy/approval.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("hash", help="print the sha256 of a FAB or an app folder's FAB")
    show.add_argument("app", type=Path)
    rec = sub.add_parser("approve", help="record a reviewed app in a site's approval list")
    rec.add_argument("app", type=Path, help="the reviewed app folder, or its .fab file")
    rec.add_argument("--site", type=Path, required=True, help="the site folder")
    rec.add_argument("--note", default="", help="who reviewed what (kept on the line)")
    sub.add_parser("supernode", help="flower-supernode with the approval check")
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(fab_sha256(fab_bytes(args.app)))
        return 0
    if not args.site.is_dir():
        parser.error(f"site folder {args.site} does not exist")
    digest = approve(args.app, args.site, args.note)
    print(f"{digest}  approved for {args.site.resolve().name} "
          f"(in {args.site.resolve() / APPROVED_APPS})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the FedDLR checkout
    raise SystemExit(main())
