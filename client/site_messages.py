"""How site problems word files and errors: paths relative to the site folder, a folder
shown with its trailing `/`, SimpleITK exceptions cut to their useful line, any error on one
line."""

from __future__ import annotations

import re
from pathlib import Path


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
