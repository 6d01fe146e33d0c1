"""The `backdoorscan` command: parse options, call the library, print with rich, map outcomes to exit codes.

Exit codes: 0 no backdoor found / nothing flagged, 1 backdoor suspected / images flagged, 2 could not scan,
3 inconclusive (the model loaded but the scan could not measure it).

By default a scan runs in a child process that is sandboxed (`safety.sandbox`) and killed at `--timeout`; this
process only supervises it and relays its output. Every string that came from a file is printed as plain text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import Inconclusive, ScanError
from .safety.limits import Limits, parse_bytes
from .supervise import run_supervised

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Scan image classifiers for backdoors and screen datasets for trigger-carrying images.")
out = Console()
err = Console(stderr=True)

PHASES = {"uap": "targeted UAPs (Alg. 1)", "refine": "refinement (Alg. 2)", "nc": "Neural Cleanse",
          "epsilon": "searching the minimal epsilon", "screen": "screening"}

# Options shared by both commands.
Arch = Annotated[str | None, typer.Option(help="Architecture for weight-only files: a torchvision name "
                                               "(resnet18) or path/to/file.py:function or package.module:function.")]
NumClasses = Annotated[int | None, typer.Option(help="Number of classes (checked against the model's output).")]
InputSize = Annotated[str | None, typer.Option(help="Input size HxW of the [0, 1] images the model takes.")]
Channels = Annotated[int | None, typer.Option(help="Input channels (1 or 3); read from the model when possible.")]
Mean = Annotated[str | None, typer.Option(help="Per-channel mean the model expects, e.g. 0.485,0.456,0.406.")]
Std = Annotated[str | None, typer.Option(help="Per-channel std the model expects, e.g. 0.229,0.224,0.225.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
Seed = Annotated[int, typer.Option(help="Seed for the sample draw; the same seed gives the same report.")]
Unsafe = Annotated[bool, typer.Option("--unsafe-allow-pickle", help="Allow loading a fully pickled model. "
                                      "A pickle can run arbitrary code: only for files you trust.")]
Json = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout and nothing else.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Threads = Annotated[int | None, typer.Option(help="CPU threads for torch (1 when several scans share a machine).")]
Timeout = Annotated[float, typer.Option(help="Seconds the whole scan may take; past it, exit 2.")]
ForwardTimeout = Annotated[float, typer.Option(help="Seconds the model's first forward may take.")]
MaxMemory = Annotated[str | None, typer.Option(help="Memory bound, e.g. 4G (default: 75 % of the memory "
                                                    "available): larger archives are refused, CPU scans capped.")]
Sandbox = Annotated[str, typer.Option(help="Run the scan in a child process restricted by Landlock: auto (where "
                                           "the kernel has it), on (refuse to scan without it) or off.")]
LIMITS = Limits()


def _floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise ScanError(f"--{name} {text!r} is not a list of numbers", hint="e.g. 0.5,0.5,0.5") from exc


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar per phase on stderr, or nothing when disabled or not on a terminal."""
    if not enabled or not err.is_terminal:
        yield None
        return
    bar = Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err, transient=False)
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(PHASES.get(phase, phase), total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


def _error_line(label: str, text: str, style: str = "bold red") -> None:
    """One line on stderr; `text` may come from a hostile file, so it is never parsed as markup."""
    err.print(Text.assemble((f"{label}: ", style), " ".join(text.split())), highlight=False, soft_wrap=True)


def _quiet(debug: bool) -> None:
    """torch's loggers and Python warnings (a model may raise them) stay silent unless --debug."""
    if not debug:
        logging.getLogger("torch").setLevel(logging.CRITICAL + 1)
        warnings.simplefilter("ignore")


def _run(debug: bool, body: Callable[[], int]) -> None:
    """Run a command body; ScanError -> one line and exit 2 (Inconclusive: exit 3), any other failure -> exit 2."""
    try:
        _quiet(debug)
        code = body()
    except Inconclusive as exc:
        if debug:
            traceback.print_exc()
        _error_line("inconclusive", exc.one_line().replace("inconclusive: ", "", 1), "bold yellow")
        code = exc.exit_code
    except ScanError as exc:
        if debug:
            traceback.print_exc()
        _error_line("error", exc.one_line())
        code = 2
    except KeyboardInterrupt:
        _error_line("interrupted", "no report was written")
        code = 2
    except Exception as exc:  # a bug or an unexpected input: still a CI-safe exit code
        if debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
        _error_line("error", f"could not scan: {type(exc).__name__}: {first} (rerun with --debug for the traceback)")
        code = 2
    if os.environ.get("BACKDOORSCAN_SANDBOX_CHILD") is not None:  # a sandboxed child: stop without waiting for
        sys.stdout.flush()                                         # a model thread that may never return
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


def _limits(timeout: float, forward_timeout: float, max_memory: str | None) -> Limits:
    limits = Limits(timeout=timeout, forward_timeout=forward_timeout, max_memory=parse_bytes(max_memory))
    limits.check()
    return limits


def _model_options(arch: str | None, num_classes: int | None, input_size: str | None, channels: int | None,
                   mean: str | None, std: str | None, device: str, unsafe_allow_pickle: bool) -> dict:
    """The loading and preprocessing keywords shared by scan_model and filter_dataset."""
    from .loading import parse_size

    return {"arch": arch, "num_classes": num_classes, "input_size": parse_size(input_size), "channels": channels,
            "mean": _floats(mean, "mean"), "std": _floats(std, "std"), "device": device,
            "unsafe_allow_pickle": unsafe_allow_pickle}


def _emit(result, as_json: bool, markdown: Path | None, to_markdown: Callable, show: Callable[[], None]) -> int:
    """Write the Markdown summary, print JSON or the human view, and return the result's exit code."""
    from .report.writer import write_text_atomic

    if markdown is not None:
        write_text_atomic(markdown, to_markdown(result))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        show()
    return result.exit_code


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))


def _version(value: bool) -> None:
    if value:
        out.print(f"backdoorscan {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Scan image classifiers for backdoors and screen datasets for trigger-carrying images."""


@app.command()
def model(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="The model file: .pt2, TorchScript, ONNX, safetensors or "
                                                    "state_dict (with --arch).")],
    data: Annotated[Path, typer.Option("--data", help="Clean samples: an image folder or an .npz (x, y).")],
    method: Annotated[str, typer.Option(help="usb (the paper's method) or nc (Neural Cleanse baseline).")] = "usb",
    samples: Annotated[int, typer.Option(help="Clean samples drawn, class-balanced.")] = 300,
    norm: Annotated[str, typer.Option(help="UAP norm ball: l2 or linf.")] = "l2",
    delta: Annotated[float, typer.Option(help="UAP radius (pixels in [0, 1]).")] = 10.0,
    theta: Annotated[float, typer.Option(help="Targeted success rate at which a UAP is done.")] = 0.6,
    max_passes: Annotated[int, typer.Option(help="Passes over the samples in Alg. 1 at most.")] = 5,
    steps: Annotated[int, typer.Option(help="Refinement steps (Alg. 2).")] = 500,
    lr: Annotated[float, typer.Option(help="Adam learning rate of the refinement.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Samples per refinement step and class.")] = 16,
    form: Annotated[str, typer.Option(help="Trigger stamping: blend ((1-m)x + m p) or paper ((x + t) m).")] = "blend",
    threshold: Annotated[float, typer.Option(help="Anomaly index above which a class is flagged.")] = 2.0,
    scale: Annotated[str, typer.Option(help="Anomaly index over log L1 (log) or L1 (linear, as in the "
                                             "papers).")] = "log",
    asr_min: Annotated[float, typer.Option(help="Share of clean samples a flagged class's trigger must move.")] = 0.5,
    max_ratio: Annotated[float, typer.Option(help="Largest L1 / median L1 a flagged class may have.")] = 0.5,
    class_group: Annotated[int | None, typer.Option(help="Classes per batch (default all).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write report.json, report.md and trigger "
                                                               "images here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown summary (CI job summary).")] = None,
    arch: Arch = None, num_classes: NumClasses = None, input_size: InputSize = None, channels: Channels = None,
    mean: Mean = None, std: Std = None, device: Device = "auto", seed: Seed = 0, unsafe_allow_pickle: Unsafe = False,
    as_json: Json = False, debug: Debug = False, quiet: Quiet = False, threads: Threads = None,
    timeout: Timeout = LIMITS.timeout, forward_timeout: ForwardTimeout = LIMITS.forward_timeout,
    max_memory: MaxMemory = None, sandbox: Sandbox = "auto",
) -> None:
    """Scan a classifier for a backdoor with USB (Universal Soldier); exit 1 suspected, 3 inconclusive."""

    def body() -> int:
        from .report import write_scan_report
        from .report.markdown import scan_markdown
        from .scan import ScanSettings, scan_model

        limits = _limits(timeout, forward_timeout, max_memory)
        settings = ScanSettings(method=method, samples=samples, seed=seed, norm=norm, delta=delta, theta=theta,
                                max_passes=max_passes, steps=steps, lr=lr, batch_size=batch_size, form=form,
                                threshold=threshold, scale=scale, asr_min=asr_min, max_ratio=max_ratio,
                                class_group=class_group)
        settings.check()
        code = run_supervised(ctx, sandbox, limits, device, [out_dir], [markdown], err)
        if code is not None:
            return code
        _set_threads(threads)
        with _progress(not quiet) as progress:
            scan = scan_model(checkpoint, data, settings=settings, progress=progress, limits=limits,
                              **_model_options(arch, num_classes, input_size, channels, mean, std, device,
                                               unsafe_allow_pickle))
        if out_dir is not None:
            write_scan_report(scan, out_dir)
        return _emit(scan, as_json, markdown, scan_markdown, lambda: _print_scan(scan, out_dir))

    _run(debug, body)


def _print_scan(scan, out_dir: Path | None) -> None:
    if scan.verdict == "inconclusive" and not scan.classes:
        _print_verdict(scan, out_dir)
        return
    name = Path(scan.model.get("path") or "model").name
    table = Table(title=escape(f"{scan.settings.method.upper()} scan of {name}"))
    for col in ("class", "UAP success", "L1 of v'", "L1 / median", "anomaly index", "ASR", "flagged"):
        table.add_column(col, justify="right")
    for c in scan.classes:
        style = "bold red" if c.flagged else None
        table.add_row(escape(f"{c.cls}" + (f" {c.name}" if c.name else "")),
                      "n/a" if c.uap_success is None else f"{c.uap_success:.2f}", f"{c.l1_norm:.2f}",
                      f"{c.size_ratio:.2f}", f"{c.anomaly_index:.2f}", f"{c.asr:.2f}", "yes" if c.flagged else "",
                      style=style)
    out.print(table)
    _print_verdict(scan, out_dir)


def _print_verdict(scan, out_dir: Path | None) -> None:
    out.print(Text(f"model: {scan.model['description']}; {scan.data['samples']} samples; device {scan.device}; "
                   f"{scan.timings['total']:.1f} s"), highlight=False)
    if scan.verdict == "backdoor":
        out.print(Text(f"verdict: BACKDOOR suspected, target class(es) {', '.join(map(str, scan.target_classes))}",
                       style="bold red"))
    elif scan.verdict == "inconclusive":
        out.print(Text("verdict: INCONCLUSIVE (the scan could not measure this model)", style="bold yellow"))
        for reason in scan.reasons:
            out.print(Text(f"  - {reason}"), highlight=False)
    else:
        out.print(Text("verdict: clean (no backdoor found)", style="bold green"))
    if out_dir is not None:
        out.print(Text(f"report and trigger images: {out_dir}/"), highlight=False)


@app.command("filter-dataset")
def filter_dataset_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="The model file (same formats as `model`).")],
    inputs: Annotated[Path, typer.Option("--input", help="Images to screen: a folder, an .npz or one image.")],
    clean: Annotated[Path | None, typer.Option(help="Clean samples to compute the UAP from (folder or .npz).")] = None,
    method: Annotated[str, typer.Option(help="uap (Xue et al.) or strip (baseline).")] = "uap",
    samples: Annotated[int, typer.Option(help="Clean samples used for the UAP.")] = 300,
    epsilon: Annotated[float | None, typer.Option(help="L-inf radius of the UAP; default: the smallest "
                                                       "that reaches --fooling-rate.")] = None,
    fooling_rate: Annotated[float, typer.Option(help="Share of clean predictions the UAP must change.")] = 0.9,
    solver: Annotated[str, typer.Option(help="UAP solver: pgd or deepfool.")] = "pgd",
    max_passes: Annotated[int, typer.Option(help="Passes over the clean samples at most.")] = 10,
    strip_frr: Annotated[float, typer.Option(help="STRIP: false rejection rate on clean samples.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Images per screening batch.")] = 256,
    uap: Annotated[Path | None, typer.Option("--uap", help="Use a stored UAP (from --save-uap).")] = None,
    save_uap: Annotated[Path | None, typer.Option(help="Store the UAP for later screening.")] = None,
    copy_to: Annotated[Path | None, typer.Option(help="Copy images into DIR/kept and DIR/flagged.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write manifest.csv/.json, summary and "
                                                               "uap.png here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown summary (CI job summary).")] = None,
    arch: Arch = None, num_classes: NumClasses = None, input_size: InputSize = None, channels: Channels = None,
    mean: Mean = None, std: Std = None, device: Device = "auto", seed: Seed = 0, unsafe_allow_pickle: Unsafe = False,
    as_json: Json = False, debug: Debug = False, quiet: Quiet = False, threads: Threads = None,
    timeout: Timeout = LIMITS.timeout, forward_timeout: ForwardTimeout = LIMITS.forward_timeout,
    max_memory: MaxMemory = None, sandbox: Sandbox = "auto",
) -> None:
    """Flag images whose prediction survives a universal adversarial perturbation; exit 1 when any is flagged."""

    def body() -> int:
        from .filtering import FilterSettings, filter_dataset
        from .report.markdown import filter_markdown
        from .report.writer import write_filter_report

        limits = _limits(timeout, forward_timeout, max_memory)
        settings = FilterSettings(method=method, samples=samples, seed=seed, epsilon=epsilon,
                                  fooling_rate=fooling_rate, solver=solver, max_passes=max_passes,
                                  strip_frr=strip_frr, batch_size=batch_size)
        settings.check()
        for target in (copy_to, out_dir):
            if target is not None and _inside(target, inputs):
                raise ScanError("refusing to write inside the input", path=target,
                                hint="choose a folder outside --input; the input is never modified")
        code = run_supervised(ctx, sandbox, limits, device, [out_dir, copy_to], [markdown, save_uap], err)
        if code is not None:
            return code
        _set_threads(threads)
        with _progress(not quiet) as progress:
            result = filter_dataset(checkpoint, clean, inputs, settings=settings, uap_file=uap,
                                    save_uap_to=save_uap, copy_to=copy_to, progress=progress, limits=limits,
                                    **_model_options(arch, num_classes, input_size, channels, mean, std, device,
                                                     unsafe_allow_pickle))
        if out_dir is not None:
            write_filter_report(result, out_dir)
        return _emit(result, as_json, markdown, filter_markdown, lambda: _print_filter(result))

    _run(debug, body)


def _inside(target: Path, inputs: Path) -> bool:
    """Whether `target` is the input folder or below it."""
    if not inputs.is_dir():
        return False
    root, path = inputs.resolve(), target.resolve()
    return path == root or root in path.parents


def _print_filter(result) -> None:
    table = Table(title=escape(f"screening of {result.input}"))
    for col in ("predicted class", "images", "flagged", "expected without a trigger"):
        table.add_column(col, justify="right")
    for row in result.per_class:
        style = "bold red" if row["class"] == result.suspected_target else None
        table.add_row(str(row["class"]), str(row["images"]), str(row["flagged"]), f"{row['expected']:.1f}",
                      style=style)
    out.print(table)
    if result.method == "uap":
        out.print(f"UAP: L-inf epsilon {result.epsilon:.4f}, fooling rate {result.fooling_rate:.2f}",
                  highlight=False)
    if result.skipped:
        out.print(Text(f"{len(result.skipped)} unreadable file(s) skipped", style="yellow"))
    line = f"{result.flagged} of {result.total} images flagged as trigger-carrying"
    if result.suspected_target is not None:
        line += f"; flags concentrate on class {result.suspected_target} (likely backdoor target)"
    out.print(Text(line, style=f"bold {'red' if result.flagged else 'green'}"))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="backdoorscan")


if __name__ == "__main__":
    sys.exit(main())
