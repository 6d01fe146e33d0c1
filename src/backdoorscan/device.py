"""Resolve `--device auto|cpu|cuda` to a torch.device."""

from __future__ import annotations

import torch

from .errors import ScanError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU; an explicit `cuda` without a GPU is an input error."""
    if isinstance(name, torch.device):
        return name
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScanError("--device cuda was asked for, but no CUDA device is available", hint="use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ScanError(f"unknown device {name!r}", hint="use auto, cpu or cuda") from exc
