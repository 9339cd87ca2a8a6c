"""The architecture as rules the code keeps (docs/ARCHITECTURE.md): which package may import
which, no import cycle, no module over 600 lines. Read from the source (ast), every import
counted — a function-level import too, since it is an arrow all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("client", "server", "shared", "neural", "simulation", "wire")
# what each package may import of the project and of third parties (None: anything)
ALLOWED: dict[str, tuple[set[str], set[str] | None]] = {
    "shared": ({"shared"}, {"numpy", "scipy"}),  # numpy math and contracts only
    "neural": ({"neural", "shared"}, None),  # the torch side
    "wire": ({"wire", "shared"}, {"numpy", "flwr"}),
    "client": ({"client", "shared", "neural", "wire"}, None),
    "server": ({"server", "shared", "neural", "wire"}, None),
}
STDLIB = {"__future__", "abc", "argparse", "ast", "base64", "bisect", "collections",
          "concurrent", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib",
          "enum", "errno", "fnmatch", "functools", "glob", "gzip", "hashlib", "heapq", "hmac",
          "importlib", "inspect", "io", "itertools", "json", "logging", "math", "multiprocessing",
          "numbers", "operator", "os", "pathlib", "platform", "queue", "random", "re", "secrets",
          "select", "shlex", "shutil", "signal", "socket", "sqlite3", "statistics", "string",
          "struct", "subprocess", "sys", "tempfile", "textwrap", "threading", "time",
          "traceback", "types", "typing", "unicodedata", "urllib", "uuid", "warnings",
          "weakref", "zipfile", "zlib"}
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {}
    for package in PROJECT:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, module: str, *, top_level_only: bool = False) -> set[str]:
    """The modules `path` imports (absolute names; a `from pkg import name` counts
    `pkg.name` where that is a module, else `pkg`). `top_level_only`: the module body's own
    import statements, so neither a function's import nor an `if TYPE_CHECKING:` block."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_it_may(package: str) -> None:
    project_ok, third_ok = ALLOWED[package]
    bad = []
    for name, path in modules().items():
        if name.split(".")[0] != package:
            continue
        bad += [f"{name} -> {target}" for target in imports(path, name)
                if not allowed(target.split(".")[0], project_ok, third_ok)]
    assert bad == []


def allowed(root: str, project_ok: set[str], third_ok: set[str] | None) -> bool:
    if root in PROJECT:
        return root in project_ok
    return root in STDLIB or third_ok is None or root in third_ok


def test_no_import_cycle() -> None:
    """Module-level imports of the project form no cycle. (A function-level import is not an
    edge here: the stages' code is loaded on demand by reference, shared/stages.py.)"""
    known = modules()
    graph = {name: {t for t in imports(path, name, top_level_only=True) if t in known
                    and t != name} for name, path in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_module_over_600_lines() -> None:
    paths = [*modules().values(), *(REPO / "bench").rglob("*.py"), *(REPO / "tests").rglob("*.py")]
    long = {str(path.relative_to(REPO)): n for path in paths
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_rules_see_an_arrow_upward(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import numpy\nfrom server.core import transport\n"
                      "def f():\n    import torch\n", encoding="utf-8")
    assert imports(module, "shared.m") >= {"numpy", "server.core", "server.core.transport",
                                           "torch"}
    assert imports(module, "shared.m", top_level_only=True) == {
        "numpy", "server.core", "server.core.transport"}
