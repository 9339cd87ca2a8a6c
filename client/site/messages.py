"""How site problems word files and errors: a `Problem` naming its site, file and patient,
paths relative to the site folder, a folder shown with its trailing `/`, SimpleITK exceptions
cut to their useful line, any error on one line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One problem with a site folder (or a note of what loading did), always naming where
    it is."""

    site: str
    file: str
    patient: str | None
    message: str

    def __str__(self) -> str:
        return self._where() + self.message

    def as_note(self) -> str:
        """The line of a note (not a problem), as check-site prints it and site.log keeps it."""
        return self._where() + f"note: {self.message}"

    def _where(self) -> str:
        where = f"{self.site}: {self.file}: "
        if self.patient is not None:
            where += f"patient {self.patient}: "
        return where


def shown_name(path: Path) -> str:
    return path.name + "/" if path.is_dir() else path.name


def site_relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def sitk_message(error: RuntimeError) -> str:
    """The useful last line of a SimpleITK exception, without source-file noise."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[-1] if lines else "unknown SimpleITK error"
    message = re.sub(r"^(sitk::ERROR|ITK ERROR):\s*", "", message)
    return re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", message)


def tidy(message: str, root: Path) -> str:
    """Absolute site paths in a message shown relative to the site folder."""
    return message.replace(str(root) + "/", "").replace(str(root.resolve()) + "/", "")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
