"""Reading files named by a model folder or a user option: bounded by the bytes actually read, never by the size a
file reports (procfs and device files report 0 or lie), regular files only, and no link out of a model's folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..core.errors import ScanError


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """At most `limit` bytes of a regular file; a file with more is refused, whatever `st_size` says."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        raise ScanError(f"{what} not found", path=path) from exc
    except OSError as exc:
        raise ScanError(f"cannot read the {what} ({exc.strerror})", path=path) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ScanError(f"refused: the {what} is not a regular file", path=path)
        chunks, got = [], 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    if got > limit:
        raise ScanError(f"refused: the {what} is larger than {_size(limit)}", path=path)
    return b"".join(chunks)


def read_text_bounded(path: Path, limit: int, what: str) -> str:
    """`read_bounded` as UTF-8 text."""
    try:
        return read_bounded(path, limit, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScanError(f"the {what} is not UTF-8 text", path=path) from exc


def inside_folder(path: Path, folder: Path) -> Path:
    """`path` (a member of a model folder) resolved; refused when it is a link that leaves the folder, or not a
    regular file."""
    root = Path(folder).resolve()
    resolved = Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise ScanError(f"refused: {Path(path).name} is a link that leaves the model folder", path=path)
    if not resolved.is_file():
        raise ScanError(f"refused: {Path(path).name} is not a regular file", path=path)
    return resolved


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1 << 10 else f"{n} bytes"
