"""The `backdoorscan` command: parse options, call the library, print with rich, map outcomes to exit codes.

Exit codes: 0 no backdoor found / nothing flagged, 1 backdoor suspected / images flagged, 2 could not scan,
3 inconclusive (the model loaded but the scan could not measure it).

Options come from the library (`options.py`): the settings dataclasses give their names, defaults and choices.
By default a scan runs in a child process that is sandboxed (`safety.sandbox`) and killed at `--timeout`; this
process only supervises it and relays its output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import __version__
from ..core.errors import ExitCode, Inconclusive, ScanError
from ..core.jsonout import dumps
from ..core.settings import FilterSettings, ScanSettings
from ..safety.confine import CHILD_ENV, die_with_parent
from ..safety.limits import Limits
from ..safety.paths import check_outputs
from . import options as opt
from .supervise import output_path, run_supervised
from .views import error_line, out

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Scan image classifiers for backdoors and screen datasets for trigger-carrying images.",
)

Markdown = Annotated[Path | None, typer.Option(help="Write a Markdown summary (CI job summary).")]


def _quiet(debug: bool) -> None:
    """torch's loggers and Python warnings (a model may raise them) stay silent unless --debug."""
    if not debug:
        logging.getLogger("torch").setLevel(logging.CRITICAL + 1)
        warnings.simplefilter("ignore")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a cancelled CI job, a closed terminal), handled as Ctrl-C is: the child's process tree is
    killed, its scratch folder removed, and no report written."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_interrupt():
    """While a command runs in the main thread: SIGTERM and SIGHUP raise `Terminated`; the old handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]  # no SIGHUP on Windows
    old = {sig: signal.signal(sig, _terminate) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run(debug: bool, body: Callable[[], int]) -> None:
    """Run a command body; ScanError -> one line and exit 2 (Inconclusive: exit 3), any other failure -> exit 2."""
    die_with_parent()  # a scanning child: never outlive the supervisor
    try:
        with _signals_interrupt():
            _quiet(debug)
            code = body()
    except Inconclusive as exc:
        if debug:
            traceback.print_exc()
        error_line("inconclusive", exc.one_line().replace("inconclusive: ", "", 1), "bold yellow")
        code = exc.exit_code
    except ScanError as exc:
        if debug:
            traceback.print_exc()
        error_line("error", exc.one_line())
        code = ExitCode.ERROR
    except KeyboardInterrupt as exc:
        stopped = f"stopped by {exc.args[0]}; " if isinstance(exc, Terminated) else ""
        error_line("interrupted", f"{stopped}no report was written")
        code = ExitCode.ERROR
    except Exception as exc:  # a bug or an unexpected input: still a CI-safe exit code
        if debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
        error_line("error", f"could not scan: {type(exc).__name__}: {first} (rerun with --debug for the traceback)")
        code = ExitCode.ERROR
    finally:
        from ..safety.limits import cancel_watchdog

        cancel_watchdog()
    if os.environ.get(CHILD_ENV) is not None:  # a sandboxed child: stop without waiting for
        sys.stdout.flush()  # a model thread that may never return
        sys.stderr.flush()
        os._exit(int(code))
    raise typer.Exit(int(code))


def _scan_here(
    ctx: typer.Context,
    run: dict[str, Any],
    dirs: list[Path | None],
    files: list[Path | None],
    copies: Path | None = None,
    copies_from: Path | None = None,
) -> tuple[int | None, Any, Limits, str | None]:
    """Supervise a sandboxed child (its exit code), or get this process ready to scan (None, the device); the
    limits the run options set; and the note on the threads chosen, if one is due (`_announced` prints it)."""
    from ..core.device import resolve_device
    from ..safety.child import confine_self
    from .views import err

    limits = opt.limits(run)
    code = run_supervised(ctx, run["sandbox"], limits, dirs, files, err, copies, copies_from)
    if code is not None:
        return code, None, limits, None
    device = resolve_device(run["device"])
    confine_self(run["sandbox"], limits, device, run["threads"])
    import torch

    note = None
    if run["threads"] is not None:
        torch.set_num_threads(max(1, run["threads"]))
    elif device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):  # torch's default: every core of the host
        from ..core.device import usable_cpus

        threads, why = usable_cpus()
        torch.set_num_threads(threads)
        if not run["quiet"] and not run["as_json"]:
            note = f"{threads} ({why}; --threads to choose)"
    return None, device, limits, note


def _announced(
    progress: Callable[[str, int, int], None] | None, note: str | None
) -> Callable[[str, int, int], None] | None:
    """The progress callback, printing the threads note at its first update: once the model has loaded and the
    scan runs, so that a refusal stays the one line it must be."""
    if progress is None or note is None:
        return progress
    pending = [note]

    def update(phase: str, done: int, total: int) -> None:
        if pending:
            error_line("threads", pending.pop(), "dim")
        progress(phase, done, total)

    return update


def _emit(
    result: Any, run: dict[str, Any], markdown: Path | None, to_markdown: Callable[[Any], str], show: Callable[[], None]
) -> int:
    """Write the Markdown summary, print JSON or the human view, and return the result's exit code."""
    from ..report.writer import write_markdown

    if markdown is not None:
        write_markdown(markdown, to_markdown(result))
    _reader_may_leave(lambda: print(dumps(result.to_dict())) if run["as_json"] else show())
    return result.exit_code


def _reader_may_leave(write: Callable[[], object]) -> None:
    """Print; a reader that stops early (`| head`) ends the output, not the verdict: no traceback, same exit code."""
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        os.close(devnull)


def _version(value: bool) -> None:
    if value:
        out.print(f"backdoorscan {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Scan image classifiers for backdoors and screen datasets for trigger-carrying images."""


@app.command()
@opt.with_options(ScanSettings, opt.model_options, opt.run_options)
def model(
    ctx: typer.Context,
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(
            help="The model(s): .pt2 (torch.export), TorchScript, ONNX, safetensors or state_dict (with --arch) files, "
            "Hugging Face or timm model folders; several, a folder of models or a quoted glob scan a fleet.",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Clean samples: an image folder or an .npz (x, y).")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Write report.json, report.md and trigger images here (a fleet: one folder per model)."
        ),
    ] = None,
    markdown: Markdown = None,
    manifest: Annotated[
        Path | None, typer.Option(help="A TOML manifest of models, each with its own options (docs/ci.md).")
    ] = None,
    sarif: Annotated[
        Path | None, typer.Option(help="Write SARIF 2.1.0 (one result per suspect model) for code scanning.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Result cache (fleets use ~/.cache/backdoorscan or $BACKDOORSCAN_CACHE_DIR by default); given, "
            "even one model is scanned as a fleet of one, its report under --out/NAME."
        ),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Scan every model of a fleet again.")] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run a fleet on Ray: an address, auto (this machine's cluster) or local (a throwaway local instance)."
        ),
    ] = None,
    **options: Any,
) -> None:
    """Scan classifiers for a backdoor with USB (Universal Soldier); exit 1 suspected, 3 inconclusive, 2 could not
    scan (a fleet exits with its worst model's code)."""
    run = opt.take(opt.run_options, options)
    paths = list(checkpoints or [])

    def body() -> int:
        from ..fleet.plan import is_fleet

        settings_values, model_values = opt.take(ScanSettings, options), opt.take(opt.model_options, options)
        if is_fleet(paths, manifest) or ray is not None or cache_dir is not None:  # --cache-dir: a fleet of one
            return _fleet(
                paths,
                data,
                out_dir,
                markdown,
                manifest,
                sarif,
                cache_dir,
                no_cache,
                ray,
                run,
                settings_values,
                model_values,
            )
        return _single(ctx, paths[0], data, out_dir, markdown, sarif, run, settings_values, model_values)

    _run(run["debug"], body)


def _single(
    ctx: typer.Context,
    checkpoint: Path,
    data: Path | None,
    out_dir: Path | None,
    markdown: Path | None,
    sarif: Path | None,
    run: dict[str, Any],
    settings_values: dict[str, Any],
    model_values: dict[str, Any],
) -> int:
    """One model: scanned in a sandboxed child, its report directly under --out. Until the child is started this
    process imports nothing that loads torch: a supervisor only checks options, relays and writes files."""
    if data is None:
        raise ScanError("--data is needed: the clean samples to scan the model with")
    settings = ScanSettings(**settings_values)
    source = opt.model_source(checkpoint, model_values)
    check_outputs([markdown, sarif], [out_dir], [data], writable=os.environ.get(CHILD_ENV) is None)
    code, device, limits, note = _scan_here(ctx, run, [out_dir], [markdown, sarif])
    if code is not None:
        return code
    from ..report import write_scan_report
    from ..report.markdown import scan_markdown
    from ..safety.confine import LAYERS
    from ..usb.pipeline import scan_model
    from .views import print_scan, progress_bars

    with progress_bars(not run["quiet"]) as progress:
        scan = scan_model(
            source, data, settings=settings, device=device, progress=_announced(progress, note), limits=limits
        )
    scan.sandbox = LAYERS.to_dict()
    if out_dir is not None:
        write_scan_report(scan, output_path(out_dir))
    if sarif is not None:
        from ..fleet.run import FleetItem, FleetResult
        from ..report.sarif import write_sarif

        item = FleetItem(
            checkpoint.name,
            str(checkpoint),
            scan.exit_code,
            scan.timings.get("total", 0.0),
            report=scan.to_dict(),
            report_dir=None if out_dir is None else str(out_dir),
        )
        write_sarif(FleetResult([item]), output_path(sarif))
    return _emit(scan, run, output_path(markdown), scan_markdown, lambda: print_scan(scan, out_dir))


def _fleet(
    paths: list[Path],
    data: Path | None,
    out_dir: Path | None,
    markdown: Path | None,
    manifest: Path | None,
    sarif: Path | None,
    cache_dir: Path | None,
    no_cache: bool,
    ray: str | None,
    run: dict[str, Any],
    settings_values: dict[str, Any],
    model_values: dict[str, Any],
) -> int:
    """Many models: each scanned by its own sandboxed child (locally or on Ray), cached, summed up."""
    from ..fleet.cache import ResultCache
    from ..fleet.plan import CHILD_RUN_KEYS, plan_fleet
    from ..fleet.run import scan_fleet
    from ..report.markdown import fleet_markdown
    from ..report.writer import write_markdown
    from .views import fleet_progress, print_fleet

    given = {k: v for k, v in opt.model_values(model_values).items() if v not in (None, False)}
    chosen = {k: v for k, v in settings_values.items() if v != getattr(ScanSettings, k, None)}
    entries = plan_fleet(paths, data, given, chosen, manifest)
    check_outputs([markdown, sarif], [out_dir], list({e.data for e in entries}))
    runner, where = None, "local"  # scan_fleet's default: one child after another on this machine
    if ray is not None:
        from ..fleet.ray import ray_runner

        runner, where = ray_runner(ray, run["sandbox"], float(run["timeout"]), run["threads"])
    cache = None if no_cache else ResultCache(cache_dir)
    if cache is not None:
        cache.timeout = run["timeout"]  # the parent's hashing is bounded too
    with fleet_progress(len(entries), not run["quiet"] and not run["as_json"]) as on_item:
        result = scan_fleet(
            entries,
            run={k: run[k] for k in (*CHILD_RUN_KEYS, "sandbox", "timeout")},
            out=out_dir,
            cache=cache,
            runner=runner,
            runner_name=where,
            on_item=on_item,
        )
    if sarif is not None:
        from ..report.sarif import write_sarif

        write_sarif(result, sarif)
    if markdown is not None:
        write_markdown(markdown, fleet_markdown(result))

    def show() -> None:
        if run["as_json"]:
            for item in result.items:
                print(dumps(item.line(), indent=None))
            print(dumps(result.summary(), indent=None))
        else:
            print_fleet(result)

    _reader_may_leave(show)
    return result.exit_code


@app.command("filter")
@opt.with_options(FilterSettings, opt.model_options, opt.run_options)
def filter_dataset_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="The model file (same formats as `model`).")],
    inputs: Annotated[Path, typer.Option("--input", help="Images to screen: a folder, an .npz or one image.")],
    clean: Annotated[Path | None, typer.Option(help="Clean samples to compute the UAP from (folder or .npz).")] = None,
    uap: Annotated[
        Path | None, typer.Option("--uap", help="Use a stored UAP (from --save-uap, or a report's uap.safetensors).")
    ] = None,
    save_uap: Annotated[Path | None, typer.Option(help="Store the UAP for later screening.")] = None,
    triggers: Annotated[
        Path | None,
        typer.Option(
            "--triggers",
            help="With --method erase: the triggers a model scan named (DIR/triggers.safetensors of "
            "`backdoorscan model --out DIR`), undone on each input.",
        ),
    ] = None,
    copy_to: Annotated[Path | None, typer.Option(help="Copy images into DIR/kept and DIR/flagged.")] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write manifest.csv/.json, summary.md, uap.png and uap.safetensors here."),
    ] = None,
    markdown: Markdown = None,
    **options: Any,
) -> None:
    """Flag images that carry a trigger: their prediction survives a universal adversarial perturbation (default),
    or leaves a scanned trigger's target once that trigger is undone (--method erase); exit 1 when any is flagged."""
    run = opt.take(opt.run_options, options)

    def body() -> int:
        settings = FilterSettings(**opt.take(FilterSettings, options))
        source = opt.model_source(checkpoint, opt.take(opt.model_options, options))
        check_outputs(
            [markdown, save_uap],
            [out_dir, copy_to],
            [inputs, clean, triggers],
            writable=os.environ.get(CHILD_ENV) is None,
        )
        code, device, limits, note = _scan_here(
            ctx, run, [out_dir], [markdown, save_uap], copies=copy_to, copies_from=inputs
        )
        if code is not None:
            return code
        from ..report.markdown import filter_markdown
        from ..report.writer import write_filter_report
        from ..screen.pipeline import filter_dataset
        from .views import print_filter, progress_bars

        with progress_bars(not run["quiet"]) as progress:
            result = filter_dataset(
                source,
                clean,
                inputs,
                settings=settings,
                uap_file=uap,
                save_uap_to=output_path(save_uap),
                copy_to=output_path(copy_to),
                triggers=triggers,
                device=device,
                progress=_announced(progress, note),
                limits=limits,
            )
        if out_dir is not None:
            write_filter_report(result, output_path(out_dir))
        return _emit(result, run, output_path(markdown), filter_markdown, lambda: print_filter(result))

    _run(run["debug"], body)


app.command("filter-dataset", help="The same command as `filter` (its earlier name, kept as an alias).")(
    filter_dataset_cmd
)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="backdoorscan")


if __name__ == "__main__":
    main()
