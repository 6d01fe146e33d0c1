"""One user-facing error type: what went wrong, with which file, and what to do about it (exit code 2)."""

from __future__ import annotations

import re
from enum import IntEnum
from pathlib import Path

from .escape import printable


class ScanError(Exception):
    """A problem with the user's input that stops a scan; the CLI prints it as one line and exits 2."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """`FILE: message (hint)` on a single line."""
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f" ({self.hint})"
        return printable(" ".join(text.split()))  # messages quote names from the file: no control characters


def missing_hint(path: str | Path) -> str:
    """What to do about a path that names nothing here: a URL or a hub id is not downloaded (the scanner reads local
    files only, and a CI gate should scan the bytes it will deploy), anything else is a path to check."""
    text = str(path)  # pathlib has folded "https://" to "https:/"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text):
        return "a URL: backdoorscan never downloads; download the file (or hub folder) and pass its local path"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not Path(text).suffix:
        return (
            "no such local path; if it is a hub id, download the model folder first (huggingface-cli download "
            f"{text} --local-dir DIR) and pass DIR"  # escaped with the rest of the line (one_line)
        )
    return "check the path"


class ExitCode(IntEnum):
    """The exit codes a CI can trust, named once: every command and report uses these."""

    CLEAN = 0  # the scan measured the model and found no backdoor (filter: nothing flagged)
    BACKDOOR = 1  # backdoor suspected (filter: images flagged)
    ERROR = 2  # could not scan: refused file, bad input, timeout, memory bound
    INCONCLUSIVE = 3  # the model loaded but could not be measured: never reported clean


INCONCLUSIVE_EXIT = ExitCode.INCONCLUSIVE


class Inconclusive(ScanError):
    """The model loaded but could not be measured (see `loading/evidence.py`); the CLI prints one line and exits 3."""

    exit_code = INCONCLUSIVE_EXIT
