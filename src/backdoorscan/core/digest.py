"""Content digests (torch-free): what a report names a model by, and what the result cache keys on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def sha256_file(path: Path, deadline: float | None = None) -> str:
    """Hex sha256 of a file, read in chunks; past `deadline` (time.monotonic) the hashing stops with a ScanError."""
    import time

    from .errors import ScanError

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            if deadline is not None and time.monotonic() > deadline:
                raise ScanError("hashing the file ran past --timeout", path=path)
    return digest.hexdigest()


def files_digest(root: Path, files: Iterable[Path], deadline: float | None = None) -> str:
    """sha256 over files' names (relative to root) and contents, in sorted order."""
    digest = hashlib.sha256()
    for f in sorted(files):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + sha256_file(f, deadline).encode() + b"\n")
    return digest.hexdigest()


def tree_digest(path: Path) -> str:
    """sha256 of a file, or of every regular file below a folder (names and contents)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return files_digest(path, (p for p in path.rglob("*") if p.is_file()))
