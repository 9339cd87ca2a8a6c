"""Write the documents derived from declarations: from shared/settings.py the
`[tool.flwr.app.config]` table of pyproject.toml and the README's run-config tables (between
`<!-- settings:<table> -->` and `<!-- /settings:<table> -->`); from shared/queries
docs/QUERIES.md, every query a site answers and each parameter's type, bound and meaning.
`make settings` runs it; tests/test_settings.py fails when a file is out of date."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from shared import queries, settings
from shared.queries.params import Param

ROOT = Path(__file__).resolve().parent.parent
_TOML_TABLE = re.compile(r"^\[tool\.flwr\.app\.config\]\n.*?(?=^\[|\Z)", re.M | re.S)


def readme_block(table: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- settings:{table} -->\n).*?(<!-- /settings:{table} -->)", re.S)


def pyproject_text(text: str) -> str:
    """pyproject.toml with its app-config table regenerated."""
    if not _TOML_TABLE.search(text):
        raise ValueError("pyproject.toml has no [tool.flwr.app.config] table followed by "
                         "another table")
    return _TOML_TABLE.sub(lambda m: settings.toml_block() + ("" if m.end() == len(text)
                                                              else "\n"), text, count=1)


def readme_text(text: str) -> str:
    """README.md with each run-config table regenerated."""
    for table in settings.TABLES:
        pattern = readme_block(table)
        if not pattern.search(text):
            raise ValueError(f"README.md has no <!-- settings:{table} --> block")
        text = pattern.sub(lambda m, t=table: m.group(1) + settings.markdown_table(t)
                           + m.group(2), text, count=1)
    return text


QUERIES_INTRO = """# Queries a site answers

Generated from `shared/queries/` by `make settings`; do not edit by hand.

The coordinator is not trusted: before a site computes anything, it checks each query
against its action's declaration below. A key that is not declared is refused (the whole
query, audited), and so is a value of another type or outside its bound. The bounds that
depend on the site's own data and policy — how steep a point, how fine a grid, how much
memory — are checked next by the stage (`shared/queries/bounds.py`). *Family*: whether the
value of a released statistic depends on the key, so that it is part of the statistic's
family in the site's disclosure ledger (a key marked *no* cannot make a fresh family; *rows*
chooses the patients, which the ledger compares as sets). `*` in a key stands for a name
(dots allowed).
"""


def _bound(p: Param) -> str:
    parts = []
    if p.lo is not None or p.hi is not None:
        lo = "−∞" if p.lo is None else f"{p.lo:g}"
        hi = "∞" if p.hi is None else f"{p.hi:g}"
        parts.append(f"[{lo}, {hi}]")
    if p.max_items is not None:
        parts.append(f"≤ {p.max_items:,} items")
    if p.choices is not None:
        parts.append(" \\| ".join(f"`{c}`" if c != "" else "`''`" for c in p.choices))
    if p.pattern is not None:
        parts.append(f"form `{p.pattern.replace('|', '¦')}`")
    return "; ".join(parts) or "—"


def queries_text() -> str:
    """docs/QUERIES.md: one table per action."""
    out = [QUERIES_INTRO]
    for action, declaration in sorted(queries.QUERIES.items()):
        out += [f"\n## `{action}`\n", "| key | type | bound | family | meaning |",
                "|---|---|---|---|---|"]
        for p in declaration.params:
            family = "rows" if p.rows else ("yes" if p.value else "no")
            out.append(f"| `{p.key}` | {p.type} | {_bound(p)} | {family} | "
                       f"{p.meaning.replace('|', '¦')} |")
    return "\n".join(out) + "\n"


def main() -> int:
    (ROOT / "docs" / "QUERIES.md").write_text(queries_text(), encoding="utf-8")
    for name, render in (("pyproject.toml", pyproject_text), ("README.md", readme_text)):
        path = ROOT / name
        old = path.read_text(encoding="utf-8")
        new = render(old)
        if new != old:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
