"""Files a query may name at a site: only inside folders the site chose.

The coordinator is not trusted, and a path in a query is hostile input. A name it sends is
looked up only inside the site's own folders (its site folder; for pretrained weights also
the `pretrained_dir` of its site.yaml): relative to one of them, or absolute and inside one
of them, never through `..` or a link that leads out, and only as a regular file with one
of the allowed suffixes. A name that leads outside is refused with one message that does
not depend on whether the file exists (no existence oracle) and is never opened; errors
name the file as the query did, never the site's own absolute layout, and never echo its
content. Reads are bounded (`read_bounded`), so a device file or a huge file costs nothing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from shared.queries import QueryRejected

MAX_NAME = 1024  # characters of a file name in a query


class SiteFileRefused(QueryRejected):
    """A file a query named that the site does not open (outside its folders, not a regular
    file, too large): the query is refused (and audited). The message names the query's own
    string, never the site's layout or the file's content."""


class SiteFileMissing(ValueError):
    """The file a query named, inside the site's folders, is not there (the query fails)."""


def site_file(name: str, folders: Sequence[Path], suffixes: Sequence[str], what: str,
              max_bytes: int | None = None) -> Path:
    """The regular file `name` names inside one of `folders` (its real path); else
    SiteFileRefused, or SiteFileMissing for a name inside them that is not there. Relative
    names are tried in each folder in order."""
    # one answer for every name the site does not open: decided from the name (and the
    # site's own links), so it says nothing of what lies outside
    outside = SiteFileRefused(f"{what}: not a {' / '.join(suffixes)} file inside this site's "
                              "folder (a query may name only files the site keeps for it)")
    pure = PurePosixPath(name)
    if (not name or len(name) > MAX_NAME or "\x00" in name or "\\" in name
            or ".." in pure.parts or pure.suffix.lower() not in suffixes):
        raise outside
    candidates = [c for c in (_inside(pure, Path(f)) for f in folders) if c is not None]
    if not candidates:
        raise outside
    for base, candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if not real.is_relative_to(base):  # a link leads out: the same answer as outside
            raise outside
        found = _regular(real, name, what, max_bytes)
        if found is not None:
            return found
    raise SiteFileMissing(f"{what} {name!r} is missing at this site")


def read_bounded(path: Path, max_bytes: int, what: str) -> bytes:
    """At most `max_bytes` of a regular file, or SiteFileRefused (never a longer read)."""
    with path.open("rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise SiteFileRefused(f"{what}: not a regular file")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SiteFileRefused(f"{what}: larger than {max_bytes:,} bytes")
    return data


def _inside(pure: PurePosixPath, folder: Path) -> tuple[Path, Path] | None:
    """(the folder's real path, the name within it), or None when an absolute name lies
    outside the folder. Decided from the name alone: nothing is opened."""
    real = Path(os.path.realpath(folder))
    if not pure.is_absolute():
        return real, real / pure
    for base in dict.fromkeys((Path(os.path.abspath(folder)), real)):
        if Path(pure).is_relative_to(base):
            return real, real / Path(pure).relative_to(base)
    return None


def _regular(real: Path, name: str, what: str, max_bytes: int | None) -> Path | None:
    """The file when it is a regular file within the size bound; None when it is missing."""
    try:
        info = real.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        raise SiteFileRefused(f"{what} {name!r}: unreadable at this site") from None
    if not stat.S_ISREG(info.st_mode):
        raise SiteFileRefused(f"{what} {name!r}: not a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise SiteFileRefused(f"{what} {name!r}: larger than {max_bytes:,} bytes")
    return real
