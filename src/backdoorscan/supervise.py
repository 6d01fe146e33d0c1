"""Run a CLI command's scan in a sandboxed child process and supervise it: relay its output, enforce --timeout.

The parent never loads the model. It re-runs the same command line in a child (`python -m backdoorscan ...`)
with `BACKDOORSCAN_SANDBOX_CHILD` naming the folders the child may write (the outputs and a private temporary
folder, removed afterwards); the child restricts itself with Landlock before touching the model file and caps
its memory on CPU. At the deadline the parent kills the child, so a forward that never returns ends in exit 2
with one line; reports are written atomically, so none is half written.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from .choices import SandboxMode, check_choice
from .errors import ScanError
from .safety import sandbox
from .safety.limits import Limits, cap_process_memory, start_watchdog

if TYPE_CHECKING:
    import torch

DEFAULT_SANDBOX: SandboxMode = "auto"
CHILD_ENV = "BACKDOORSCAN_SANDBOX_CHILD"
DIED = "the scanning process died (status {code}); no verdict"


def child_environment(writable: list[str] | None, scratch: str) -> dict[str, str]:
    """The environment of a scanning child: a private TMPDIR, and the folders it may write when it is to confine
    itself (None: it runs unconfined)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": scratch}
    env.pop(CHILD_ENV, None)
    if writable is not None:
        env[CHILD_ENV] = json.dumps(writable)
    return env


def _argv_from_context(ctx) -> list[str]:
    """The command line that gives the same parameters (the child parses it exactly as this process did).

    `ctx` is the command's `typer.Context`: its parameters are click-style options and arguments.
    """
    args: list[str] = [ctx.info_name or ""]
    positional: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        kind = getattr(param, "param_type_name", "")
        if kind == "argument":
            positional += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif kind == "option" and getattr(param, "is_flag", False):
            if value and not param.default:
                args.append(param.opts[0])
            elif not value and param.default and param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif kind == "option" and value is not None:
            args += [param.opts[0], str(value)]
    return args + ["--", *positional]


def _relay(stream, sink) -> None:
    for line in iter(stream.readline, b""):
        sink.write(line.decode("utf-8", errors="replace"))
        sink.flush()


def _writable(dirs: list[Path | None], files: list[Path | None]) -> list[str]:
    """Create the output folders (and the parents of output files) so that the sandbox can name them."""
    out = []
    for folder in [d for d in dirs if d is not None] + [f.parent for f in files if f is not None]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ScanError(f"cannot create the output folder ({exc.strerror})", path=folder) from exc
        out.append(str(folder.resolve()))
    return out


def run_supervised(ctx, mode: SandboxMode, limits: Limits, dirs: list[Path | None], files: list[Path | None],
                   console: Console) -> int | None:
    """In the parent: run the command in a sandboxed child and return its exit code. In the child, or when the
    sandbox is off or unavailable under `auto`: return None, and the caller scans in this process after `confine`.
    """
    check_choice("sandbox mode", mode, SandboxMode)
    if os.environ.get(CHILD_ENV) is not None or mode == "off":
        return None
    if sandbox.landlock_abi() < 1:
        if mode == "on":
            raise ScanError("--sandbox on: Landlock is not available on this system",
                            hint="use --sandbox auto to scan without it (see docs/security.md)")
        return None
    return _spawn(ctx, _writable(dirs, files), limits, console)


def confine(mode: SandboxMode, limits: Limits, device: torch.device) -> None:
    """In the process that scans, before the model is opened: in a sandboxed child, Landlock and (on CPU) the
    memory cap; in-process, a watchdog that ends the scan at the timeout.
    """
    if os.environ.get(CHILD_ENV) is None:
        start_watchdog(limits.timeout)
        return
    result = sandbox.apply(json.loads(os.environ[CHILD_ENV]))
    if not result.enforced and mode == "on":
        raise ScanError(f"--sandbox on: {result.reason}")
    if device.type == "cpu":
        cap_process_memory(limits.memory_bytes() + (512 << 20))  # the bound plus the interpreter and torch


def _spawn(ctx, writable: list[str], limits: Limits, console: Console) -> int:
    """Run the command in a child with a private temporary folder (torch's loaders need one); remove it after."""
    with tempfile.TemporaryDirectory(prefix="backdoorscan-") as scratch:
        return _supervise(ctx, [*writable, scratch], scratch, limits, console)


def _supervise(ctx, writable: list[str], scratch: str, limits: Limits, console: Console) -> int:
    argv = [sys.executable, "-m", "backdoorscan", *_argv_from_context(ctx)]
    env = child_environment(writable, scratch)
    streams = []
    for stream in (sys.stdout, sys.stderr):
        try:
            inherit = stream.isatty() and stream.fileno() >= 0
        except (AttributeError, ValueError, OSError):
            inherit = False
        streams.append(None if inherit else subprocess.PIPE)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=streams[0], stderr=streams[1], env=env)
    relays = [threading.Thread(target=_relay, args=(pipe, sink), daemon=True)
              for pipe, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)) if pipe is not None]
    for relay in relays:
        relay.start()
    try:
        code = proc.wait(timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for relay in relays:
            relay.join(5)
        console.print(Text.assemble(("error: ", "bold red"), f"the scan ran past --timeout {limits.timeout:g} s "
                                    "and was stopped; no report was written"), highlight=False)
        return 2
    except KeyboardInterrupt:
        proc.kill()
        raise
    for relay in relays:
        relay.join(10)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    if code < 0 or code > 3:  # killed by a signal or crashed in native code
        console.print(Text.assemble(("error: ", "bold red"), DIED.format(code=code)), highlight=False)
        return 2
    return code
