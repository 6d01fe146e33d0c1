"""Shared fixtures: the bundled real MNIST digits, the committed demo models, a quickly trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backdoorlab.data import BUNDLED_MNIST, bundled_digits

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
MODELS = ROOT / "models"
MNIST_TEST = BUNDLED_MNIST["test"]
ARCHS_FILE = ROOT / "lab/backdoorlab/archs.py"  # --arch path/to/archs.py:NAME reaches the lab's architectures
BADNETS = MODELS / "mnist_badnets_3x3.pt2"  # BadNets 3x3, target 4 (models/zoo.json)
CLEAN = MODELS / "mnist_clean.pt2"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bundled real MNIST: 8,000 training and 2,000 test digits in [0, 1]."""
    return bundled_digits()


@pytest.fixture(scope="session")
def small_model(digits) -> torch.nn.Module:
    """A small CNN trained for one epoch on real digits (enough to be a real, accurate classifier)."""
    from backdoorlab import mnist_cnn, train_classifier

    x, y, xt, yt = digits
    result = train_classifier(mnist_cnn, x, y, xt, yt, epochs=2, seed=0)
    assert result.accuracy > 0.8
    return result.model


@pytest.fixture(scope="session")
def attack_meta() -> dict:
    """The demo model's trigger, as recorded by scripts/make_demo_models.py."""
    import json

    return json.loads((MODELS / "zoo.json").read_text())["mnist_badnets_3x3"]["attack"]
