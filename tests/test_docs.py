"""The repository's documents stand on their own: every path README.md and docs/*.md point
to exists in the repository (a clone has nothing beside it), and docs/SITE.md's site.yaml
key tables list exactly the keys client/site/config.py and shared/policy.py declare."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from client.site import config as site_config
from shared.policy import DPRequirement, PrivacyPolicy

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target): a link; targets with a scheme or only an anchor are not files
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
# `path`: a backticked repository path — starts with a top-level folder of the repository
# (or leaves it with ../), holds no placeholder (<site>, *, {a,b}) and no spaces
# (not data/ or runs/: what `make demo` writes is not in a clone)
REPO_DIRS = ("bench", "client", "deploy", "docs", "server", "shared", "simulation", "tests",
             "wire")
TICKED = re.compile(r"`((?:\.\./|(?:" + "|".join(REPO_DIRS) + r")/)[^`\s<>*{}|…]*)`")
# docs/NAME.md written without backticks or a link
BARE_DOC = re.compile(r"(?<![\w/.`])(docs/[A-Za-z0-9_-]+\.md)\b")
# paths the project writes when it runs (not in a clone): a make target's output
GENERATED = {"bench/results.json"}


def _paths(text: str) -> list[tuple[str, bool]]:
    """(path, is a link) for every path the text points to, links first."""
    links = [t for t in LINK.findall(text)
             if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    return ([(t, True) for t in links]
            + [(t, False) for t in [*TICKED.findall(text), *BARE_DOC.findall(text)]])


def _module_name(path: str) -> bool:
    """`shared/glm.QuasiNewton`: a name in a module of the repository."""
    match = re.fullmatch(r"([\w/]+)\.[A-Za-z_]\w*", path)
    return bool(match) and (ROOT / f"{match.group(1)}.py").is_file()


def missing_paths(doc: Path, text: str | None = None) -> list[str]:
    """The paths `doc` (or `text` as if it were at `doc`) points to that are not in the
    repository, or lead out of it."""
    bad = []
    text = doc.read_text(encoding="utf-8") if text is None else text
    for raw, is_link in _paths(text):
        path = raw.split("#", 1)[0].rstrip(".,;:")
        if not path or path in GENERATED:
            continue
        # a link is relative to its document, a backticked or bare path to the repository
        target = ((doc.parent if is_link else ROOT) / path).resolve()
        if not target.is_relative_to(ROOT) or not (target.exists() or _module_name(path)):
            bad.append(raw)
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_document_names_exists_in_the_repository(doc: Path) -> None:
    assert missing_paths(doc) == []


def test_the_path_check_finds_a_path_outside_and_a_missing_file() -> None:
    text = ("See `../shared/DESIGN.md`, [the design](DESIGN.md), `client/site/folder.py`, "
            "`client/no_such_module.py`, `shared/glm.QuasiNewton`, `shared/glm.Nope.x`, "
            "[gone](no-such.md) and docs/NOPE.md; "
            "`<site>/audit/site.log` and [Flower](https://flower.ai) are not repo paths.")
    found = missing_paths(ROOT / "docs" / "probe.md", text)
    assert found == ["no-such.md", "../shared/DESIGN.md", "client/no_such_module.py",
                     "shared/glm.Nope.x", "docs/NOPE.md"]


def _site_yaml_section() -> str:
    text = (ROOT / "docs" / "SITE.md").read_text(encoding="utf-8")
    match = re.search(r"^## site\.yaml\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "docs/SITE.md has no '## site.yaml' section"
    return match.group(1)


def documented_keys() -> list[str]:
    """The first cell of every table row of docs/SITE.md's site.yaml section."""
    return [m.group(1) for m in re.finditer(r"^\| `([a-z_.]+)` \|", _site_yaml_section(), re.M)]


def declared_keys() -> set[str]:
    """Every key a site.yaml may hold, nested ones dotted (`privacy.require_dp.max_epsilon`)."""
    keys = set(site_config.CONFIG_KEYS)
    keys |= {f"privacy.{f.name}" for f in fields(PrivacyPolicy)}
    keys |= {f"privacy.require_dp.{f.name}" for f in fields(DPRequirement)}
    # a key whose value is a mapping declares its own keys beside it (`clinical_csv:`)
    for key in site_config.CONFIG_KEYS:
        nested = getattr(site_config, f"{key.upper()}_KEYS", None)
        if isinstance(nested, dict):
            keys |= {f"{key}.{name}" for name in nested}
    return keys


def test_site_md_lists_every_site_yaml_key_once_and_no_other() -> None:
    documented = documented_keys()
    assert len(documented) == len(set(documented)), "a key is listed twice"
    declared = declared_keys()
    assert sorted(declared - set(documented)) == [], "declared but not in docs/SITE.md"
    assert sorted(set(documented) - declared) == [], "in docs/SITE.md but not declared"
