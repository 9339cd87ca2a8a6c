"""clinical.csv as the site's export tool writes it: read with the format site.yaml declares
(`clinical_csv`: separator, decimal mark, encoding, missing-value words), a format proposed
when the file does not read as declared, and its cells made plain — numbers with a decimal
point, missing values empty, the levels of a text column in one spelling — with a message
for every cell that cannot be (docs/SITE.md, "clinical.csv").

A column is *numeric* when more than half of its non-missing values are numbers (in either
decimal mark): each other value of it is a bad cell, named with its patient, and a number
in the undeclared decimal mark is a site-level problem naming the setting to declare. Any
other column is *text*: its values are lower-cased with runs of spaces made one, so
`Positive` and `positive ` are one level, and the mapping is said. A covariate column
without one value is dropped, with a note: the site does not have it.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from client.site.config import SEPARATORS, CsvFormat
from client.site.messages import one_line
from shared.labels import is_missing

# columns read by their own parsers (labels, survival): numbers made plain, never a level
LABEL_COLUMNS = ("her2_ihc", "her2_ish", "label", "dfs_time", "dfs_event")
_NUMBER = {".": re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"),
           ",": re.compile(r"^[+-]?(\d+(,\d*)?|,\d+)([eE][+-]?\d+)?$")}
# a number in the other decimal mark: digits on both sides of it
_OTHER_MARK = {".": re.compile(r"^[+-]?\d+,\d+$"), ",": re.compile(r"^[+-]?\d+\.\d+$")}
_MARK_NAMES = {".": "decimal points", ",": "decimal commas"}


@dataclass
class Cells:
    """What making clinical.csv's cells plain found."""

    numeric: set[str] = field(default_factory=set)  # the numeric columns
    site_problems: list[str] = field(default_factory=list)
    bad_cells: list[tuple[str, str]] = field(default_factory=list)  # (patient, message)
    notes: list[str] = field(default_factory=list)  # levels normalized


def read_clinical(path: Path, fmt: CsvFormat) -> tuple[pd.DataFrame | None, str | None]:
    """clinical.csv as stripped text, or None and why (with the format it looks like)."""
    if not path.is_file():
        return None, "missing"
    try:
        table = pd.read_csv(path, sep=fmt.separator, dtype=str, keep_default_na=False,
                            encoding=_python_encoding(fmt.encoding))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError) as error:
        return None, _not_as_declared(path, fmt, one_line(error))
    table.columns = [str(column).strip() for column in table.columns]
    if len(table.columns) == 1:  # a file in another separator reads as one column
        proposal = sniff(path, fmt)
        if "separator" in proposal:
            return None, _not_as_declared(path, fmt, f"one column {table.columns[0]!r}")
    return table.apply(lambda column: column.str.strip()), None


def sniff(path: Path, fmt: CsvFormat) -> dict[str, str]:
    """The format settings the file looks written in, where they differ from `fmt`: its
    encoding (a byte-order mark, else UTF-8 if it decodes, else cp1252), its separator
    (csv.Sniffer) and its decimal mark (numbers with a comma, when ',' separates no field)."""
    data = path.read_bytes()
    found = {"encoding": _sniff_encoding(data)}
    text = data.decode(_python_encoding(found["encoding"]), errors="replace")
    lines = [line for line in text.splitlines() if line.strip()][:50]
    try:
        found["separator"] = csv.Sniffer().sniff("\n".join(lines),
                                                 delimiters="".join(SEPARATORS)).delimiter
    except csv.Error:  # no consistent one: the candidate most frequent in the header
        header = lines[0] if lines else ""
        found["separator"] = max(SEPARATORS, key=header.count)
    if found["separator"] != ",":
        cells = (cell.strip().strip('"') for line in lines[1:]
                 for cell in line.split(found["separator"]))
        found["decimal"] = "," if any(_OTHER_MARK["."].match(c) for c in cells) else "."
    declared = {"encoding": _encoding_name(fmt.encoding), "separator": fmt.separator,
                "decimal": fmt.decimal}
    return {k: v for k, v in found.items() if v != declared[k]}


def plain_cells(raw: pd.DataFrame, fmt: CsvFormat) -> Cells:
    """Make `raw`'s cells plain in place (see the module's doc); what was found."""
    cells = Cells()
    words = {word.lower() for word in fmt.missing}
    patients = raw["patient_id"] if "patient_id" in raw.columns else None
    empty: list[str] = []
    for column in list(raw.columns):
        if column == "patient_id":
            continue
        values = raw[column]
        missing = values.map(lambda v: is_missing(v) or v.lower() in words)
        values = values.where(~missing, "")
        raw[column] = _plain_column(column, values, fmt, patients, cells)
        if len(values) and missing.all() and column not in LABEL_COLUMNS:
            empty.append(column)
    # a covariate without one value is one the site does not have (neither numeric nor
    # text): the stages treat it as absent, as if the export had left the column out
    raw.drop(columns=empty, inplace=True)
    cells.notes += [f"column {column!r}: every value missing; read as a column the site "
                    "does not have" for column in empty]
    return cells


def _plain_column(column: str, values: pd.Series, fmt: CsvFormat, patients: pd.Series | None,
                  cells: Cells) -> pd.Series:
    present = values[values != ""]
    number = present.map(lambda v: bool(_NUMBER[fmt.decimal].match(v)))
    other = present.map(lambda v: bool(_OTHER_MARK[fmt.decimal].match(v)))
    if other.any():
        first = other.idxmax()
        who = f"patient {patients[first]}" if patients is not None else f"line {first + 2}"
        mark = "," if fmt.decimal == "." else "."
        cells.site_problems.append(
            f"column {column!r}: {int(other.sum())} values use {mark!r} as the decimal mark "
            f"({who}: {present[first]!r}), but site.yaml's clinical_csv declares decimal "
            f"{fmt.decimal!r}; declare {fmt.setting(decimal=mark)} if the file uses "
            f"{_MARK_NAMES[mark]}")
    if column in LABEL_COLUMNS:
        return _decimal_points(values, fmt)
    if 2 * int((number | other).sum()) > len(present):
        cells.numeric.add(column)
        for index in present.index[~(number | other)]:
            if patients is not None and patients[index]:
                cells.bad_cells.append((patients[index], (
                    f"{column} {present[index]!r} is not a number (the column is numeric: "
                    f"{int(number.sum())} of {len(present)} values are numbers); declare it "
                    "in clinical_csv.missing if it means missing")))
        values = _decimal_points(values, fmt)
        return values.where(values.map(lambda v: v == "" or bool(_NUMBER["."].match(v))), "")
    if number.any():  # a kind decided by a minority of numbers is said, never silent
        cells.notes.append(
            f"column {column!r}: read as text, each value a level ({int(number.sum())} of "
            f"{len(present)} values are numbers; declare the other values in "
            "clinical_csv.missing if they mean missing)")
    plain = values.map(lambda v: " ".join(v.split()).lower())
    changed = Counter((v, p) for v, p in zip(values, plain, strict=True) if v != p)
    if changed:
        cells.notes.append(f"column {column!r}: levels normalized (case, spaces): " + ", ".join(
            f"{v!r} -> {p!r} ({n})" for (v, p), n in sorted(changed.items())))
    return plain


def _decimal_points(values: pd.Series, fmt: CsvFormat) -> pd.Series:
    """63,5 -> 63.5 where the decimal mark is ',': one spelling for every reader after this
    (a text column keeps its levels as written)."""
    if fmt.decimal != ",":
        return values
    return values.map(lambda v: v.replace(",", ".") if _NUMBER[","].match(v) else v)


def _not_as_declared(path: Path, fmt: CsvFormat, what: str) -> str:
    shown = (f"separator {SEPARATORS[fmt.separator]}, decimal {fmt.decimal!r}, "
             f"encoding {fmt.encoding}")
    message = f"cannot read CSV as declared ({shown}): {what}"
    proposal = sniff(path, fmt)
    if proposal:
        order = {k: proposal[k] for k in ("separator", "decimal", "encoding") if k in proposal}
        looks = ", ".join(f"{k} {_shown(k, v)}" for k, v in order.items())
        message += f"; it looks like {looks}: declare in site.yaml {fmt.setting(**order)}"
    return message


def _shown(key: str, value: str) -> str:
    return {"separator": SEPARATORS.get(value, repr(value)), "decimal": repr(value)}.get(
        key, value)


def _sniff_encoding(data: bytes) -> str:
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8"


def _encoding_name(name: str) -> str:
    """utf_8, UTF8, utf-8-sig: utf-8 (one name per codec, for comparing)."""
    canonical = codecs.lookup(name).name
    return "utf-8" if canonical in ("utf-8", "utf-8-sig") else canonical


def _python_encoding(name: str) -> str:
    """The codec to read with: UTF-8 accepts a byte-order mark (as Excel writes one)."""
    return "utf-8-sig" if _encoding_name(name) == "utf-8" else name
