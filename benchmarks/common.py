"""What the benchmark scripts share beyond the lab's data loaders: where a zoo's clean samples are, device names."""

from __future__ import annotations

from pathlib import Path

import torch

from backdoorlab.data import BUNDLED_MNIST, ROOT, SHARED

__all__ = ["BUNDLED_TEST", "ROOT", "SHARED", "clean_data", "clean_samples", "device_name", "zoo_model"]

BUNDLED_TEST = BUNDLED_MNIST["test"]  # the bundled clean digits (demo, tests, fallback)


def clean_samples(zoo: Path, meta: dict) -> str:
    """The clean samples a zoo's scans use: its clean.npz (older MNIST zoos have none: the bundled test digits)."""
    if meta.get("clean_samples"):
        return str(zoo / meta["clean_samples"])
    return str(BUNDLED_TEST)


def clean_data(zoo: Path) -> Path:
    """The clean samples a families zoo's models are scanned with: ZOO/clean.npz where the builder wrote one
    (CIFAR-10), else the bundled MNIST test digits."""
    return zoo / "clean.npz" if (zoo / "clean.npz").exists() else BUNDLED_TEST


def device_name(device: torch.device) -> str:
    """A human name for the device the figures were taken on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def zoo_model(path: Path, settings) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, int]:
    """A families-zoo model file (PATH.pt2) on its zoo's clean samples (`clean_data`), drawn as a default scan draws
    (`settings`' samples and seed), on the CPU: the wrapped model, the samples, the predictions, the classes."""
    from backdoorscan import ModelSource
    from backdoorscan.loading import prepare

    ready = prepare(
        ModelSource(path.with_suffix(".pt2")),
        str(clean_data(path.parent)),
        samples=settings.samples,
        seed=settings.seed,
        device=torch.device("cpu"),
    )
    assert ready.samples is not None and ready.predictions is not None
    return ready.model, ready.samples.x, ready.predictions, ready.num_classes
