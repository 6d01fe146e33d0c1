"""Run a CLI command's scan in a sandboxed child process and supervise it: relay its output, enforce --timeout.

The parent never loads the model. It re-runs the same command line in a child (`python -m backdoorscan ...`)
with `BACKDOORSCAN_SANDBOX_CHILD` naming the folders the child may write (the outputs and a private temporary
folder, removed afterwards) and an allowlisted environment. The child starts in a session of its own with pipes
for stdio (no terminal), enters new user/network/IPC namespaces, restricts itself with Landlock, sets hard
limits and installs a seccomp filter before touching the model file (`safety/confine.py`). The parent relays its
output escaped, adopts and kills whatever it leaves behind, and kills it at the deadline, so a forward that never
returns ends in exit 2 with one line; reports are written atomically, so none is half written.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from rich.console import Console
from rich.text import Text

from ..core.choices import SandboxMode, check_choice
from ..core.errors import ExitCode, ScanError
from ..core.escape import relay_line
from ..safety import sandbox
from ..safety.child import CHILD_ENV, DIED, child_environment, start_child, watching_tree
from ..safety.limits import Limits

DEFAULT_SANDBOX: SandboxMode = "auto"


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
    """Copy a child's output line by line, each made printable and unable to start a CI workflow command."""
    for line in iter(lambda: stream.readline(1 << 16), b""):
        sink.write(relay_line(line.decode("utf-8", errors="replace")))
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


def run_supervised(
    ctx, mode: SandboxMode, limits: Limits, dirs: list[Path | None], files: list[Path | None], console: Console
) -> int | None:
    """In the parent: run the command in a sandboxed child and return its exit code. In the child, or when the
    sandbox is off or unavailable under `auto`: return None, and the caller scans in this process after `confine`.
    """
    check_choice("sandbox mode", mode, SandboxMode)
    if os.environ.get(CHILD_ENV) is not None or mode == "off":
        return None
    if sandbox.landlock_abi() < 1:
        if mode == "on":
            raise ScanError(
                "--sandbox on: Landlock is not available on this system",
                hint="use --sandbox auto to scan without it (see docs/security.md)",
            )
        return None
    return _spawn(ctx, _writable(dirs, files), limits, console)


def _spawn(ctx, writable: list[str], limits: Limits, console: Console) -> int:
    """Run the command in a child with a private temporary folder (torch's loaders need one); remove it after."""
    with tempfile.TemporaryDirectory(prefix="backdoorscan-") as scratch:
        return _supervise(ctx, [*writable, scratch], scratch, limits, console)


def _supervise(ctx, writable: list[str], scratch: str, limits: Limits, console: Console) -> int:
    argv = [sys.executable, "-m", "backdoorscan", *_argv_from_context(ctx)]
    env = child_environment(writable, scratch)
    with watching_tree() as started:
        proc = start_child(argv, env)
        started.append(proc.pid)
        relays = [
            threading.Thread(target=_relay, args=(pipe, sink), daemon=True)
            for pipe, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
        ]
        for relay in relays:
            relay.start()
        try:
            code = proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            for relay in relays:
                relay.join(5)
            console.print(
                Text.assemble(
                    ("error: ", "bold red"),
                    f"the scan ran past --timeout {limits.timeout:g} s and was stopped; no report was written",
                ),
                highlight=False,
            )
            return ExitCode.ERROR
        except KeyboardInterrupt:
            proc.kill()
            raise
        for relay in relays:
            relay.join(10)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    if code < 0 or code > 3:  # killed by a signal or crashed in native code
        console.print(Text.assemble(("error: ", "bold red"), DIED.format(code=code)), highlight=False)
        return ExitCode.ERROR
    return code
