"""What the CLI prints: rich tables, verdicts and progress bars for people; one plain line per error.

Every string that came from a file (names, paths, messages) is printed as plain text, never parsed as markup.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..core.escape import ci_line, printable

if TYPE_CHECKING:
    from ..screen.pipeline import FilterResult
    from ..usb.pipeline import ModelScan


def plain_text(text: str, style: str = "") -> Text:
    """A rich Text of one line that may quote a file (a name, a path, a child's message): controls escaped."""
    return Text(ci_line(printable(text)), style=style)


LOG_WIDTH = 160  # columns of a table written to a log or a pipe: rich's 80 truncates the scan table's cells
LOG_EVERY_S = 30.0  # seconds between progress lines in a log


def _width(stream) -> int | None:
    """None (the terminal's own width) on a terminal or with $COLUMNS set; LOG_WIDTH for a log or a pipe."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else LOG_WIDTH


out = Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))

PHASES = {
    "stage1": "stage 1: ranking classes",
    "uap": "targeted UAPs (Alg. 1)",
    "refine": "refinement (Alg. 2)",
    "nc": "Neural Cleanse",
    "pairs": "pairs (source -> target)",
    "warp": "warps (WaNet)",
    "epsilon": "searching the minimal epsilon",
    "screen": "screening",
}


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar per phase on stderr; in a log (stderr not a terminal) plain lines (`log_progress`)."""
    if not enabled:
        yield None
        return
    if not err.is_terminal:
        yield log_progress()
        return
    bar = Progress(
        TextColumn("{task.description:<32}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, Any] = {}  # phase -> rich TaskID

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(PHASES.get(phase, phase), total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


def log_progress(
    every: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic
) -> Callable[[str, int, int], None]:
    """Progress for a CI log: a line on stderr when a phase starts, every `every` seconds with its ETA, and when
    it ends, so a long scan in a pipeline shows it is alive and when it will finish."""
    started: dict[str, float] = {}
    shown: dict[str, float] = {}  # when each phase's last line was printed
    ended: set[str] = set()

    def update(phase: str, done: int, total: int) -> None:
        now, label = clock(), PHASES.get(phase, phase)
        if phase not in started:
            started[phase] = shown[phase] = now
            err.print(plain_text(f"{label}: started ({total} steps)"), highlight=False)
        elapsed = now - started[phase]
        if done >= total > 0:
            if phase not in ended:
                ended.add(phase)
                err.print(plain_text(f"{label}: done in {elapsed:.0f} s"), highlight=False)
        elif done > 0 and now - shown[phase] >= every:
            shown[phase] = now
            eta = elapsed / done * (total - done)
            err.print(plain_text(f"{label}: {done}/{total} after {elapsed:.0f} s, eta {eta:.0f} s"), highlight=False)

    return update


def error_line(label: str, text: str, style: str = "bold red") -> None:
    """One line on stderr; `text` may come from a hostile file, so it is never parsed as markup."""
    err.print(
        Text.assemble((f"{label}: ", style), ci_line(printable(" ".join(text.split())))),
        highlight=False,
        soft_wrap=True,
    )


def print_scan(scan: ModelScan, out_dir: Path | None) -> None:
    """The per-class table and the verdict of a model scan."""
    if scan.verdict == "inconclusive" and not scan.classes:
        print_verdict(scan, out_dir)
        return
    name = Path(scan.model.get("path") or "model").name
    table = Table(title=escape(printable(f"{scan.settings.method.upper()} scan of {name}")))
    from ..report.rows import class_columns, class_rows

    staged = scan.staging is not None and scan.staging.mode == "staged"
    for col in class_columns(scan):
        table.add_column(col, justify="right")
    for c, cells in class_rows(scan):
        label = escape(printable(f"{c.cls}" + (f" {c.name}" if c.name else "")))
        table.add_row(label, *cells, style="bold red" if c.flagged else None)
    out.print(table)
    if staged and scan.staging is not None:
        out.print(
            plain_text(f"staged scan: {scan.staging.why}; --refine all refines all {scan.staging.num_classes}"),
            highlight=False,
        )
    if scan.threshold_note:
        out.print(Text(scan.threshold_note), highlight=False)
    print_verdict(scan, out_dir)


def print_verdict(scan: ModelScan, out_dir: Path | None) -> None:
    """What was scanned, and the verdict with its targets or reasons."""
    out.print(
        plain_text(
            f"model: {scan.model['description']}; {scan.data['samples']} samples; device {scan.device}; "
            f"{scan.timings['total']:.1f} s"
        ),
        highlight=False,
    )
    if scan.sandbox:
        from ..safety.confine import Layers

        out.print(plain_text(Layers(**scan.sandbox).describe()), highlight=False)
    folder = scan.model.get("read_from_folder")
    if folder:
        size = "x".join(map(str, folder["input_size"] or ())) or "?"
        out.print(
            plain_text(
                f"read from the folder: {folder['kind']} {folder['architecture']}, "
                f"{folder['num_classes']} "
                f"classes ({folder['labels']} named), input {folder['channels']}x{size}, mean "
                f"{_floats(folder['mean'])}, std {_floats(folder['std'])}, resample {folder['resample']}"
            ),
            highlight=False,
        )
        for line in scan.model.get("overrides") or ():
            out.print(plain_text(f"override: {line}"), highlight=False)
    margin = "" if scan.margin is None else f" (margin {scan.margin:.2f} anomaly-index units)"
    if scan.verdict != "inconclusive":
        from ..report.rows import covered_line, finding_lines

        out.print(plain_text(covered_line(scan)), highlight=False)
        for line in finding_lines(scan):
            out.print(plain_text(line, style="red"), highlight=False)
    from ..report.rows import note_lines

    for line in note_lines(scan):
        out.print(plain_text(f"note: {line}", style="yellow"), highlight=False)
    if scan.verdict == "backdoor":
        names = {c.cls: c.name for c in scan.classes}
        shown = ", ".join(f"{t} ({names[t]})" if names.get(t) else str(t) for t in scan.target_classes)
        out.print(plain_text(f"verdict: BACKDOOR suspected, target class(es) {shown}{margin}", style="bold red"))
    elif scan.verdict == "inconclusive":
        _print_inconclusive("scan", scan.reasons)
    else:
        out.print(plain_text(f"verdict: clean (no backdoor found){margin}", style="bold green"))
    if out_dir is not None:
        out.print(plain_text(f"report and trigger images: {out_dir}/"), highlight=False)


def _floats(values: list[float] | None) -> str:
    return "none" if not values else ",".join(f"{v:.4g}" for v in values)


def _print_inconclusive(what: str, reasons: list[str]) -> None:
    """The inconclusive verdict of a scan or a screen, one line per reason (from the file: printed plain)."""
    out.print(Text(f"verdict: INCONCLUSIVE (the {what} could not measure this model)", style="bold yellow"))
    for reason in reasons:
        out.print(plain_text(f"  - {reason}"), highlight=False)


def print_filter(result: FilterResult) -> None:
    """The per-class table and the counts of a screening (or why it is inconclusive)."""
    if result.verdict == "inconclusive":
        _print_inconclusive("screen", result.reasons)
        return
    table = Table(title=escape(printable(f"screening of {result.input}")))
    for col in ("predicted class", "images", "flagged", "expected without a trigger"):
        table.add_column(col, justify="right")
    for row in result.per_class:
        style = "bold red" if row["class"] == result.suspected_target else None
        name = f"{row['class']} {row['name']}" if row.get("name") else str(row["class"])
        table.add_row(
            escape(printable(name)), str(row["images"]), str(row["flagged"]), f"{row['expected']:.1f}", style=style
        )
    out.print(table)
    if result.method == "uap":
        own = result.rule.dominant if result.rule is not None else []
        extra = f"; own UAP and margin for dominant class(es) {', '.join(map(str, own))}" if own else ""
        out.print(
            f"UAP: L-inf epsilon {result.epsilon:.4f}, fooling rate {result.fooling_rate:.2f}{extra}", highlight=False
        )
    if result.method == "erase":
        from ..report.markdown import erased_line

        out.print(plain_text(erased_line(result.triggers)))
        for note in result.evidence.notes:
            out.print(plain_text(note, style="yellow"))
    if result.skipped:
        out.print(plain_text(f"{len(result.skipped)} unreadable file(s) skipped", style="yellow"))
    line = f"{result.flagged} of {result.total} images flagged as trigger-carrying"
    if result.suspected_target is not None:
        line += f"; flags concentrate on class {result.suspected_target} (likely backdoor target)"
    out.print(Text(line, style=f"bold {'red' if result.flagged else 'green'}"))


@contextlib.contextmanager
def fleet_progress(total: int, enabled: bool) -> Iterator[Callable | None]:
    """One line on stderr as each model of a fleet finishes (the models run in child processes)."""
    if not enabled:
        yield None
        return
    count = [0]

    def done(item) -> None:
        count[0] += 1
        how = "cached" if item.cached else f"{item.seconds:.1f} s"
        err.print(plain_text(f"[{count[0]}/{total}] {item.name}: {item.verdict} ({how})"), highlight=False)

    yield done


def print_fleet(result) -> None:
    """The fleet's summary table: model, verdict, target classes, seconds, cached, and why a model has no verdict."""
    count = len(result.items)
    table = Table(title=f"backdoorscan: {count} model{'' if count == 1 else 's'} ({result.runner})")
    for col in ("model", "verdict", "target classes", "seconds", "cached", "report"):
        table.add_column(col)
    styles = {"backdoor": "bold red", "clean": "green", "inconclusive": "yellow", "error": "bold yellow"}
    for item in result.items:
        table.add_row(
            escape(printable(item.name)),
            item.verdict,
            ", ".join(map(str, item.targets)),
            f"{item.seconds:.1f}",
            "yes" if item.cached else "",
            escape(printable(item.report_dir or "")),
            style=styles.get(item.verdict),
        )
    out.print(table)
    for item in result.items:
        if item.error:
            out.print(plain_text(f"{item.name}: {item.error}"), highlight=False)
    s = result.summary()["summary"]
    out.print(
        plain_text(
            f"{s['backdoor']} suspect, {s['clean']} clean, {s['inconclusive']} inconclusive, {s['error']} "
            f"not scanned; {s['cached']} from the cache; {s['seconds']:.1f} s; exit {s['exit_code']}"
        ),
        highlight=False,
    )
