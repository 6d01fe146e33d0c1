"""The data the lab trains and tests on: the bundled MNIST subsets, and ../shared/data when it is present.

One loader for the bundled digits serves the tests, the demo-model script and the benchmarks. The full datasets
live in ../shared/data (see data/PROVENANCE.md); their absence is said clearly, never hidden.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from backdoorscan.loading import to_model_format

ROOT = Path(__file__).resolve().parents[2]  # the repository
DATA = ROOT / "data"
SHARED = Path(os.environ.get("BACKDOORLAB_SHARED") or ROOT.parent / "shared" / "data")  # a copy, on a lent GPU
BUNDLED_MNIST = {"train": DATA / "mnist/train_8000.npz", "test": DATA / "mnist/test_2000.npz"}
BUNDLED_GTSRB = {"train": DATA / "gtsrb/train_14.npz", "test": DATA / "gtsrb/test_6.npz"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_npz(path: Path, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """An `.npz` of uint8 images `x` and labels `y` as [0, 1] (N, C, H, W) tensors and int64 labels."""
    with np.load(path) as d:
        return to_model_format(d["x"], shape), torch.from_numpy(d["y"].astype(np.int64))


def bundled_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bundled real MNIST: 8,000 training and 2,000 test digits (x, y, x_test, y_test)."""
    return (*read_npz(BUNDLED_MNIST["train"], (1, 28, 28)), *read_npz(BUNDLED_MNIST["test"], (1, 28, 28)))


def bundled_gtsrb() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bundled real GTSRB: 14 training and 6 held-out images per class, 43 classes, 32x32 (x, y, x_test, y_test)."""
    return (*read_npz(BUNDLED_GTSRB["train"], (3, 32, 32)), *read_npz(BUNDLED_GTSRB["test"], (3, 32, 32)))


def mnist(split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """MNIST train or test from ../shared, else the bundled subset (said on stderr), and where it came from."""
    shared = SHARED / f"mnist_{split}.npz"
    path = shared if shared.exists() else BUNDLED_MNIST[split]
    if path != shared:
        print(
            f"NOTE: {shared} is absent; using the bundled subset {path.name} (smaller, figures differ)", file=sys.stderr
        )
    return (*read_npz(path, (1, 28, 28)), str(path))


def cifar10(split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """CIFAR-10 train or test from ../shared's JPEG archive, in a fixed shuffled order (the archive is by class).

    Decoded once and cached as bench-out/cache/cifar10_SPLIT.npz. There is no bundled fallback big enough to train
    on, so without ../shared this exits with a clear message.
    """
    archive = SHARED / "cifar10-jpg.tar.gz"
    cache = ROOT / "bench-out" / "cache" / f"cifar10_{split}.npz"
    if not cache.exists():
        if not archive.exists():
            sys.exit(
                f"{archive} is absent: the CIFAR-10 benchmarks need the full JPEG archive (see data/PROVENANCE.md)"
            )
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
        np.savez(
            cache,
            x=np.stack(images)[order],
            y=np.array(labels, dtype=np.int64)[order],
            classes=np.array(CIFAR10_CLASSES),
        )
    return (*read_npz(cache, (3, 32, 32)), f"{archive} ({split}, shuffled with seed 0)")


def gtsrb(split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """GTSRB at 32x32 from ../shared (43 classes, 60 images each): per class, 40 images to train on and 20 held
    out for tests and scans, split with seed 0 and shuffled. Without ../shared this exits with a clear message."""
    path = SHARED / "gtsrb_test_32.npz"
    if not path.exists():
        sys.exit(f"{path} is absent: the GTSRB benchmarks need it (see data/PROVENANCE.md)")
    with np.load(path) as d:
        x, y = d["x"], d["y"]
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        train.append(rows[:40])
        test.append(rows[40:])
    rows = np.concatenate(train if split == "train" else test)
    rows = rows[np.random.default_rng(1).permutation(len(rows))]
    xt = torch.from_numpy(x[rows]).permute(0, 3, 1, 2).float() / 255
    return xt, torch.from_numpy(y[rows]), f"{path} ({split}: {len(rows)} images, 40/20 per class, seed 0)"


DATASETS = {"mnist": mnist, "cifar10": cifar10, "gtsrb": gtsrb}
ALIASES = {"cifar10_bn": "cifar10", "cifar10_bn_small": "cifar10", "gtsrb_bn": "gtsrb"}  # spaces on another's data
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "gtsrb": 43}
NUM_CLASSES |= {space: NUM_CLASSES[data] for space, data in ALIASES.items()}


def dataset(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`mnist`, `cifar10` or `gtsrb`, train or test, as [0, 1] (N, C, H, W) tensors and where they came from."""
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise SystemExit(f"unknown dataset {name!r}: one of {', '.join(DATASETS)}")
    return DATASETS[name](split)
