"""Every change FedDLR makes to Flower's internals, declared once and applied with checks.

Flower has no setting for the waits and installs that cost a deployment round most of its
time (docs/BENCHMARKS.md §9), nor a hook for the site's app approval, so the deploy
launchers and the ServerApp rebind a few names inside Flower modules. A rebinding of a name
Flower no longer has would create an unused attribute and change nothing, silently. Here
each patch is one `Patch` in `PATCHES` (the Flower module, the name rebound, the factory of
its replacement, why, the Flower versions it was written for), and `apply` rebinds it only
after checking that
- the installed Flower is in the patch's version range, and
- the patched name, and every other name the replacement uses in that module, exists.
A failed check leaves the module untouched and logs a warning naming the patch and what is
missing (logger `feddlr.flower_patches`): that part of Flower then runs as shipped, slower,
never broken. A `required` patch (the site's app approval) has no stock fallback — serving
an app the site did not approve is no fallback — so a missing name stops the process
instead; out of its version range it warns and is applied while its names exist.

`tests/test_flower_patches.py` resolves every declaration in the installed Flower.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from typing import Any

log = logging.getLogger("feddlr.flower_patches")

FLOWER = ("1.41", "1.43")  # written for 1.41 <= flwr < 1.43 (pyproject's pin)
RETRY = 0.05  # seconds before the first retry of a missing object (Flower: 1)
RETRY_CAP = 1.0  # longest wait between retries (Flower: 10)
_ORIGINAL = "_feddlr_original"

NODE = "flwr.supernode.start_client_internal"  # the SuperNode's loop
SUPEREXEC = "flwr.supercore.superexec.run_superexec"  # the SuperNode's task launcher
CLIENTAPP = "flwr.supernode.runtime.run_clientapp"  # one ClientApp task


class PatchMissing(RuntimeError):
    """A required patch whose Flower names are gone: the process must not go on without it."""


@dataclass(frozen=True)
class Patch:
    """`module.name` (a dotted name: `Class.method`) becomes `factory(original, *args)`;
    `factory` is "package.module:function"; `uses` are other names of `module` the
    replacement calls."""

    key: str
    module: str
    name: str
    factory: str
    why: str
    uses: tuple[str, ...] = ()
    flower: tuple[str, str] = FLOWER
    required: bool = False


PULLERS = (("clientapp", "flwr.supercore.inflatable.inflatable_utils", "a ClientApp's message"),
           ("serverapp", "flwr.superlink.grid.http_grid", "the ServerApp's replies"),
           ("supernode", NODE, "the SuperNode's messages"))
PULL_WHY = ("a message's objects may arrive after the message is listed; Flower asks again "
            "after 1 s, doubling to 10 s: most of a statistics round on loopback. Retries "
            f"start at {RETRY} s and grow to {RETRY_CAP} s")
PATCHES = (
    Patch("supernode.approved-apps", NODE, "_pull_and_store_message",
          "deploy.approval:approved_pull",
          "a run's FAB is checked against the site's approval list when the SuperNode "
          "fetches it, before it is stored (deploy/approval.py)",
          uses=("log", "ERROR", "_insert_message"), required=True),
    Patch("supernode.poll-backoff", NODE, "time", "deploy.warm_supernode:poll_backoff",
          "the SuperNode sleeps 3 s after an empty look at the SuperLink and 0.5 s between "
          "looks at its own state; after a message it looks again within 50 ms"),
    Patch("supernode.look-soon-after-a-reply", NODE, "_push_messages",
          "deploy.warm_supernode:reset_after_push",
          "after the SuperNode sent a reply the next message is likely near: the backoff "
          "starts short again"),
    Patch("supernode.wake-superexec", NODE, "_pull_and_store_message",
          "deploy.warm_supernode:wake_after_pull",
          "the SuperExec learns of a stored message through a pipe instead of polling"),
    Patch("superexec.woken", SUPEREXEC, "time", "deploy.warm_supernode:poll_backoff",
          "the SuperExec's wait for a task ends when the SuperNode writes to the pipe"),
    Patch("superexec.fork-clientapps", SUPEREXEC, "get_executor",
          "deploy.warm_supernode:fork_executor",
          "each ClientApp task runs in a child forked from a process that imported the "
          "libraries once, not in a fresh flwr-clientapp process (2-3 s of imports)"),
    Patch("clientapp.install-once", CLIENTAPP, "install_from_fab",
          "deploy.warm_supernode:installed_once",
          "Flower unpacks and re-verifies the whole FAB for every message; a FAB whose "
          "exact bytes were installed before is reused"),
    *(Patch(f"objects.quick-pulls.{who}", module, "pull_objects",
            "wire.flower_patches:quick_pull", f"{PULL_WHY} ({what})")
      for who, module, what in PULLERS),
    Patch("superlink.objects-in-memory", "flwr.superlink.config_loader",
          "ObjectStoreFactory", "deploy.warm_superlink:in_memory_objects",
          "message objects live until delivered; writing each as an SQLite row was a third "
          "of a round. The link state stays in the database"),
    Patch("superlink.sweep-tokens-less-often", "flwr.supercore.corestate.sql_corestate",
          "SqlCoreState._cleanup_expired_task_tokens", "deploy.warm_superlink:at_most_every",
          "Flower sweeps expired task tokens in every run-status read (a fifth of the "
          "SuperLink's CPU); at most once a second is enough for 30 s tokens"),
)
BY_KEY = {p.key: p for p in PATCHES}
QUICK_PULLS = tuple(p.key for p in PATCHES if p.key.startswith("objects.quick-pulls."))


def flower_version() -> str:
    return metadata.version("flwr")


def version_tuple(version: str) -> tuple[int, ...]:
    """(1, 42, 0) of "1.42.0"; what follows the numbers ("rc1", ".dev3") is ignored."""
    numbers = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in numbers.group().split(".")[:3]) if numbers else ()


def in_range(version: str, flower: tuple[str, str]) -> bool:
    low, high = (version_tuple(v) for v in flower)
    return low <= version_tuple(version) < high


def resolve(owner: Any, dotted: str) -> tuple[Any, str] | None:
    """(the object holding the last part of `dotted`, that part), or None when any part is
    missing."""
    *path, last = dotted.split(".")
    for part in path:
        if not hasattr(owner, part):
            return None
        owner = getattr(owner, part)
    return (owner, last) if hasattr(owner, last) else None


def factory_of(patch: Patch) -> Callable[..., Any]:
    module, _, name = patch.factory.partition(":")
    return getattr(importlib.import_module(module), name)


def missing(patch: Patch, into: Any = None) -> list[str]:
    """What of `patch` the installed Flower lacks: its module, its name or a name it uses."""
    if into is None:
        try:
            into = importlib.import_module(patch.module)
        except ImportError as err:
            return [f"module {patch.module} ({err})"]
    return [f"{patch.module}.{name}" for name in (patch.name, *patch.uses)
            if resolve(into, name) is None]


def apply(patch: Patch | str, *args: Any, into: Any = None) -> bool:
    """Rebind `patch`'s name to `factory(original, *args)` in its Flower module (or in
    `into`, a stand-in for it); True when applied. Checks first (see the module's doc):
    on a failed check the module is left as it was and a warning says why."""
    patch = BY_KEY[patch] if isinstance(patch, str) else patch
    reason = refusal(patch, into)
    if reason is None:
        owner, name = resolve(importlib.import_module(patch.module) if into is None else into,
                              patch.name) or (None, "")
        try:
            setattr(owner, name, factory_of(patch)(getattr(owner, name), *args))
            return True
        except (ImportError, AttributeError) as err:  # a name the replacement needs
            reason = f"its replacement could not be built ({err})"
    if patch.required:
        raise PatchMissing(f"Flower patch {patch.key} cannot be applied: {reason}. It is "
                           f"required ({patch.why}): this process stops")
    log.warning("Flower patch %s not applied: %s. Flower runs that part as shipped "
                "(the patch: %s)", patch.key, reason, patch.why)
    return False


def refusal(patch: Patch, into: Any = None) -> str | None:
    """Why `patch` cannot be applied to the installed Flower, or None. A required patch
    outside its versions is only warned about: its names decide."""
    version = flower_version()
    if not in_range(version, patch.flower):
        if not patch.required:
            return (f"flwr {version} is outside the versions it was written for "
                    f"({patch.flower[0]} <= flwr < {patch.flower[1]})")
        log.warning("Flower patch %s was written for %s <= flwr < %s, not %s: applied "
                    "because it is required and its names exist", patch.key,
                    *patch.flower, version)
    gone = missing(patch, into)
    return f"{', '.join(gone)} missing in flwr {version}" if gone else None


def quick_pull(original: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's `pull_objects` with short retries (idempotent: never a partial of one)."""
    original = getattr(original, _ORIGINAL, original)
    quick = partial(original, initial_backoff=RETRY, backoff_cap=RETRY_CAP)
    setattr(quick, _ORIGINAL, original)
    return quick


def quick_object_pulls() -> list[str]:
    """Short retries for a missing object in every Flower module that pulls objects, in
    this process (the ServerApp's Grid, the SuperNode, its ClientApps); returns the
    modules changed."""
    return [BY_KEY[key].module for key in QUICK_PULLS if apply(key)]
