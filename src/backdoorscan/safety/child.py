"""Start a scanning child and confine it: its environment, its session, its process tree, and (in the child) the
layers it applies to itself before touching the model file.

Used by the CLI's supervisor (one scan) and by the fleet runner (many); the layers themselves are in `confine.py`
(namespaces, limits, seccomp) and `sandbox.py` (Landlock).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..core.choices import SandboxMode
from ..core.errors import ScanError
from . import confine as confine_layers
from . import sandbox
from .limits import Limits, start_watchdog

if TYPE_CHECKING:
    import torch

CHILD_ENV = confine_layers.CHILD_ENV
DIED = "the scanning process died (status {code}); no verdict"


def child_environment(writable: list[str] | None, scratch: str) -> dict[str, str]:
    """The environment of a scanning child: an allowlist of the parent's variables (no tokens or secrets), a
    private TMPDIR, and the folders it may write when it is to confine itself (None: it runs unconfined)."""
    env = confine_layers.scrubbed_environment(
        {"PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": scratch, confine_layers.PARENT_ENV: str(os.getpid())}
    )
    if writable is not None:
        env[CHILD_ENV] = json.dumps(writable)
    return env


def start_child(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A scanning child in a session of its own, with no terminal: stdin closed, stdout and stderr pipes."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        close_fds=True,
    )


@contextlib.contextmanager
def watching_tree() -> Iterator[list[int]]:
    """While a child runs: this process adopts its orphans and hides its own /proc files; afterwards whatever the
    child left (its session, adopted daemons) is killed. Yields the list the caller adds its child's pid to."""
    confine_layers.become_subreaper()
    before = confine_layers.children()
    started: list[int] = []
    with confine_layers.undumpable():
        try:
            yield started
        finally:
            for pid in started:
                confine_layers.kill_tree(pid, before)


def confine_self(mode: SandboxMode, limits: Limits, device: torch.device, threads: int | None = None) -> None:
    """In the process that scans, before the model is opened: in a sandboxed child, Landlock, hard limits (memory
    on CPU) and the seccomp filter, each recorded in `confine.LAYERS` (`--sandbox on` refuses a missing one);
    in-process, a watchdog that ends the scan at the timeout.
    """
    layers = confine_layers.LAYERS
    if os.environ.get(CHILD_ENV) is None:
        layers.missing["all"] = "the scan runs in this process (--sandbox off, or no Landlock)"
        start_watchdog(limits.timeout)
        return
    result = sandbox.apply(json.loads(os.environ[CHILD_ENV]))
    _record(
        layers,
        "landlock",
        None if result.enforced else result.reason,
        f"landlock ABI {result.abi}" + (" (TCP blocked)" if result.network_blocked else ""),
    )
    memory = None
    if device.type == "cpu":
        memory = confine_layers.address_space_bound(limits.memory_bytes(), threads or os.cpu_count() or 1)
    _record(
        layers,
        "limits",
        confine_layers.hard_limits(memory),
        "hard limits (no core files" + (f", address space {memory >> 20} MiB)" if memory else ")"),
    )
    _record(layers, "seccomp", confine_layers.install_seccomp(), "seccomp (no sockets, processes, ptrace, tty input)")
    if mode == "on" and layers.missing:
        raise ScanError(
            f"--sandbox on: {layers.describe()}",
            hint="use --sandbox auto to scan with the layers this kernel has (see docs/security.md)",
        )


def _record(layers: confine_layers.Layers, name: str, problem: str | None, label: str) -> None:
    if problem is None:
        layers.applied.append(label)
    else:
        layers.missing[name] = problem
