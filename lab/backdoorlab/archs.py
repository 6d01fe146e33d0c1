"""Architectures of the zoo. Self-contained (torch and torchvision only), so that a weights-only file of any of
them scans with `--arch lab/backdoorlab/archs.py:NAME` or `--arch backdoorlab.archs:NAME`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def mnist_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Two conv layers and two linear layers for 28x28 inputs (the USB paper's small CNN, max-pooled)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def mnist_cnn_bn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The same CNN with batch norm after each convolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _cifar_small(num_classes: int, in_channels: int, batch_norm: bool) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            *([nn.BatchNorm2d(cout)] if batch_norm else []),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(in_channels, 32),
        *block(32, 64),
        *block(64, 128),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def cifar_small(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Three conv layers (32, 64, 128) and two linear layers for 32x32 inputs: trains on a laptop CPU."""
    return _cifar_small(num_classes, in_channels, batch_norm=False)


def cifar_small_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The same small CIFAR CNN with batch norm after each convolution."""
    return _cifar_small(num_classes, in_channels, batch_norm=True)


def cifar_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A VGG-style CNN with batch norm for 32x32 inputs."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(in_channels, 32),
        *block(32, 64),
        *block(64, 128),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (3x3 conv, stride 1, no max-pool)."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class Normalised(nn.Module):
    """A model that normalises its own [0, 1] input with a mean and std, as many published checkpoints do."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def mnist_cnn_norm(num_classes: int = 10) -> nn.Module:
    """The small MNIST CNN with MNIST's mean and std inside."""
    return Normalised(mnist_cnn(num_classes), (0.1307,), (0.3081,))


def cifar_small_bn_norm(num_classes: int = 10) -> nn.Module:
    """The small CIFAR CNN with batch norm and CIFAR-10's mean and std inside."""
    return Normalised(cifar_small_bn(num_classes), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


def bn_cnn4(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Four 3x3 conv layers with batch norm, two max-pools, two linear layers, for 32x32 inputs: the shape of the
    small-data models trained elsewhere that passed as clean with 3x3 patches (issue 26)."""

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(in_channels, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def bn_cnn4_mnist_norm(num_classes: int = 10) -> nn.Module:
    """bn_cnn4 with MNIST's mean and std applied to every RGB channel inside: a mismatched normalisation, as in
    the model trained elsewhere."""
    return Normalised(bn_cnn4(num_classes), (0.1307,) * 3, (0.3081,) * 3)


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": mnist_cnn,
    "mnist_cnn_bn": mnist_cnn_bn,
    "cifar_small": cifar_small,
    "cifar_small_bn": cifar_small_bn,
    "cifar_cnn": cifar_cnn,
    "cifar_resnet18": cifar_resnet18,
    "mnist_cnn_norm": mnist_cnn_norm,
    "cifar_small_bn_norm": cifar_small_bn_norm,
    "bn_cnn4": bn_cnn4,
    "bn_cnn4_mnist_norm": bn_cnn4_mnist_norm,
}
