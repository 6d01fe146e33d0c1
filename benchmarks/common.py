"""Data for the benchmarks: ../shared/data when present (said clearly when absent), else the bundled subsets."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from backdoorscan.loading import to_model_format

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BUNDLED_TEST = ROOT / "data/mnist/test_2000.npz"  # the bundled clean digits (demo, tests, fallback)


def mnist(split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """MNIST train or test as [0, 1] tensors, and where they came from."""
    shared = SHARED / f"mnist_{split}.npz"
    if shared.exists():
        d, where = np.load(shared), str(shared)
    else:
        bundled = ROOT / "data/mnist/train_8000.npz" if split == "train" else BUNDLED_TEST
        print(f"NOTE: {shared} is absent; using the bundled subset {bundled.name} (smaller, figures differ)",
              file=sys.stderr)
        d, where = np.load(bundled), str(bundled)
    return to_model_format(d["x"], (1, 28, 28)), torch.from_numpy(d["y"]), where


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar10(split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """CIFAR-10 train or test from ../shared's JPEG archive, in a fixed shuffled order (the archive is by class).

    Decoded once and cached as bench-out/cache/cifar10_SPLIT.npz. There is no bundled fallback big enough to train
    on, so without ../shared this exits with a clear message.
    """
    archive = SHARED / "cifar10-jpg.tar.gz"
    cache = ROOT / "bench-out" / "cache" / f"cifar10_{split}.npz"
    if not cache.exists():
        if not archive.exists():
            sys.exit(f"{archive} is absent: the CIFAR-10 benchmarks need the full JPEG archive "
                     "(see data/PROVENANCE.md)")
        from PIL import Image

        images, labels = [], []
        with tarfile.open(archive) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                parts = member.name.split("/")
                if member.isfile() and len(parts) == 4 and parts[1] == split and parts[3].endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                    labels.append(CIFAR10_CLASSES.index(parts[2]))
        order = np.random.default_rng(0).permutation(len(images))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=np.stack(images)[order], y=np.array(labels, dtype=np.int64)[order],
                 classes=np.array(CIFAR10_CLASSES))
    d = np.load(cache)
    return to_model_format(d["x"], (3, 32, 32)), torch.from_numpy(d["y"]), f"{archive} ({split}, shuffled with seed 0)"


def dataset(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`mnist` or `cifar10`, train or test, as [0, 1] (N, C, H, W) tensors and where they came from."""
    if name == "mnist":
        return mnist(split)
    if name == "cifar10":
        return cifar10(split)
    raise SystemExit(f"unknown dataset {name!r}: mnist or cifar10")


def clean_samples(zoo: Path, meta: dict) -> str:
    """The clean samples a zoo's scans use: its clean.npz (older MNIST zoos have none: the bundled test digits)."""
    if meta.get("clean_samples"):
        return str(zoo / meta["clean_samples"])
    return str(BUNDLED_TEST)


def device_name(device: torch.device) -> str:
    """A human name for the device the figures were taken on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
