"""deploy/approval.py: a SuperNode serves only a FAB its site's operator approved (by its
sha256 in the site's approval list, or a trusted entity's signature), and refuses any other
before it is stored — so before a ClientApp could install or import it — with an Error
reply and an audit record. The whole path runs in tests/adversarial/test_attack_sovereignty.py."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.supercore.fab import Fab
from flwr.supercore.primitives.asymmetric_ed25519 import (
    create_message_to_sign,
    generate_key_pair,
    sign_message,
)

from deploy import approval
from deploy import warm_supernode as warm
from simulation.launcher import APP_DIR


def fab(files: dict[str, str], hash_str: str | None = None,
        verifications: dict[str, str] | None = None) -> Fab:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, text in files.items():
            bundle.writestr(name, text)
    content = buffer.getvalue()
    return Fab(hash_str or hashlib.sha256(content).hexdigest(), content, verifications or {})


REVIEWED = fab({"client/app.py": "print('the reviewed guard')"})
MODIFIED = fab({"client/app.py": "open('clinical.csv').read()"})


def test_the_approval_list_holds_digests_and_notes(tmp_path: Path) -> None:
    path = tmp_path / "approved_apps.txt"
    assert approval.approved_hashes(path) == set()  # no list: nothing is approved
    digest = REVIEWED.hash_str
    path.write_text(f"# reviewed by the privacy officer\n{digest.upper()}  feddlr 0.1.0 ok\n"
                    f"# {MODIFIED.hash_str} commented out\nnot-a-digest\n\n")
    assert approval.approved_hashes(path) == {digest}
    assert approval.approval_list({"site-dir": str(tmp_path)}) == path
    assert approval.approval_list({"site-dir": "x", "approved-apps": "/o/list"}) == \
        Path("/o/list")  # the operator's own file, named in the node config
    assert approval.approval_list({}) is None


def test_only_an_approved_fab_is_served() -> None:
    approved = {REVIEWED.hash_str}
    assert approval.refusal(REVIEWED, REVIEWED.hash_str, approved, None) is None
    reason = approval.refusal(MODIFIED, MODIFIED.hash_str, approved, None)
    assert reason is not None and "not approved" in reason and MODIFIED.hash_str in reason
    # the modified content under the approved hash's name is refused too
    forged = Fab(REVIEWED.hash_str, MODIFIED.content, {})
    assert approval.refusal(forged, REVIEWED.hash_str, approved, None) is not None
    assert approval.refusal(REVIEWED, MODIFIED.hash_str, approved, None) is not None


def _signed(target: Fab, private: Any, key_id: str, signed_at: int = 1_700_000_000) -> Fab:
    message = create_message_to_sign(hashlib.sha256(target.content).digest(), signed_at)
    signature = base64.urlsafe_b64encode(sign_message(private, message)).decode().rstrip("=")
    record = json.dumps({"signature": signature, "signed_at": signed_at})
    # no `valid_license`: the SuperLink's flag, not the signer's; the signature decides
    return Fab(target.hash_str, target.content, {key_id: record})


def _openssh(public: Any) -> str:
    return public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH).decode()


def test_a_fab_signed_by_a_trusted_entity_is_served() -> None:
    private, public = generate_key_pair()
    other_private, _ = generate_key_pair()
    trusted = {"release-key": _openssh(public)}
    assert approval.refusal(_signed(MODIFIED, private, "release-key"), MODIFIED.hash_str,
                            set(), trusted) is None
    assert approval.refusal(_signed(MODIFIED, other_private, "release-key"),
                            MODIFIED.hash_str, set(), trusted) is not None
    assert approval.refusal(_signed(MODIFIED, private, "release-key"), MODIFIED.hash_str,
                            set(), None) is not None  # no trusted entities: hashes only
    for record in ("not json", json.dumps({"signature": "!!", "signed_at": "x"}), "{}"):
        hostile = Fab(MODIFIED.hash_str, MODIFIED.content, {"release-key": record})
        assert approval.refusal(hostile, MODIFIED.hash_str, set(), trusted) is not None


class FakeNode(types.SimpleNamespace):
    """Flower's start_client_internal as the patch sees it: `_pull_and_store_message`
    fetches the run and its FAB, then stores the FAB (here: records it as installed)."""

    ERROR = 40

    def __init__(self) -> None:
        super().__init__(stored=[], inserted=[], logged=[], trusted_seen=[])

        def pull(**kw: Any) -> int:
            message, _ = kw["receive"]()
            run = kw["get_run"](message.metadata.run_id)
            got = kw["get_fab"](run.fab_hash, message.metadata.run_id)
            self.trusted_seen.append(kw["trusted_entities"])
            self.stored.append(got)  # Flower: state.store_fab, then a ClientApp task
            return message.metadata.run_id

        self._pull_and_store_message = pull
        self._insert_message = lambda msg, state, store: self.inserted.append(msg)
        self.log = lambda level, fmt, *a: self.logged.append(fmt % a)


def _pull(node: FakeNode, served: Fab, site: Path) -> int | None:
    from flwr.app import Message, Metadata, RecordDict

    metadata = Metadata(run_id=7, message_id="m", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=60,
                        message_type="query.handshake")
    message = Message(RecordDict(), metadata=metadata)
    run = types.SimpleNamespace(fab_hash=served.hash_str, fab_id="feddlr/feddlr",
                                fab_version="0.1.0")
    return node._pull_and_store_message(
        state="state", object_store="store", node_config={"site-dir": str(site)},
        receive=lambda: (message, None), get_run=lambda run_id: run,
        get_fab=lambda fab_hash, run_id: served, pull_object=None,
        confirm_message_received=None, trusted_entities={"k": "v"})


def test_the_node_refuses_before_storing_answers_and_audits(tmp_path: Path) -> None:
    node = FakeNode()
    approval.enforce(node)
    (tmp_path / "approved_apps.txt").write_text(REVIEWED.hash_str + "\n")
    assert _pull(node, MODIFIED, tmp_path) == 7
    assert node.stored == []  # never stored: no ClientApp task, nothing installed
    (reply,) = node.inserted
    assert reply.has_error() and reply.error.code == 7  # Flower's INVALID_FAB
    assert "not approved" in reply.error.reason
    (record,) = [json.loads(line) for line in
                 (tmp_path / "audit" / "egress.jsonl").read_text().splitlines()]
    assert record["message_type"] == "app" and record["status"] == "refused"
    assert record["run_id"] == "7" and record["fab_sha256"] == MODIFIED.hash_str
    assert record["app"] == "feddlr/feddlr==0.1.0" and record["query"] == "query.handshake"
    assert record["bytes"] == len(reply.error.reason.encode())
    # the approved app is served as Flower serves it (our check replaces Flower's)
    assert _pull(node, REVIEWED, tmp_path) == 7
    assert node.stored == [REVIEWED] and node.trusted_seen == [None]
    assert len(node.inserted) == 1


def test_approve_records_the_fab_flwr_run_builds(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    app = tmp_path / "feddlr"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[project]\nname = "feddlr"\nversion = "0.1.0"\n\n[tool.flwr.app]\n'
        'publisher = "feddlr"\n\n[tool.flwr.app.components]\nserverapp = "s:app"\n'
        'clientapp = "c:app"\n')
    (app / "c.py").write_text("app = None\n")
    site = tmp_path / "site"
    site.mkdir()
    from flwr.cli.build import build_fab_from_disk

    expected = hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    assert approval.main(["approve", str(app), "--site", str(site), "--note", "by A"]) == 0
    assert approval.main(["approve", str(app), "--site", str(site)]) == 0  # once is kept
    lines = (site / "approved_apps.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected) and lines[0].endswith("by A")
    assert approval.main(["hash", str(app)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == expected
    (app / "c.py").write_text("app = 'changed'\n")  # any change is another app
    assert approval.fab_sha256(approval.fab_bytes(app)) != expected


def test_both_launchers_enforce_it() -> None:
    assert warm.enforce_approved_apps is approval.enforce
    script = (APP_DIR / "deploy" / "supernode.sh").read_text()
    assert 'supernode=(python "$FEDDLR_APP/deploy/approval.py" supernode)' in script
    assert "flower-supernode" not in script.split("exec", 1)[1]  # never unchecked


def test_a_refusal_that_cannot_be_audited_is_still_a_refusal(tmp_path: Path) -> None:
    node = FakeNode()
    approval.enforce(node)
    (tmp_path / "audit").write_text("a file where the audit folder should be")
    assert _pull(node, MODIFIED, tmp_path) == 7
    assert node.stored == [] and node.inserted[0].has_error()
    assert any("could not be audited" in line for line in node.logged)
