"""Reading files named by a model folder or a user option: bounded by the bytes actually read, never by the size a
file reports (procfs and device files report 0 or lie), regular files only, and no link out of a model's folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..core.errors import ScanError


def read_bounded(path: Path, limit: int, what: str, nofollow: bool = False) -> bytes:
    """At most `limit` bytes of a regular file; a file with more is refused, whatever `st_size` says. `nofollow`:
    a link is refused rather than followed."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if nofollow else 0))
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
    from .paths import inside

    resolved = Path(path).resolve()
    if not inside(resolved, folder):
        raise ScanError(f"refused: {Path(path).name} is a link that leaves the model folder", path=path)
    if not resolved.is_file():
        raise ScanError(f"refused: {Path(path).name} is not a regular file", path=path)
    return resolved


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1 << 10 else f"{n} bytes"


OUTPUT_LIMIT = 256 << 20  # bytes a scanning child may hand back as report files (reports are a few MB)
OUTPUT_FILES = 20_000  # files it may hand back


def plain_relative(name: str) -> bool:
    """A relative name below a folder: no absolute path, no `..`, no empty or hidden component."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p and p not in (".", "..") for p in parts)


def read_tree_bounded(folder: Path, limit: int = OUTPUT_LIMIT, max_files: int = OUTPUT_FILES) -> dict[str, bytes]:
    """A folder written by a scanning child, read by the parent: regular files only (a link or a device anywhere
    is refused), names plain, at most `limit` bytes in all (bytes read, not sizes reported) and `max_files` files.
    Hidden names (staging leftovers) are skipped."""
    folder = Path(folder)
    out: dict[str, bytes] = {}
    total = 0
    pending = [folder]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                rel = Path(entry.path).relative_to(folder).as_posix()
                if entry.is_symlink():
                    raise ScanError(f"refused: the scanning process left a link in its output ({rel})", path=folder)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                    continue
                if len(out) >= max_files:
                    raise ScanError(f"refused: the scanning process left more than {max_files} files", path=folder)
                data = read_bounded(Path(entry.path), limit - total, "report file", nofollow=True)
                total += len(data)
                out[rel] = data
    return dict(sorted(out.items()))
