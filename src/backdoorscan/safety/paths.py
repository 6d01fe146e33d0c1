"""Outputs are checked before a scan starts: never inside an input folder (inputs are never modified), and writable,
so that a verdict is never lost to a bad output path after minutes of scanning."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import ScanError


def inside(target: str | Path, folder: str | Path) -> bool:
    """Whether `target` is `folder` or lies below it (symbolic links resolved); False when `folder` is a file."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    root, path = folder.resolve(), Path(target).resolve()
    return path == root or root in path.parents


def ensure_outside(target: str | Path | None, *inputs: str | Path | None) -> None:
    """Refuse an output location inside any input folder (a `.npz` or an image file has no inside)."""
    if target is None:
        return
    for folder in inputs:
        if folder is not None and inside(target, folder):
            raise ScanError(
                "refusing to write inside the input",
                path=target,
                hint=f"choose a location outside {folder}; inputs are never modified",
            )


def ensure_writable(target: str | Path | None, *, folder: bool = False) -> None:
    """Refuse an output that cannot be written: a folder where a file is wanted (or the reverse), an unwritable
    file, or a missing parent that cannot be created."""
    if target is None:
        return
    path = Path(target)
    kind = "folder" if folder else "file"
    if path.exists():
        if path.is_dir() != folder:
            raise ScanError(f"is a {'folder' if path.is_dir() else 'file'}, not a {kind}", path=path)
        if not os.access(path, os.W_OK):
            raise ScanError(f"the output {kind} is not writable", path=path)
        return
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ScanError(f"cannot create the output {kind}: {parent} is not a folder", path=path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScanError(f"cannot create the output {kind}: {parent} is not writable", path=path)


def check_outputs(
    files: list[Path | None], folders: list[Path | None], inputs: list[Path | None], writable: bool = True
) -> None:
    """Every output, before the model is loaded: outside the inputs and (`writable`: where this process writes the
    outputs itself, not a sandboxed child) writable."""
    for target in [*files, *folders]:
        ensure_outside(target, *inputs)
    if not writable:
        return
    for target in files:
        ensure_writable(target)
    for target in folders:
        ensure_writable(target, folder=True)
