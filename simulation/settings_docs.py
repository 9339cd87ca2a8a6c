"""Write the run-config documents from shared/settings.py: the `[tool.flwr.app.config]`
table of pyproject.toml and the README's run-config tables (between
`<!-- settings:<table> -->` and `<!-- /settings:<table> -->`). `make settings` runs it;
tests/test_settings.py fails when either file is out of date."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from shared import settings

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


def main() -> int:
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
