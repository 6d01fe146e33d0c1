"""Class names from files (`--labels`, a hub folder's id2label, an image folder's class folders) as plain text.

Names come from files, so they are hostile: control characters are dropped and lengths bounded before a name
reaches a table, a report or a file name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..core.errors import ScanError

LABELS_LIMIT = 4 << 20  # bytes


def clean_label(value: Any, limit: int = 80) -> str:
    """A class name from a file as plain printable text: control characters dropped, length bounded."""
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return " ".join(text.split())[:limit]


def file_slug(name: str, limit: int = 40) -> str:
    """A class name as a safe file-name part: letters, digits, '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:limit]


def read_labels(path: Path) -> tuple[str, ...]:
    """`--labels FILE`: one name per line, or a JSON list, or a JSON object {"0": name, ...} naming every class."""
    from ..safety.files import read_text_bounded

    path = Path(path)
    text = read_text_bounded(path, LABELS_LIMIT, "labels file")
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{"):
        try:
            value = json.loads(stripped)
        except ValueError as exc:
            raise ScanError(f"the labels file is not valid JSON ({str(exc)[:80]})", path=path) from exc
        if isinstance(value, dict):
            try:
                named = {int(k): v for k, v in value.items()}
            except ValueError as exc:
                raise ScanError("the labels object's keys must be class indices", path=path) from exc
            if sorted(named) != list(range(len(named))):
                raise ScanError("the labels object must name every class from 0 on", path=path)
            value = [named[i] for i in range(len(named))]
        if not isinstance(value, list):
            raise ScanError("the labels JSON must be a list or an object", path=path)
        names = [clean_label(v) for v in value]
    else:
        names = [clean_label(line) for line in text.splitlines() if line.strip()]
    if len(names) < 2:
        raise ScanError("the labels file names fewer than 2 classes", path=path)
    return tuple(names)
