"""The result cache of fleet scans: an unchanged model, sample set, settings and tool version is not scanned again.

A key is the sha256 of the model's bytes (every file of a hub folder), of the clean samples' bytes (every file of
a folder), of the loading options, of every scan setting as resolved (defaults included), of the run options
that change figures (device) and of the tool's version (bumped with every change of behaviour: CHANGELOG.md).
An entry is a folder `DIR/KEY/` holding the report files and `result.json` (exit code and report), written
atomically; a damaged entry is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.digest import files_digest, sha256_file
from ..core.errors import ScanError

ENV = "BACKDOORSCAN_CACHE_DIR"


def default_dir() -> Path:
    """$BACKDOORSCAN_CACHE_DIR, else $XDG_CACHE_HOME/backdoorscan, else ~/.cache/backdoorscan."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "backdoorscan"


@dataclass
class Hit:
    """A cached result: the scan's exit code, its report and its report files."""

    exit_code: int
    report: dict[str, Any]
    files: dict[str, bytes]


class ResultCache:
    """Scan results on disk under one folder, keyed by what determines them."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_dir()
        self._digests: dict[str, str] = {}  # one hash per path and run: a fleet shares its samples
        self.timeout: float | None = None  # seconds the parent may spend hashing (the fleet's --timeout)
        self._started = time.monotonic()

    def _digest(self, path: Path) -> str:
        key = str(Path(path).resolve())
        if key not in self._digests:
            self._digests[key] = loader_digest(Path(path), self.deadline())
        return self._digests[key]

    def deadline(self) -> float | None:
        """When the parent must stop hashing (its share of `--timeout`), as time.monotonic."""
        return None if self.timeout is None else self._started + self.timeout

    def key(self, entry, run: dict[str, Any]) -> str:
        """The key of one fleet entry scanned with these run options."""
        parts = {
            "version": __version__,
            "model": self._digest(entry.checkpoint),
            "data": self._digest(entry.data),
            "loading": _plain({k: v for k, v in entry.model.items() if k != "labels"}),  # labels: by content
            "settings": resolved_settings(entry.settings),
            "device": str(run.get("device", "auto")),
        }
        labels = entry.model.get("labels")
        if labels:
            parts["labels"] = self._digest(Path(labels))
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Hit | None:
        """The cached result for a key, or None (absent or damaged)."""
        from ..report.writer import read_tree

        where = self.folder / key
        try:
            result = json.loads((where / "result.json").read_text())
            hit = Hit(int(result["exit_code"]), result["report"], read_tree(where / "files"))
            os.utime(where)  # used now: pruning by age (the Action's 30 days) keeps what is still in use
            return hit
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, exit_code: int, report: dict[str, Any], files: dict[str, bytes]) -> None:
        """Store a result; a cache that cannot be written is skipped (the scan's result stands)."""
        from ..report.writer import atomic_output_dir, write_tree

        where = self.folder / key
        try:
            if where.exists():
                shutil.rmtree(where)
            with atomic_output_dir(where, "result.json") as stage:
                write_tree(stage / "files", files)
                (stage / "result.json").write_text(json.dumps({"exit_code": exit_code, "report": report}))
        except (OSError, ScanError):
            pass


def resolved_settings(given: dict[str, Any]) -> dict[str, Any]:
    """Every scan setting with its value for this run (defaults included): a changed default changes the key."""
    from dataclasses import asdict

    from ..core.settings import ScanSettings

    return _plain(asdict(ScanSettings(**given)))


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON-able values (paths as strings), for the key."""
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
        for k, v in sorted(values.items())
        if v is not None
    }


def loader_digest(path: Path, deadline: float | None = None) -> str:
    """sha256 of what the loader will read, nothing else: a hub folder's config, preprocessing and weights; an image
    folder's images; a file itself. Links that leave a folder and files that are not regular are refused, so the
    parent never hashes `/proc` or a device."""
    from ..loading.extensions import IMAGE_EXTENSIONS
    from ..safety.files import inside_folder

    if not path.is_dir():
        if not path.is_file():
            raise ScanError("refused: not a regular file", path=path)
        return sha256_file(path, deadline)
    from ..loading.hub import folder_digest, is_hub_folder, read_hub_folder

    if is_hub_folder(path):
        return folder_digest(read_hub_folder(path), deadline)
    files = [inside_folder(p, path) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    return files_digest(path.resolve(), files, deadline)
