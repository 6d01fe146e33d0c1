"""Varied training recipes for a zoo that does not flatter the method: what real training varies, drawn at random.

Each recipe fixes the architecture, optimiser, learning rate and schedule, epochs, augmentation, training-set
size, and (for a backdoored model) the attack: BadNets patches of 2-5 pixels in a corner, the centre or at random,
solid, random or checkerboard, poisoning 1-10 %; or a blended pattern with alpha 0.1-0.2. A third of the models
are clean. Every fourth recipe is set aside before any tuning (`aside`), to be reported separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SPACES = {
    "mnist": {
        "archs": ("mnist_cnn", "mnist_cnn_bn", "mnist_cnn_norm"),
        "formats": ("pt2", "safetensors", "onnx"),
        "train_sizes": (10000, 20000),
        "epochs": (2, 4, 6),
        "augment": ("none", "crop"),
    },
    "cifar10": {
        "archs": ("cifar_small", "cifar_small_bn", "cifar_small_bn_norm"),
        "formats": ("pt2", "onnx", "safetensors"),
        "train_sizes": (20000, 30000),
        "epochs": (3, 4),
        "augment": ("none", "crop+flip"),
    },
    # 43 traffic-sign classes, 1,720 training images: many epochs; no flips (signs are not mirror-symmetric);
    # no safetensors (a weights file needs the architecture, whose default head has 10 classes)
    # Issue 26: batch-norm CNNs trained elsewhere on small data with mismatched normalisation inside, long
    # training, 2-3 px patches at 1-10 % poisoning; safetensors + architecture among the formats.
    "cifar10_bn": {
        "data": "cifar10",
        "archs": ("bn_cnn4_mnist_norm", "bn_cnn4_mnist_norm", "bn_cnn4"),
        "formats": ("pt2", "safetensors", "onnx"),
        "train_sizes": (15000,),  # about 1,500 a class
        "epochs": (20, 30),
        "augment": ("none", "crop+flip"),
        "kinds": ("badnets",),
        "sizes": (2, 3),
    },
    # The same models at a size one CPU thread trains in minutes (500 a class, not 1,500): fewer images a class
    # is the shape, and a zoo of them can be built and scanned where no GPU is lent.
    "cifar10_bn_small": {
        "data": "cifar10",
        "archs": ("bn_cnn4_mnist_norm", "bn_cnn4_mnist_norm", "bn_cnn4"),
        "formats": ("pt2", "safetensors", "onnx"),
        "train_sizes": (5000,),
        "epochs": (20, 30),
        "augment": ("none", "crop+flip"),
        "kinds": ("badnets",),
        "sizes": (2, 3),
    },
    "gtsrb_bn": {
        "data": "gtsrb",
        "archs": ("bn_cnn4_mnist_norm", "bn_cnn4_mnist_norm", "bn_cnn4"),
        "formats": ("pt2", "safetensors", "onnx"),
        "train_sizes": (1720,),  # 40 a class
        "epochs": (30, 40),
        "augment": ("crop", "none"),
        "kinds": ("badnets",),
        "sizes": (2, 3),
    },
    "gtsrb": {
        "archs": ("cifar_small_bn", "cifar_small_bn_norm"),
        "formats": ("pt2", "onnx"),
        "train_sizes": (1720,),
        "epochs": (30, 40),
        "augment": ("crop",),
    },
}


@dataclass
class Recipe:
    """How one zoo model is trained and attacked."""

    name: str
    dataset: str
    seed: int
    arch: str
    fmt: str
    optimiser: str
    lr: float
    schedule: str
    epochs: int
    augment: str
    train_size: int
    kind: str | None  # None (clean), "badnets" or "blend"
    size: int = 0
    position: str = "random"
    pattern: str = "solid"
    alpha: float = 0.0
    poison_rate: float = 0.0
    aside: bool = False

    @property
    def group(self) -> str:
        """The table row a model falls in: clean, badnets_NxN or blend."""
        return (
            "clean" if self.kind is None else f"badnets_{self.size}x{self.size}" if self.kind == "badnets" else "blend"
        )

    def describe(self) -> dict:
        return asdict(self)


def draw_recipes(dataset: str, n: int, seed: int = 7) -> list[Recipe]:
    """n recipes for `dataset`, deterministic for a seed; recipes i % 3 == 0 are clean, i % 4 == 3 set aside."""
    space, rng = SPACES[dataset], np.random.default_rng(seed)
    out = []
    for i in range(n):
        optimiser = str(rng.choice(["sgd", "adam"]))
        kind = None if i % 3 == 0 else str(rng.choice(space.get("kinds", ["badnets", "badnets", "blend"])))
        recipe = Recipe(
            name=f"{dataset}_{i:03d}",
            dataset=dataset,
            seed=seed * 1000 + i,
            arch=str(rng.choice(space["archs"])),
            fmt=str(space["formats"][i % len(space["formats"])]),
            optimiser=optimiser,
            lr=float(rng.choice([0.05, 0.02]) if optimiser == "sgd" else rng.choice([1e-3, 3e-3])),
            schedule=str(rng.choice(["onecycle", "cosine", "step"])),
            epochs=int(rng.choice(space["epochs"])),
            augment=str(rng.choice(space["augment"])),
            train_size=int(rng.choice(space["train_sizes"])),
            kind=kind,
            aside=i % 4 == 3,
        )
        if kind == "badnets":
            recipe.size = int(rng.choice(space.get("sizes", (2, 3, 4, 5))))
            recipe.position = str(rng.choice(["random", "corner", "centre"]))
            recipe.pattern = str(rng.choice(["solid", "random", "checkerboard"]))
            recipe.poison_rate = float(rng.choice([0.01, 0.03, 0.05, 0.1]))
        elif kind == "blend":
            recipe.alpha = float(np.round(rng.uniform(0.1, 0.2), 3))
            recipe.poison_rate = float(rng.choice([0.03, 0.05, 0.1]))
        out.append(recipe)
    return out
