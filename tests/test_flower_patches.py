"""wire/flower_patches.py: every change FedDLR makes inside Flower resolves in the installed
Flower (this test fails on a Flower whose patched names moved), and a patch whose names
are gone, or written for other Flower versions, leaves Flower as shipped with a warning —
except the site's app approval, which stops instead."""

from __future__ import annotations

import importlib
import logging
import re
import time
import tomllib
import types
from pathlib import Path

import pytest

from deploy import warm_supernode
from wire import flower_patches
from wire.flower_patches import PATCHES, Patch, PatchMissing, apply

ROOT = Path(__file__).resolve().parent.parent
NODE = "flwr.supernode.start_client_internal"


@pytest.mark.parametrize("patch", PATCHES, ids=[p.key for p in PATCHES])
def test_each_patched_name_exists_in_the_installed_flower(patch: Patch) -> None:
    assert flower_patches.in_range(flower_patches.flower_version(), patch.flower)
    module = importlib.import_module(patch.module)
    for name in (patch.name, *patch.uses):
        assert flower_patches.resolve(module, name) is not None, f"{patch.module}.{name}"
    assert flower_patches.missing(patch) == []
    assert callable(flower_patches.factory_of(patch))
    assert patch.why


def test_each_patch_is_declared_once_for_the_versions_pyproject_allows() -> None:
    assert len({p.key for p in PATCHES}) == len(PATCHES)
    assert len({(p.module, p.name, p.factory) for p in PATCHES}) == len(PATCHES)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (pin,) = [d for d in project["project"]["dependencies"] if d.startswith("flwr")]
    assert re.findall(r"(>=|<)([\d.]+)", pin) == [(">=", flower_patches.FLOWER[0]),
                                                 ("<", flower_patches.FLOWER[1])]


def test_versions_compare_by_number() -> None:
    assert flower_patches.version_tuple("1.42.0") == (1, 42, 0)
    assert flower_patches.version_tuple("1.43.0rc1") == (1, 43, 0)
    assert flower_patches.in_range("1.41.0", ("1.41", "1.43"))
    assert flower_patches.in_range("1.42.7", ("1.41", "1.43"))
    assert not flower_patches.in_range("1.43.0", ("1.41", "1.43"))
    assert not flower_patches.in_range("1.9.0", ("1.41", "1.43"))  # not compared as text


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "feddlr.flower_patches" and r.levelno == logging.WARNING]


def test_a_patch_whose_name_is_gone_leaves_flower_as_shipped_and_warns(
        caplog: pytest.LogCaptureFixture) -> None:
    module = importlib.import_module(NODE)
    before = dict(vars(module))
    gone = Patch("test.renamed-in-flower", NODE, "_pull_and_store_message_v2",
                 "deploy.warm_supernode:wake_after_pull", "a test")
    uses_gone = Patch("test.uses-a-renamed-name", NODE, "_push_messages",
                      "deploy.warm_supernode:reset_after_push", "a test",
                      uses=("_insert_message_v2",))
    with caplog.at_level(logging.WARNING, "feddlr.flower_patches"):
        assert apply(gone, 1) is False
        assert apply(uses_gone, warm_supernode.Backoff()) is False
    assert vars(module) == before  # nothing rebound, nothing added
    first, second = _warnings(caplog)
    assert "test.renamed-in-flower not applied" in first
    assert f"{NODE}._pull_and_store_message_v2 missing in flwr" in first
    assert "test.uses-a-renamed-name" in second and "_insert_message_v2 missing" in second


def test_outside_its_flower_versions_a_patch_is_not_applied(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    node = types.SimpleNamespace(time=time)
    monkeypatch.setattr(flower_patches, "flower_version", lambda: "1.43.0")
    with caplog.at_level(logging.WARNING, "feddlr.flower_patches"):
        assert apply("supernode.poll-backoff", warm_supernode.Backoff(), into=node) is False
    assert node.time is time
    (warning,) = _warnings(caplog)
    assert "supernode.poll-backoff not applied" in warning and "flwr 1.43.0" in warning


def test_a_replacement_that_cannot_be_built_leaves_flower_as_shipped(
        caplog: pytest.LogCaptureFixture) -> None:
    node = types.SimpleNamespace(time=time)
    broken = Patch("test.no-factory", NODE, "time", "wire.flower_patches:no_such_factory", "t")
    with caplog.at_level(logging.WARNING, "feddlr.flower_patches"):
        assert apply(broken, into=node) is False
    assert node.time is time and "could not be built" in _warnings(caplog)[0]


def test_a_patch_whose_names_exist_is_applied() -> None:
    clock = warm_supernode.Backoff()
    pushed: list[int] = []
    node = types.SimpleNamespace(time=time, _push_messages=lambda *a, **kw: pushed.append(1))
    assert apply("supernode.poll-backoff", clock, into=node) is True
    assert apply("supernode.look-soon-after-a-reply", clock, into=node) is True
    assert node.time is clock
    clock.wait = 2.0
    node._push_messages()
    assert pushed == [1] and clock.wait == warm_supernode.FAST_POLL


def test_the_app_approval_has_no_stock_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving an app the site never approved is no fallback: the SuperNode stops."""
    node = types.SimpleNamespace(_pull_and_store_message=lambda **kw: 1, log=print,
                                 ERROR=40)  # no `_insert_message`: the Error reply is gone
    pull = node._pull_and_store_message
    with pytest.raises(PatchMissing, match="_insert_message"):
        apply("supernode.approved-apps", node, into=node)
    assert node._pull_and_store_message is pull
    node._insert_message = lambda *a: None
    monkeypatch.setattr(flower_patches, "flower_version", lambda: "1.43.0")
    assert apply("supernode.approved-apps", node, into=node) is True  # warned, still checked
    assert node._pull_and_store_message is not pull
