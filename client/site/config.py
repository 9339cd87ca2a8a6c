"""A site's site.yaml: the keys it may hold, `SiteConfig`, and its parsing into one, with a
problem message for every bad key or value."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from client.site.messages import one_line
from shared.policy import PolicyError, PrivacyPolicy

ROLES = ("train", "external", "survival")
TIME_UNITS = ("days", "months", "years")
FREE_FORM_KEYS = ("scanner", "description", "contact")
CONFIG_KEYS = ("site_id", "roles", "time_unit", "privacy", "pretrained_dir", "mask_label",
               "clinical_csv", *FREE_FORM_KEYS)
SITE_ID_PATTERN = re.compile(r"^[a-z0-9-]+$")

SITE_YAML = "site.yaml"

# `clinical_csv:` — how the site's export tool writes clinical.csv (docs/SITE.md,
# "clinical.csv"); every key optional, the defaults are the plain CSV of the simulator
SEPARATORS = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
DECIMAL_MARKS = (".", ",")
CLINICAL_CSV_KEYS = {
    "separator": "the field separator: ',' (default), ';', a tab or '|'",
    "decimal": "the decimal mark of numbers: '.' (default) or ','",
    "encoding": "the text encoding (default utf-8, a byte-order mark accepted), e.g. cp1252",
    "missing": "texts that mean a missing value besides the built-in ones (a list)",
}


@dataclass(frozen=True)
class CsvFormat:
    """How clinical.csv is written: separator, decimal mark, encoding, missing-value words."""

    separator: str = ","
    decimal: str = "."
    encoding: str = "utf-8"
    missing: tuple[str, ...] = ()

    def setting(self, **changes: str) -> str:
        """The site.yaml line that declares `changes` (e.g. separator=';')."""
        shown = ", ".join(f"{k}: {_yaml_text(v)}" for k, v in changes.items())
        return f"clinical_csv: {{{shown}}}"


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    roles: tuple[str, ...]
    time_unit: str
    privacy: PrivacyPolicy
    # where the site keeps pretrained weights besides its site folder (absolute, or relative
    # to the site folder); a query's `pretrained` names files there or in the site folder
    pretrained_dir: Path | None = None
    # the mask value that is tumour; None: every non-zero voxel (client/site/image_pair.py)
    mask_label: int | None = None
    # how clinical.csv is written (separator, decimal mark, encoding, missing-value words)
    clinical_csv: CsvFormat = field(default_factory=CsvFormat)


_Report = Callable[[str], None]  # records one problem message


def parse_config(root: Path) -> tuple[SiteConfig | None, list[str]]:
    """site.yaml as a SiteConfig (None when it has a problem), and every problem message."""
    problems: list[str] = []
    problem: _Report = problems.append
    path = root / SITE_YAML
    if not path.is_file():
        problem("missing (every site folder needs site.yaml)")
        return None, problems
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        problem(f"cannot parse YAML: {one_line(error)}")
        return None, problems
    if not isinstance(raw, dict):
        problem("must be a mapping with site_id, roles, time_unit and privacy")
        return None, problems

    for key in sorted(set(map(str, raw)) - set(CONFIG_KEYS)):
        problem(f"unknown key {key!r}; known: {', '.join(CONFIG_KEYS)}")
    site_id = _config_site_id(raw.get("site_id"), problem)
    roles = _config_roles(raw.get("roles"), problem)
    time_unit = _config_time_unit(raw.get("time_unit"), problem)
    privacy = _config_privacy(raw.get("privacy"), problem)
    weights = _config_pretrained_dir(raw.get("pretrained_dir"), root, problem)
    mask_label = _config_mask_label(raw.get("mask_label"), problem)
    csv_format = _config_clinical_csv(raw.get("clinical_csv"), problem)
    if problems or site_id is None or roles is None or time_unit is None or privacy is None:
        return None, problems
    return SiteConfig(site_id, roles, time_unit, privacy, weights, mask_label,
                      csv_format), problems


def _config_clinical_csv(value: Any, problem: _Report) -> CsvFormat:
    """clinical.csv's declared format; the defaults where a key is left out."""
    if value is None:
        return CsvFormat()
    if not isinstance(value, dict):
        problem(f"clinical_csv must be a mapping with any of {', '.join(CLINICAL_CSV_KEYS)}; "
                f"got {value!r}")
        return CsvFormat()
    for key in sorted(set(map(str, value)) - set(CLINICAL_CSV_KEYS)):
        problem(f"clinical_csv: unknown key {key!r}; known: {', '.join(CLINICAL_CSV_KEYS)}")
    default = CsvFormat()
    separator = value.get("separator", default.separator)
    decimal = value.get("decimal", default.decimal)
    encoding = value.get("encoding", default.encoding)
    missing = value.get("missing", [])
    if separator not in SEPARATORS:
        problem(f"clinical_csv.separator {separator!r} is not one of "
                f"{', '.join(SEPARATORS.values())}")
    if decimal not in DECIMAL_MARKS:
        problem(f"clinical_csv.decimal {decimal!r} is not '.' or ','")
    elif decimal == separator:
        problem(f"clinical_csv: decimal {decimal!r} is also the separator")
    if not isinstance(encoding, str) or not _is_encoding(encoding):
        problem(f"clinical_csv.encoding {encoding!r} is not an encoding Python knows "
                "(e.g. utf-8, cp1252, latin-1, utf-16)")
    if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        problem(f"clinical_csv.missing must be a list of texts, e.g. ['#N/A', unknown]; "
                f"got {missing!r}")
        missing = []
    return CsvFormat(str(separator), str(decimal), str(encoding),
                     tuple(m.strip() for m in missing))


def _is_encoding(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _yaml_text(value: str) -> str:
    """A value as site.yaml needs it written (a tab as "\\t", punctuation quoted)."""
    return '"\\t"' if value == "\t" else (value if value.isalnum() or "-" in value
                                           else f"'{value}'")


def _config_mask_label(value: Any, problem: _Report) -> int | None:
    """The mask value that is tumour (a mask holding several structures); None: every
    non-zero voxel is tumour."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problem(f"mask_label must be a positive integer (the mask value that is tumour; "
                f"leave it out to take every non-zero voxel); got {value!r}")
        return None
    return value


def _config_site_id(value: Any, problem: _Report) -> str | None:
    if value is None:
        problem("site_id is missing")
    elif not isinstance(value, str) or not SITE_ID_PATTERN.match(value):
        problem(f"site_id {value!r} must match {SITE_ID_PATTERN.pattern} (lowercase, digits, -)")
    else:
        return value
    return None


def _config_roles(value: Any, problem: _Report) -> tuple[str, ...] | None:
    if value is None:
        problem(f"roles is missing (a list of any of: {', '.join(ROLES)})")
        return None
    if not isinstance(value, list) or not value:
        problem(f"roles must be a non-empty list, e.g. [train]; got {value!r}")
        return None
    unknown = [role for role in value if role not in ROLES]
    if unknown:
        problem(f"unknown role(s) {unknown}; known: {', '.join(ROLES)}")
        return None
    if "train" in value and "external" in value:
        problem("roles cannot hold both train and external (external sites are never fitted on)")
        return None
    return tuple(dict.fromkeys(value))


def _config_time_unit(value: Any, problem: _Report) -> str | None:
    if value not in TIME_UNITS:
        shown = "is missing" if value is None else f"{value!r} is not allowed"
        problem(f"time_unit {shown}; one of: {', '.join(TIME_UNITS)}")
        return None
    return value


def _config_pretrained_dir(value: Any, root: Path, problem: _Report) -> Path | None:
    """The site's folder of pretrained weights (None: only the site folder)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        problem(f"pretrained_dir must be a folder path; got {value!r}")
        return None
    folder = Path(value.strip()).expanduser()
    return folder if folder.is_absolute() else root / folder


def _config_privacy(value: Any, problem: _Report) -> PrivacyPolicy | None:
    if value is not None and not isinstance(value, dict):
        problem(f"privacy must be a mapping; got {value!r}")
        return None
    try:
        return PrivacyPolicy.from_mapping(value)
    except (PolicyError, TypeError) as error:
        problem(f"privacy: {error}")
        return None
