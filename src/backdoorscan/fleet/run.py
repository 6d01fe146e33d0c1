"""Many models, one command: how each model of a fleet (`plan.py`) is scanned, cached and summed up.

Each model is scanned by its own `backdoorscan model` child process (sandboxed as a single scan is, killed at
`--timeout`), so one hostile or unreadable model never stops the others; the runner that starts the children is
local (one after another) or a Ray cluster (`fleet_ray`). Results are keyed in a `cache.ResultCache`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ExitCode, ScanError
from ..core.jsonout import dumps
from .plan import CHILD_RUN_KEYS, FLEET_CHILD_ENV, FleetEntry


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
            return {
                **self.report,
                "fleet": {
                    "name": self.name,
                    "cached": self.cached,
                    "report_dir": self.report_dir,
                    "exit_code": self.exit_code,
                },
            }
        return {
            "model": {"path": self.path},
            "verdict": "error",
            "error": self.error,
            "fleet": {"name": self.name, "cached": False, "report_dir": None, "exit_code": self.exit_code},
        }


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
        return {
            "summary": {
                "models": len(self.items),
                **count,
                "cached": sum(i.cached for i in self.items),
                "exit_code": self.exit_code,
                "seconds": round(self.seconds, 3),
                "runner": self.runner,
                "models_by_name": [
                    {
                        "name": i.name,
                        "path": i.path,
                        "verdict": i.verdict,
                        "target_classes": i.targets,
                        "exit_code": i.exit_code,
                        "seconds": round(i.seconds, 3),
                        "cached": i.cached,
                        "report_dir": i.report_dir,
                    }
                    for i in self.items
                ],
            }
        }


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
    from ..report.writer import read_tree
    from ..safety import sandbox as landlock
    from ..safety.child import DIED, child_environment, start_child, watching_tree

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
        cmd = [
            sys.executable,
            "-m",
            "backdoorscan",
            *argv,
            "--json",
            "--quiet",
            "--out",
            str(out),
            "--sandbox",
            sandbox,
        ]
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


def scan_fleet(
    entries: list[FleetEntry],
    *,
    run: dict[str, Any],
    out: Path | None = None,
    cache=None,
    runner: Runner | None = None,
    runner_name: str = "local",
    on_item: Callable[[FleetItem], None] | None = None,
) -> FleetResult:
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
                report, files = _here(entry, hit.report, hit.files)
                items[i] = _finish(entry, hit.exit_code, report, files, 0.0, out, cached=True)
                continue
        todo.append(i)
    if on_item is not None:
        for done in (item for item in items if item is not None):
            on_item(done)
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
    return FleetResult(items=[i for i in items if i is not None], seconds=time.perf_counter() - t0, runner=runner_name)


def _here(entry: FleetEntry, report: dict, files: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
    """A cached report as this run would have written it: the model and data at the paths given now (the same
    content may have been scanned from another folder or checkout)."""
    report = {**report}
    if isinstance(report.get("model"), dict):
        report["model"] = {**report["model"], "path": str(entry.checkpoint)}
    if isinstance(report.get("data"), dict):
        report["data"] = {**report["data"], "path": str(entry.data)}
    if "report.json" in files:
        try:
            stored = json.loads(files["report.json"])
            stored["model"], stored["data"] = report.get("model"), report.get("data")
            files = {**files, "report.json": (dumps(stored) + "\n").encode()}
        except (ValueError, TypeError):
            pass
    return report, files


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
        for label in ("error: ", "inconclusive: "):  # the child's own label: the fleet adds its own
            why = why.removeprefix(label)
        code = ExitCode.ERROR if outcome.exit_code in (ExitCode.CLEAN, ExitCode.BACKDOOR) else outcome.exit_code
        return FleetItem(
            entry.name, str(entry.checkpoint), int(code), outcome.seconds, error=" ".join(why.split())[:400]
        )
    return _finish(entry, outcome.exit_code, report, outcome.files, outcome.seconds, out, cached=False)


def _finish(
    entry: FleetEntry, code: int, report: dict, files: dict[str, bytes], seconds: float, out: Path | None, cached: bool
) -> FleetItem:
    """Write one model's report files under out/NAME (atomically) and make its item."""
    where = None
    if out is not None and files:
        from ..report.writer import atomic_output_dir, write_tree

        target = Path(out) / entry.name
        if (target / "report.json").is_file():  # this model's report from an earlier run: replaced whole
            shutil.rmtree(target)
        with atomic_output_dir(target, "report.json") as stage:
            write_tree(stage, files)
        where = str(target)
    return FleetItem(entry.name, str(entry.checkpoint), code, seconds, cached=cached, report=report, report_dir=where)
