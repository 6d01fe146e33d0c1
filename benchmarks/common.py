"""Data for the benchmarks: ../shared/data when present (said clearly when absent), else the bundled subsets."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from backdoorscan.loading import to_model_format

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def mnist(split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """MNIST train or test as [0, 1] tensors, and where they came from."""
    shared = SHARED / f"mnist_{split}.npz"
    if shared.exists():
        d, where = np.load(shared), str(shared)
    else:
        bundled = ROOT / ("data/mnist/train_8000.npz" if split == "train" else "data/mnist/test_2000.npz")
        print(f"NOTE: {shared} is absent; using the bundled subset {bundled.name} (smaller, figures differ)",
              file=sys.stderr)
        d, where = np.load(bundled), str(bundled)
    return to_model_format(d["x"], (1, 28, 28)), torch.from_numpy(d["y"]), where


def device_name(device: torch.device) -> str:
    """A human name for the device the figures were taken on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
