"""Reading files named by a model folder or a user option: bounded by the bytes actually read, never by the size a
file reports (procfs and device files report 0 or lie), regular files only, and no link out of a model's folder."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import ScanError


def read_chunks(path: Path, limit: int, what: str, nofollow: bool = False) -> Iterator[bytes]:
    """A regular file's bytes in chunks of at most 1 MiB, refused once more than `limit` have been read, whatever
    `st_size` says. `nofollow`: a link is refused rather than followed."""
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
        got = 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - got)):
            got += len(chunk)
            if got > limit:
                raise ScanError(f"refused: the {what} is larger than {_size(limit)}", path=path)
            yield chunk
    finally:
        os.close(fd)


def read_bounded(path: Path, limit: int, what: str, nofollow: bool = False) -> bytes:
    """At most `limit` bytes of a regular file (`read_chunks`) in one piece."""
    return b"".join(read_chunks(path, limit, what, nofollow))


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


def list_tree_bounded(folder: Path, max_files: int | None = None) -> list[str]:
    """The relative names of a folder's regular files, as a scanning child left them, read by the parent: a link
    or a device anywhere is refused, hidden names (staging leftovers) skipped, at most `max_files` (default
    OUTPUT_FILES) names."""
    folder = Path(folder)
    cap = OUTPUT_FILES if max_files is None else max_files
    names: list[str] = []
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
                if not entry.is_file(follow_symlinks=False):
                    raise ScanError(f"refused: the scanning process left a special file ({rel})", path=folder)
                if len(names) >= cap:
                    raise ScanError(f"refused: the scanning process left more than {cap} files", path=folder)
                names.append(rel)
    return sorted(names)


def read_tree_bounded(folder: Path, limit: int | None = None, max_files: int | None = None) -> dict[str, bytes]:
    """A folder written by a scanning child, read by the parent (`list_tree_bounded`'s files): at most `limit`
    bytes in all (default OUTPUT_LIMIT; bytes read, not sizes reported)."""
    folder = Path(folder)
    left = OUTPUT_LIMIT if limit is None else limit
    out: dict[str, bytes] = {}
    for rel in list_tree_bounded(folder, max_files):
        data = read_bounded(folder / rel, left, "report file", nofollow=True)
        left -= len(data)
        out[rel] = data
    return out


def copy_bounded(src: Path, dst: Path, limit: int, what: str) -> int:
    """Stream a regular file (a link is refused, not followed) to `dst`, at most `limit` bytes (`read_chunks`); the
    bytes copied. Memory stays one chunk whatever the size."""
    got = 0
    with open(dst, "wb") as out:
        for chunk in read_chunks(src, limit, what, nofollow=True):
            out.write(chunk)
            got += len(chunk)
    return got
