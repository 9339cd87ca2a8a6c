"""SimpleITK reads truncated NIfTI files without error: the check that the data is all there.

Imports only the standard library and numpy (the extraction workers use it).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np


class TruncatedImage(Exception):
    """A NIfTI file whose data is not all there; the message says how."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_nifti_complete(path: Path, *, thorough: bool) -> None:
    """SimpleITK reads truncated NIfTI files without error; check the data is all there.

    Uncompressed: file size. Gzip: the trailer's length field (cheap), and with `thorough`
    (or when the trailer disagrees) a full decompression, which also checks the CRC.
    """
    compressed = path.name.endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as stream:
            expected = _nifti_total_bytes(stream.read(540))
    except EOFError:
        raise TruncatedImage("file is truncated (compressed stream ends early)") from None
    except (OSError, zlib.error) as error:
        raise TruncatedImage(f"corrupt file ({one_line(error)})") from None
    if expected is None:
        return  # not a header we understand; SimpleITK accepted it
    if not compressed:
        actual = path.stat().st_size
    elif not thorough and _gzip_trailer_size(path) == expected % 2**32:
        return
    else:
        actual = _gunzipped_size(path)
    if actual < expected:
        raise TruncatedImage(f"file is truncated ({actual} of {expected} bytes)")


def _nifti_total_bytes(header: bytes) -> int | None:
    """vox_offset + data bytes from a NIfTI-1/2 header, or None if not a NIfTI header."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = max(struct.unpack(endian + "q", header[168:176])[0], 544)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]]))
    return offset + voxels * bitpix // 8


def _gzip_trailer_size(path: Path) -> int:
    with path.open("rb") as handle:
        handle.seek(-4, 2)
        return struct.unpack("<I", handle.read(4))[0]


def _gunzipped_size(path: Path) -> int:
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    except EOFError:
        raise TruncatedImage("file is truncated (compressed stream ends early)") from None
    except (OSError, zlib.error) as error:
        raise TruncatedImage(f"corrupt compressed data ({one_line(error)})") from None
    return total
