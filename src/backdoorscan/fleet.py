"""Many models, one command: which models a fleet scan covers (paths, folders, globs, a TOML manifest) and how
each one is scanned, cached and summed up.

Each model is scanned by its own `backdoorscan model` child process (sandboxed as a single scan is, killed at
`--timeout`), so one hostile or unreadable model never stops the others; the runner that starts the children is
local (one after another) or a Ray cluster (`fleet_ray`). Results are keyed in a `cache.ResultCache`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ExitCode, ScanError
from .settings import ScanSettings

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


@dataclass
class FleetItem:
    """One model's outcome: its report (or why there is none), where the report went, whether it was cached."""

    name: str
    path: str
    exit_code: int
    seconds: float
    cached: bool = False
    report: dict[str, Any] | None = None
    report_dir: str | None = None
    error: str | None = None

    @property
    def verdict(self) -> str:
        return self.report["verdict"] if self.report else "error"

    @property
    def targets(self) -> list[int]:
        return list(self.report.get("target_classes", [])) if self.report else []

    def line(self) -> dict[str, Any]:
        """The JSON line of this model: the single-model report, or the error that stopped it."""
        if self.report is not None:
            return {**self.report, "fleet": {"name": self.name, "cached": self.cached, "report_dir": self.report_dir,
                                             "exit_code": self.exit_code}}
        return {"model": {"path": self.path}, "verdict": "error", "error": self.error,
                "fleet": {"name": self.name, "cached": False, "report_dir": None, "exit_code": self.exit_code}}


@dataclass
class FleetResult:
    """Every model's outcome, in the order given, and the fleet's exit code."""

    items: list[FleetItem]
    seconds: float = 0.0
    runner: str = "local"

    @property
    def exit_code(self) -> int:
        """The worst of the models: 2 if any could not be scanned, 3 if any was inconclusive, 1 if any is
        suspect, else 0."""
        codes = {i.exit_code for i in self.items}
        for code in (ExitCode.ERROR, ExitCode.INCONCLUSIVE, ExitCode.BACKDOOR):
            if code in codes:
                return int(code)
        return int(ExitCode.CLEAN)

    def summary(self) -> dict[str, Any]:
        """The summary object that ends the JSON lines."""
        count = {v: sum(i.verdict == v for i in self.items) for v in ("backdoor", "clean", "inconclusive", "error")}
        return {"summary": {"models": len(self.items), **count, "cached": sum(i.cached for i in self.items),
                            "exit_code": self.exit_code, "seconds": round(self.seconds, 3), "runner": self.runner,
                            "models_by_name": [{"name": i.name, "path": i.path, "verdict": i.verdict,
                                                "target_classes": i.targets, "exit_code": i.exit_code,
                                                "seconds": round(i.seconds, 3), "cached": i.cached,
                                                "report_dir": i.report_dir} for i in self.items]}}



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
                raise ScanError("the pattern matches no file", path=path)
            found += [m for m in matches if m.is_file() or (m / "config.json").is_file()]
        elif path.is_dir() and not (path / "config.json").is_file():
            inner = sorted(p for p in path.iterdir() if (p.is_file() and p.suffix in MODEL_SUFFIXES)
                           or (p.is_dir() and (p / "config.json").is_file()))
            if not inner:
                raise ScanError(f"the folder holds no model ({', '.join(MODEL_SUFFIXES)} files or hub folders)",
                                path=path)
            found += inner
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def _names(paths: list[Path]) -> list[str]:
    """A unique, file-name-safe report folder name per model (its file name, numbered on clashes)."""
    names, seen = [], {}
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name).strip("._") or "model"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def plan(paths: list[Path], data: Path | None, model: dict[str, Any], settings: dict[str, Any],
         manifest: Path | None = None) -> list[FleetEntry]:
    """The fleet's entries: the command line's models with its options, then the manifest's, each checked."""
    entries: list[FleetEntry] = []
    files = expand(paths) if paths else []
    if files and data is None:
        raise ScanError("--data is needed for models given on the command line")
    entries += [FleetEntry(name, f, data, dict(model), dict(settings)) for name, f in zip(_names(files), files,
                                                                                           strict=True)]
    if manifest is not None:
        entries += read_manifest(manifest, data, model, settings)
    if not entries:
        raise ScanError("no model to scan", hint="give model files, a folder, a pattern or --manifest")
    names = _names([Path(e.name) for e in entries])
    for entry, name in zip(entries, names, strict=True):
        entry.name = name
        entry.check()
    return entries


def read_manifest(path: Path, data: Path | None, model: dict[str, Any], settings: dict[str, Any]
                  ) -> list[FleetEntry]:
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
    path = Path(path)
    if not path.is_file():
        raise ScanError("manifest not found", path=path)
    if path.stat().st_size > MANIFEST_LIMIT:
        raise ScanError("refused: a manifest larger than 1 MiB", path=path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
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
            raise ScanError(f"[[model]] {i + 1}: unknown key {unknown[0]!r}", path=path,
                            hint=f"keys: path, name, data, {', '.join(MODEL_KEYS)} and the scan options")
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


@dataclass
class Outcome:
    """What one child scan gave back: its exit code, stdout (the JSON report), the last stderr line and the
    report files (relative name -> bytes), so that a remote worker can hand them to the driver."""

    exit_code: int
    stdout: str
    stderr: str
    files: dict[str, bytes]
    seconds: float


def run_child(argv: list[str], sandbox: str, timeout: float) -> Outcome:
    """Scan one model in a `backdoorscan model ... --json --out DIR` child; return what it wrote.

    The child is the sandboxed scanning process itself (it restricts itself with Landlock before it opens the
    model, as under a single scan's supervisor), and it is killed at `timeout`.
    """
    from .report.writer import read_tree
    from .safety import sandbox as landlock
    from .supervise import DIED, child_environment, start_child, watching_tree

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="backdoorscan-fleet-") as scratch:
        out = Path(scratch) / "report"
        out.mkdir()
        tmp = Path(scratch) / "tmp"
        tmp.mkdir()
        confined = sandbox != "off" and landlock.landlock_abi() >= 1
        if sandbox == "on" and not confined:
            return Outcome(2, "", "--sandbox on: Landlock is not available on this system", {}, 0.0)
        child_env = child_environment([str(out), str(tmp)] if confined else None, str(tmp))
        child_env[FLEET_CHILD_ENV] = "1"
        cmd = [sys.executable, "-m", "backdoorscan", *argv, "--json", "--quiet", "--out", str(out),
               "--sandbox", sandbox]
        with watching_tree() as started:
            proc = start_child(cmd, child_env)
            started.append(proc.pid)
            try:
                raw_out, raw_err = proc.communicate(timeout=timeout)
                code = proc.returncode
                stdout, stderr = raw_out.decode("utf-8", "replace"), raw_err.decode("utf-8", "replace")
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                code, stdout, stderr = 2, "", f"the scan ran past --timeout {timeout:g} s and was stopped"
        if code < 0 or code > 3:
            code, stderr = 2, DIED.format(code=code)
        files = read_tree(out) if code in (ExitCode.CLEAN, ExitCode.BACKDOOR, ExitCode.INCONCLUSIVE) else {}
    return Outcome(code, stdout, stderr, files, time.perf_counter() - t)


Done = Callable[[int, Outcome], None]
Runner = Callable[[list[list[str]], Done], None]  # child command lines, and what to call as each one finishes


def local_runner(sandbox: str, timeout: float) -> Runner:
    """Scan the models one after another on this machine."""
    def run(jobs: list[list[str]], done: Done) -> None:
        for i, argv in enumerate(jobs):
            done(i, run_child(argv, sandbox, timeout))
    return run


def scan_fleet(entries: list[FleetEntry], *, run: dict[str, Any], out: Path | None = None, cache=None,
               runner: Runner | None = None, runner_name: str = "local",
               on_item: Callable[[FleetItem], None] | None = None) -> FleetResult:
    """Scan every entry (cached results are reused), write each report under `out/NAME/`, and sum up.

    `run` holds the run options: `CHILD_RUN_KEYS` are passed to every child, `sandbox` and `timeout` set up the
    default `local_runner`; `cache` is a `ResultCache` or None; `runner` starts the child scans.
    """
    t0 = time.perf_counter()
    runner = runner or local_runner(run.get("sandbox", "auto"), float(run.get("timeout") or 3600))
    passed = {k: v for k, v in run.items() if k in CHILD_RUN_KEYS}
    items: list[FleetItem | None] = [None] * len(entries)
    keys: list[str | None] = [None] * len(entries)
    todo: list[int] = []
    for i, entry in enumerate(entries):
        if cache is not None:
            try:
                keys[i] = cache.key(entry, passed)
            except ScanError as exc:
                items[i] = FleetItem(entry.name, str(entry.checkpoint), 2, 0.0, error=exc.one_line())
                continue
            hit = cache.get(keys[i])
            if hit is not None:
                items[i] = _finish(entry, hit.exit_code, hit.report, hit.files, 0.0, out, cached=True)
                continue
        todo.append(i)
    for i in (i for i in range(len(entries)) if items[i] is not None and on_item is not None):
        on_item(items[i])
    if todo:
        def finished(j: int, outcome: Outcome) -> None:
            i = todo[j]
            item = _item(entries[i], outcome, out)
            verdict = outcome.exit_code in (ExitCode.CLEAN, ExitCode.BACKDOOR)
            if cache is not None and keys[i] is not None and item.report is not None and verdict:
                cache.put(keys[i], outcome.exit_code, item.report, outcome.files)
            items[i] = item
            if on_item is not None:
                on_item(item)

        runner([entries[i].argv(passed) for i in todo], finished)
    return FleetResult(items=[i for i in items if i is not None], seconds=time.perf_counter() - t0,
                       runner=runner_name)


def _item(entry: FleetEntry, outcome: Outcome, out: Path | None) -> FleetItem:
    """A child's outcome as a fleet item: its report written under `out`, or the one line that says why not."""
    report = None
    if outcome.exit_code in (ExitCode.CLEAN, ExitCode.BACKDOOR, ExitCode.INCONCLUSIVE):
        try:
            report = json.loads(outcome.stdout)
        except ValueError:
            report = None
    if report is None:
        lines = [line for line in outcome.stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit {outcome.exit_code} without a report"
        code = ExitCode.ERROR if outcome.exit_code in (ExitCode.CLEAN, ExitCode.BACKDOOR) else outcome.exit_code
        return FleetItem(entry.name, str(entry.checkpoint), int(code),
                         outcome.seconds, error=" ".join(why.split())[:400])
    return _finish(entry, outcome.exit_code, report, outcome.files, outcome.seconds, out, cached=False)


def _finish(entry: FleetEntry, code: int, report: dict, files: dict[str, bytes], seconds: float, out: Path | None,
            cached: bool) -> FleetItem:
    """Write one model's report files under out/NAME (atomically) and make its item."""
    where = None
    if out is not None and files:
        from .report.writer import atomic_output_dir, write_tree

        target = Path(out) / entry.name
        if (target / "report.json").is_file():  # this model's report from an earlier run: replaced whole
            shutil.rmtree(target)
        with atomic_output_dir(target, "report.json") as stage:
            write_tree(stage, files)
        where = str(target)
    return FleetItem(entry.name, str(entry.checkpoint), code, seconds, cached=cached, report=report,
                     report_dir=where)
