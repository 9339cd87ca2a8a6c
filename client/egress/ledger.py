"""The site's disclosure ledger: every statistic it has released, by family and patient set.

Kept in `<site>/audit/disclosures.sqlite` (never sent; it outlives runs, so a re-run over a
slightly changed cohort is compared with the earlier run). Before a release the egress guard
asks `check`: a statistic whose patient set S differs from an earlier released set T of the
same family (`shared.disclosure`) by 0 < |S Δ T| < the policy's `min_difference` is refused.
Statistics about columns (one value per feature) also record their column set; two of them
are compared only when their columns overlap, so asking a fold's sums over other columns
does not get around the rule.

The patient numbering (bit i ↔ a patient id) is the ledger's own and only grows, so sets
from earlier runs stay comparable after patients leave or join the site's table.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared import disclosure

LEDGER_FILE = "disclosures.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (id TEXT PRIMARY KEY, bit INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS releases (
    family TEXT NOT NULL, columns BLOB, members BLOB NOT NULL, grid BLOB,
    n INTEGER NOT NULL, action TEXT NOT NULL, run_id TEXT NOT NULL, time TEXT NOT NULL,
    UNIQUE (family, columns, members, grid));
CREATE INDEX IF NOT EXISTS releases_family ON releases (family);
"""


@dataclass(frozen=True)
class Release:
    """One statistic about to leave: its family, patient ids, (optional) column numbers and
    (optional) grid: a bin width or the edges its counts are on."""

    name: str
    family: str
    patients: Sequence[str]
    columns: Sequence[int] | None = None
    grid: float | np.ndarray | None = None


@dataclass
class Checked:
    """The ledger's answer for one message: a refusal reason per refused statistic, how
    many statistics it compared, and (set by the guard) how many computed from patients
    named none, so could not be compared."""

    refused: dict[str, str]
    checked: int
    seconds: float
    unchecked: int = 0


class DisclosureLedger:
    def __init__(self, path: Path, min_difference: int) -> None:
        self.path = Path(path)
        self.min_difference = int(min_difference)

    def release(self, releases: Sequence[Release], action: str, run_id: str) -> Checked:
        """Check every release against the earlier ones (and those before it in this
        message) and record the ones not refused. A refused release is not recorded."""
        started = time.perf_counter()
        refused: dict[str, str] = {}
        if not releases:
            return Checked(refused, 0, 0.0)
        with self._connect() as db:
            bits = self._bits(db, {p for r in releases for p in r.patients})
            accepted: list[_Row] = []
            for r in releases:
                row = _Row(r.family, None if r.columns is None else disclosure.bitset(r.columns),
                           disclosure.bitset(bits[p] for p in r.patients),
                           None if r.grid is None else np.asarray(r.grid, dtype=np.float64))
                earlier = self._earlier(db, row) + [a for a in accepted if a.comparable(row)]
                reason = self._conflict(row, earlier)
                if reason is None:
                    accepted.append(row)
                else:
                    refused[r.name] = reason
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            db.executemany("INSERT OR IGNORE INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           [(*a.stored(), action, run_id, stamp) for a in accepted])
        return Checked(refused, len(releases), time.perf_counter() - started)

    def _conflict(self, row: _Row, earlier: list[_Row]) -> str | None:
        close = disclosure.too_close(row.members, [e.members for e in earlier],
                                     self.min_difference)
        if close is not None:
            # not by how many: that count of a few patients is itself below the threshold
            return (f"{disclosure.DIFFERS} by fewer than min_difference "
                    f"({self.min_difference}) patients")
        for e in earlier:
            if (row.grid is not None and e.grid is not None and row.members & e.members
                    and not disclosure.nested(row.grid, e.grid)):
                return (f"asks the same statistic over the same patients {disclosure.SHIFTS} "
                        f"({_grid_text(e.grid)} → {_grid_text(row.grid)}); "
                        "together they would show cells finer than either")
        return None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed when the block ends, rolled back on an error."""
        with _LOCK:
            db = _connection(self.path)
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    @staticmethod
    def _bits(db: sqlite3.Connection, ids: set[str]) -> dict[str, int]:
        known = dict(db.execute("SELECT id, bit FROM patients"))
        new = sorted(ids - set(known))
        start = max(known.values(), default=-1) + 1
        db.executemany("INSERT INTO patients VALUES (?, ?)",
                       [(p, start + i) for i, p in enumerate(new)])
        known.update({p: start + i for i, p in enumerate(new)})
        return known

    @staticmethod
    def _earlier(db: sqlite3.Connection, row: _Row) -> list[_Row]:
        rows = db.execute("SELECT family, columns, members, grid FROM releases "
                          "WHERE family = ?", (row.family,))
        return [e for e in map(_Row.loaded, rows) if e.comparable(row)]


@dataclass(frozen=True)
class _Row:
    family: str
    columns: int | None
    members: int
    grid: np.ndarray | None

    def comparable(self, other: _Row) -> bool:
        """Same family, and columns that overlap (or not column-wise)."""
        return self.family == other.family and _overlap(self.columns, other.columns)

    def stored(self) -> tuple:
        return (self.family, None if self.columns is None else _blob(self.columns),
                _blob(self.members), None if self.grid is None else self.grid.tobytes(),
                self.members.bit_count())

    @classmethod
    def loaded(cls, row: tuple) -> _Row:
        family, columns, members, grid = row
        values = None if grid is None else np.frombuffer(grid, dtype=np.float64)
        return cls(family, None if columns is None else _int(columns), _int(members),
                   None if values is None else (values if len(values) > 1 else values[0]))


def _grid_text(grid: np.ndarray) -> str:
    if np.ndim(grid) == 0:
        return f"bin {float(grid):g}"
    return f"{len(grid)} edges from {float(np.min(grid)):g}"


_LOCK = threading.Lock()
_OPEN: dict[tuple[str, int], tuple[sqlite3.Connection, tuple[int, int] | None]] = {}


def _connection(path: Path) -> sqlite3.Connection:
    """This process's connection to a ledger, kept open: closing the last connection to a
    write-ahead-logged database checkpoints and syncs it, which would cost every release
    a disk sync (a ClientApp process serves many messages in a simulation)."""
    key = (str(path), os.getpid())
    if key in _OPEN and _identity(path) != _OPEN[key][1]:  # the file was removed or replaced
        _OPEN.pop(key)[0].close()
    if key not in _OPEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        # write-ahead log, synced at checkpoints: a release costs no fsync of its own
        # (a power cut can lose the last releases' records, never corrupt the ledger)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if new:
            db.executescript(_SCHEMA)
        _OPEN[key] = (db, _identity(path))
    return _OPEN[key][0]


def _identity(path: Path) -> tuple[int, int] | None:
    """The ledger file as this process opened it: its inode, while its write-ahead log
    exists (it does as long as a connection is open, so a file removed and made again —
    which may get the same inode — has none until it is opened anew)."""
    try:
        stat = path.stat()
        Path(f"{path}-wal").stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _overlap(a: int | None, b: int | None) -> bool:
    return a is None or b is None or (a & b) != 0


def _blob(bits: int) -> bytes:
    return bits.to_bytes(max(1, (bits.bit_length() + 7) // 8), "little")


def _int(blob: bytes) -> int:
    return int.from_bytes(blob, "little")
