"""Which models a fleet scan covers: paths, folders, globs (a literal path is never a pattern) and a TOML
manifest, each model becoming a `FleetEntry` with its data, loader options and scan settings (checked by type).
"""

from __future__ import annotations

import glob
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.errors import ScanError, missing_hint
from ..core.settings import ScanSettings

MODEL_SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".onnx", ".safetensors", ".bin", ".ckpt")
MODEL_KEYS = ("arch", "num_classes", "input_size", "channels", "mean", "std", "labels", "unsafe_allow_pickle")
ENTRY_KEYS = ("path", "name", "data")
CHILD_RUN_KEYS = ("device", "threads", "forward_timeout", "max_memory")  # run options each child scan gets
MANIFEST_LIMIT = 1 << 20  # bytes


def setting_keys() -> tuple[str, ...]:
    """The scan settings a manifest entry may set: those that are command-line options."""
    return tuple(f.name for f in fields(ScanSettings) if f.metadata.get("help"))


@dataclass
class FleetEntry:
    """One model of a fleet: where it is, its clean samples, how to load it and the scan settings."""

    name: str  # unique within the fleet; its report folder under --out
    checkpoint: Path
    data: Path
    model: dict[str, Any] = field(default_factory=dict)  # MODEL_KEYS given for this model
    settings: dict[str, Any] = field(default_factory=dict)  # ScanSettings fields given for this model

    def argv(self, run: dict[str, Any]) -> list[str]:
        """The `backdoorscan model` command line that scans this one model (without --out and --json)."""
        args = ["model", str(self.checkpoint), "--data", str(self.data)]
        for key, value in {**self.model, **self.settings, **run}.items():
            if value is None:
                continue
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            elif isinstance(value, (list, tuple)):
                sep = "x" if key == "input_size" else ","
                args += [flag, sep.join(str(v) for v in value)]
            else:
                args += [flag, str(value)]
        return args

    def check(self) -> None:
        """Refuse settings that a scan would refuse, before any model is loaded."""
        ScanSettings(**self.settings)


FLEET_CHILD_ENV = "BACKDOORSCAN_FLEET_CHILD"  # set in a fleet's children: they scan one literal path, never a fleet


def is_pattern(path: Path) -> bool:
    """A glob pattern, unless a file or folder of that literal name exists (`models[v2]/m.pt2` is a path)."""
    return glob.has_magic(str(path)) and not path.exists() and not os.environ.get(FLEET_CHILD_ENV)


def is_fleet(paths: list[Path], manifest: Path | None) -> bool:
    """Several models, a pattern, a folder of models or a manifest: a fleet scan; one model file: a single scan.

    A fleet's child is always a single scan (a depth guard: no child starts children of its own).
    """
    if os.environ.get(FLEET_CHILD_ENV):
        if manifest is not None or len(paths) != 1:
            raise ScanError("a fleet's child scans one model; it never starts a fleet of its own")
        return False
    if manifest is not None or len(paths) != 1:
        return True
    one = paths[0]
    return is_pattern(one) or (one.is_dir() and not (one / "config.json").is_file())


def expand(paths: list[Path]) -> list[Path]:
    """Model files and hub folders from paths, glob patterns and folders of models (sorted, each once)."""
    found: list[Path] = []
    for path in paths:
        if is_pattern(path):
            matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
            if not matches:
                raise ScanError(  # a literal name with [ or * that does not exist reads as a pattern too
                    "not found, and as a pattern it matches no file", path=path, hint=missing_hint(path)
                )
            found += [m for m in matches if m.is_file() or (m / "config.json").is_file()]
        elif path.is_dir() and not (path / "config.json").is_file():
            inner = sorted(
                p
                for p in path.iterdir()
                if (p.is_file() and p.suffix in MODEL_SUFFIXES) or (p.is_dir() and (p / "config.json").is_file())
            )
            if not inner:
                raise ScanError(
                    f"the folder holds no model ({', '.join(MODEL_SUFFIXES)} files or hub folders)", path=path
                )
            found += inner
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def _names(paths: list[Path]) -> list[str]:
    """A unique, file-name-safe report folder name per model (its file name, numbered on clashes)."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name).strip("._") or "model"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def plan_fleet(
    paths: list[Path], data: Path | None, model: dict[str, Any], settings: dict[str, Any], manifest: Path | None = None
) -> list[FleetEntry]:
    """The fleet's entries: the command line's models with its options, then the manifest's, each checked."""
    entries: list[FleetEntry] = []
    files = expand(paths) if paths else []
    if files:
        if data is None:
            raise ScanError("--data is needed for models given on the command line")
        entries += [
            FleetEntry(name, f, data, dict(model), dict(settings)) for name, f in zip(_names(files), files, strict=True)
        ]
    if manifest is not None:
        entries += read_manifest(manifest, data, model, settings)
    if not entries:
        raise ScanError("no model to scan", hint="give model files, a folder, a pattern or --manifest")
    names = _names([Path(e.name) for e in entries])
    for entry, name in zip(entries, names, strict=True):
        entry.name = name
        entry.check()
    return entries


def read_manifest(path: Path, data: Path | None, model: dict[str, Any], settings: dict[str, Any]) -> list[FleetEntry]:
    """A TOML manifest: defaults at the top, then one [[model]] table per model; paths relative to the file.

    data = "clean/"            # defaults for every model
    steps = 300
    [[model]]
    path = "models/a.pt2"
    [[model]]
    path = "weights/b.safetensors"
    arch = "resnet18"
    mean = [0.485, 0.456, 0.406]
    """
    from ..safety.files import read_text_bounded

    path = Path(path)
    text = read_text_bounded(path, MANIFEST_LIMIT, "manifest")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScanError(f"not valid TOML ({str(exc)[:100]})", path=path) from exc
    models = doc.pop("model", None)
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise ScanError("the manifest has no [[model]] entries", path=path)
    base = path.parent
    allowed = set(MODEL_KEYS) | set(setting_keys()) | set(ENTRY_KEYS)
    entries = []
    for i, table in enumerate(models):
        merged = {**doc, **table}
        unknown = sorted(set(merged) - allowed)
        if unknown:
            raise ScanError(
                f"[[model]] {i + 1}: unknown key {unknown[0]!r}",
                path=path,
                hint=f"keys: path, name, data, {', '.join(MODEL_KEYS)} and the scan options",
            )
        if "path" not in table:
            raise ScanError(f"[[model]] {i + 1} has no path", path=path)

        def local(value: Any, key: str, n: int = i + 1) -> Path:
            """A path from the manifest, relative to the manifest's folder."""
            if not isinstance(value, str):
                raise ScanError(f"[[model]] {n}: {key} must be a string", path=path)
            return Path(value) if Path(value).is_absolute() else base / value

        where = merged.get("data")
        entry_data = local(where, "data") if where is not None else data
        if entry_data is None:
            raise ScanError(f"[[model]] {i + 1} has no data (give data at the top, per model, or --data)", path=path)
        loader = {**model, **{k: merged[k] for k in MODEL_KEYS if k in merged}}
        if isinstance(loader.get("labels"), str):
            loader["labels"] = local(loader["labels"], "labels")
        chosen = {**settings, **{k: merged[k] for k in setting_keys() if k in merged}}
        checkpoint = local(table["path"], "path")
        entries.append(FleetEntry(str(merged.get("name", checkpoint.name)), checkpoint, entry_data, loader, chosen))
    return entries
