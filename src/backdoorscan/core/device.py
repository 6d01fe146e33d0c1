"""Resolve a device name (`auto`, `cpu`, `cuda`, `cuda:1`) to a torch.device, once per scan."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ScanError

if TYPE_CHECKING:
    import torch

DEFAULT_DEVICE = "auto"  # CUDA when present, else the CPU


def resolve_device(name: str | torch.device = DEFAULT_DEVICE) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; asking for CUDA without a GPU is an input error."""
    import torch

    if isinstance(name, torch.device):
        return name
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScanError(f"device {name!r} was asked for, but no CUDA device is available", hint="use the CPU")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ScanError(f"unknown device {name!r}", hint="use auto, cpu or cuda") from exc


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """The CPUs this process may really use, and how that was decided: its CPU affinity, lowered by a cgroup v2
    CPU quota (a container or a CI runner limited to 1.5 CPUs gets 1 thread, not one per core of the host)."""
    import math
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
        why = f"CPU affinity {cpus}"
    except (AttributeError, OSError):
        cpus, why = os.cpu_count() or 1, f"{os.cpu_count() or 1} CPUs"
    try:
        with open(f"{cgroup_root}/cpu.max", encoding="ascii") as fh:
            quota, period = (fh.read(64).split() + ["max", "100000"])[:2]
        if quota != "max" and float(period) > 0:
            limit = float(quota) / float(period)
            if limit < cpus:
                cpus, why = max(1, math.floor(limit)), f"{why}, cgroup quota {limit:g} CPUs"
    except (OSError, ValueError):
        pass
    return max(1, cpus), why
