"""Inputs are never modified: no output (copies, reports, UAP files) may be written inside an input folder."""

from __future__ import annotations

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
