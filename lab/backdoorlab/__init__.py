"""The lab beside the tool: small real models for tests, the demo and benchmarks, and the data they train on.

Installed for development only (`make setup`); nothing under `src/backdoorscan` imports it.
"""

from .archs import ARCHS, cifar_cnn, cifar_resnet18, cifar_small, cifar_small_bn, mnist_cnn, mnist_cnn_bn
from .attacks import Attack, BadNets, Blend, make_attack
from .export import save_model
from .train import TrainResult, evaluate, train_classifier

__all__ = [
    "ARCHS",
    "Attack",
    "BadNets",
    "Blend",
    "TrainResult",
    "cifar_cnn",
    "cifar_resnet18",
    "cifar_small",
    "cifar_small_bn",
    "evaluate",
    "make_attack",
    "mnist_cnn",
    "mnist_cnn_bn",
    "save_model",
    "train_classifier",
]
