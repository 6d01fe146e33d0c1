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
