"""Time and memory bounds for a scan: what a hostile model may consume before the scan gives up (exit 2)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..core.errors import ExitCode, ScanError

T = TypeVar("T")
GIB = 1 << 30


def available_memory() -> int:
    """Bytes of memory available to this process now (Linux MemAvailable, else physical memory, else 8 GiB)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GIB


@dataclass(frozen=True)
class Limits:
    """Bounds on one scan. `max_memory` None means 75 % of the memory available when the scan starts."""

    timeout: float = 3600.0  # seconds for the whole scan (CLI watchdog)
    forward_timeout: float = 120.0  # seconds the model's first forward may take
    max_memory: int | None = None  # bytes: archives may not inflate beyond it; CPU scans are capped at it
    max_ratio: float = 100.0  # largest compression ratio of an archive member above 1 MiB

    def memory_bytes(self) -> int:
        """The memory bound in bytes, derived from the machine when not set."""
        return int(self.max_memory) if self.max_memory is not None else int(available_memory() * 0.75)

    def __post_init__(self) -> None:
        """Reject bounds that cannot work, when they are made."""
        if self.timeout <= 0 or self.forward_timeout <= 0:
            raise ScanError("the timeout and the forward timeout must be positive")
        if self.max_memory is not None and self.max_memory < 64 * (1 << 20):
            raise ScanError("the memory bound must be at least 64 MB")
        if self.max_ratio < 1:
            raise ScanError("the compression ratio bound must be at least 1")


def parse_bytes(text: str | None) -> int | None:
    """`4G`, `512M`, `1.5GiB` or a plain byte count -> bytes."""
    if text is None:
        return None
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number)
    except ValueError as exc:
        raise ScanError(f"--max-memory {text!r} is not a size", hint="e.g. 4G or 512M") from exc
    return int(value * scale)


def call_with_timeout(fn: Callable[[], T], seconds: float, what: str) -> T:
    """Run fn in a helper thread and give up after `seconds`: a forward that never returns cannot hang the scan.

    The helper thread cannot be killed; it is a daemon, and the CLI ends the process after reporting.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="backdoorscan-guarded", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise ScanError(
            f"{what} did not finish within {seconds:g} s",
            hint="a model that never returns is refused; raise --forward-timeout for a slow one",
        )
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


_WATCHDOG: list[threading.Timer] = []


def cancel_watchdog() -> None:
    """Disarm the watchdog of the command that just ended (a library caller's process must outlive it)."""
    while _WATCHDOG:
        _WATCHDOG.pop().cancel()


def start_watchdog(seconds: float) -> threading.Timer:
    """End this process with exit 2 and one line once `seconds` have passed (CLI only, for in-process scans);
    `cancel_watchdog` disarms it when the command ends."""

    def fire() -> None:
        sys.stderr.write(f"error: the scan ran past --timeout {seconds:g} s and was stopped; no report was written\n")
        sys.stderr.flush()
        os._exit(ExitCode.ERROR)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    _WATCHDOG.append(timer)
    return timer
