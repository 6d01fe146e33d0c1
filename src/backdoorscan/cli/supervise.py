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
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

from rich.console import Console
from rich.text import Text

from ..core.choices import SandboxMode, check_choice
from ..core.errors import ExitCode, ScanError
from ..core.escape import relay_line
from ..loading.extensions import IMAGE_EXTENSIONS
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


OUTPUTS_ENV = "BACKDOORSCAN_OUTPUTS"  # in a sandboxed child: where each output is written instead (JSON)


@dataclass
class Outputs:
    """The command's outputs and, for a sandboxed child, the private stand-ins it writes instead.

    The child may write only its private folder: no output option makes a folder of the user's (or a CI runner's
    `$GITHUB_ENV`) writable to it. The parent reads back what the child wrote, bounded and checked
    (`safety.files.read_tree_bounded`: regular files, plain names, capped), and writes the real outputs itself.
    """

    folders: list[Path]  # --out, --copy-to (the last, when `copies`)
    files: list[Path]  # --markdown, --sarif, --save-uap
    copies: Path | None = None  # --copy-to: the screened images sorted into kept/ and flagged/
    copies_from: Path | None = None  # --input, what --copy-to copies
    stand_in: dict[str, str] = field(default_factory=dict)  # real path -> private path

    @staticmethod
    def of(
        dirs: list[Path | None],
        files: list[Path | None],
        copies: Path | None = None,
        copies_from: Path | None = None,
    ) -> Outputs:
        folders = [d for d in dirs if d is not None] + ([copies] if copies is not None else [])
        return Outputs(folders, [f for f in files if f is not None], copies, copies_from)

    def assign(self, private: Path) -> None:
        """A private stand-in for every output, below `private`."""
        for i, path in enumerate([*self.folders, *self.files]):
            self.stand_in[str(path)] = str(private / f"{i}-{path.name or 'out'}")

    def deliver(self) -> None:
        """Write the real outputs from what the child left in its stand-ins (absent: nothing is written)."""
        from ..report.writer import atomic_output_dir, is_step_summary, write_bytes_atomic, write_markdown, write_tree
        from ..safety.files import OUTPUT_LIMIT, read_bounded, read_tree_bounded

        for folder in self.folders:
            private = Path(self.stand_in[str(folder)])
            if private.is_dir() and folder == self.copies and self.copies_from is not None:
                _deliver_copies(private, folder, self.copies_from)
            elif private.is_dir():
                files = read_tree_bounded(private)
                _check_names(files, copies=folder == self.copies, folder=folder)
                last = next((n for n in ("report.json", "manifest.json") if n in files), "")
                with atomic_output_dir(folder, last) as stage:
                    write_tree(stage, files)
        for file in self.files:
            private = Path(self.stand_in[str(file)])
            if os.path.lexists(private):
                data = read_bounded(private, OUTPUT_LIMIT, "output file", nofollow=True)
                if is_step_summary(file):  # the parent's environment names it; the child's does not
                    write_markdown(file, data.decode("utf-8", errors="replace"))
                else:
                    write_bytes_atomic(file, data)


COPY_FILES = 5_000_000  # images one --copy-to may sort
IMAGE_FILE_LIMIT = 1 << 30  # bytes of one copied image: Pillow decodes none near it (its limit: 89 Mpx)


def _deliver_copies(private: Path, dest: Path, source: Path) -> None:
    """--copy-to: where each image goes is the child's answer (the names it sorted into kept/ and flagged/), the
    bytes are the input's own, streamed by the parent from the input, so that a dataset of any size is delivered
    (the report files' byte and file caps held --copy-to to 256 MiB and 20,000 images) and the child hands back
    no content of its own. An .npz input's kept.npz and flagged.npz are the child's, at most twice the input."""
    from ..report.writer import atomic_output_dir
    from ..safety.files import OUTPUT_LIMIT, copy_bounded, list_tree_bounded, plain_relative

    names = list_tree_bounded(private, COPY_FILES)
    _check_names(names, copies=True, folder=dest)
    npz_limit = max(OUTPUT_LIMIT, 2 * source.stat().st_size + (1 << 20)) if source.is_file() else 0
    with atomic_output_dir(dest, "") as stage:
        for name in names:
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            if name in ("kept.npz", "flagged.npz") and npz_limit:
                copy_bounded(private / name, stage / name, npz_limit, "sorted .npz")
                continue
            rel = name.split("/", 1)[-1]
            if source.is_dir() and plain_relative(rel) and (source / rel).is_file():
                original = (source / rel).resolve()  # a link in the dataset is copied as the file it names, as cp -L
            elif not source.is_dir() and rel == source.name:
                original = source.resolve()
            else:
                raise ScanError(f"refused: the scanning process sorted {name[:80]!r}, not an input", path=dest)
            copy_bounded(original, stage / name, IMAGE_FILE_LIMIT, "input image")


REPORT_SUFFIXES = (".json", ".md", ".png", ".csv", ".safetensors")  # what a report folder holds
COPY_SUFFIXES = (".npz", *sorted(IMAGE_EXTENSIONS))  # what --copy-to holds: the screened images, or two .npz


def _check_names(files: Iterable[str], copies: bool, folder: Path) -> None:
    """Only what the command writes: a report folder's flat report files; --copy-to's kept/ and flagged/ images (or
    kept.npz and flagged.npz). Anything else the child left (a script, a hidden file) refuses the whole output."""
    for name in files:
        parts = name.split("/")
        if copies:
            ok = parts[0] in ("kept", "flagged") or name in ("kept.npz", "flagged.npz")
            ok = ok and name.lower().endswith(COPY_SUFFIXES)
        else:
            ok = len(parts) == 1 and name.lower().endswith(REPORT_SUFFIXES)
        if not ok:
            raise ScanError(f"refused: the scanning process left an unexpected file {name[:80]!r}", path=folder)


@overload
def output_path(path: Path) -> Path: ...


@overload
def output_path(path: None) -> None: ...


def output_path(path: Path | None) -> Path | None:
    """Where this process writes an output: itself, or in a sandboxed child its private stand-in."""
    if path is None:
        return None
    stand_in = json.loads(os.environ.get(OUTPUTS_ENV) or "{}")
    return Path(stand_in.get(str(path), path))


def run_supervised(
    ctx,
    mode: SandboxMode,
    limits: Limits,
    dirs: list[Path | None],
    files: list[Path | None],
    console: Console,
    copies: Path | None = None,
    copies_from: Path | None = None,
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
    return _spawn(ctx, Outputs.of(dirs, files, copies, copies_from), limits, console)


def _spawn(ctx, outputs: Outputs, limits: Limits, console: Console) -> int:
    """Run the command in a child whose only writable folder is a private one (its temporary files and its
    outputs' stand-ins), then write the outputs from what it left there; remove the folder after."""
    with tempfile.TemporaryDirectory(prefix="backdoorscan-") as scratch:
        outputs.assign(Path(scratch) / "outputs")
        (Path(scratch) / "outputs").mkdir()
        code = _supervise(ctx, [scratch], scratch, outputs, limits, console)
        if code in (ExitCode.CLEAN, ExitCode.BACKDOOR, ExitCode.INCONCLUSIVE):
            try:
                outputs.deliver()
            except ScanError as exc:
                console.print(Text.assemble(("error: ", "bold red"), exc.one_line()), highlight=False)
                return ExitCode.ERROR
        return code


def _supervise(ctx, writable: list[str], scratch: str, outputs: Outputs, limits: Limits, console: Console) -> int:
    argv = [sys.executable, "-m", "backdoorscan", *_argv_from_context(ctx)]
    env = child_environment(writable, scratch)
    env[OUTPUTS_ENV] = json.dumps(outputs.stand_in)
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
