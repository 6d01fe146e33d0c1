"""Rebuild the bundled models: small CNNs trained on the bundled real MNIST digits, one with a BadNets trigger.

    .venv/bin/python scripts/make_demo_models.py

Writes models/mnist_badnets_3x3.pt2 (the demo's backdoored model), models/mnist_clean.pt2 and models/zoo.json
(recipe, clean accuracy and attack success rate of each). Deterministic on the CPU for the seeds below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from backdoorlab import BadNets, make_attack, mnist_cnn, save_model, train_classifier
from backdoorlab.data import SHARED, bundled_digits
from backdoorscan.loading import to_model_format, to_uint8_images

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [("mnist_badnets_3x3", "badnets", 3, 1), ("mnist_clean", None, 0, 3)]


def main() -> None:
    torch.set_num_threads(2)
    x, y, xt, yt = bundled_digits()
    records = {}
    for name, kind, size, seed in RECIPES:
        attack = make_attack(kind, (1, 28, 28), 10, np.random.default_rng(seed), size=size) if kind else None
        result = train_classifier(mnist_cnn, x, y, xt, yt, attack=attack, seed=seed, epochs=6)
        save_model(result.model, ROOT / f"models/{name}.pt2", "pt2", xt[:2])
        records[name] = {
            "arch": "backdoorlab.archs:mnist_cnn",
            "seed": seed,
            "poison_rate": 0.1 if kind else 0,
            "train": "data/mnist/train_8000.npz",
            "epochs": 6,
            "clean_accuracy": round(result.accuracy, 4),
            "asr": None if result.asr is None else round(result.asr, 4),
            "attack": attack.describe() if attack else None,
        }
        print(name, records[name])
    (ROOT / "models/zoo.json").write_text(json.dumps(records, indent=2) + "\n")
    write_screening_demo(records["mnist_badnets_3x3"]["attack"])


def write_screening_demo(attack: dict, n: int = 300) -> None:
    """data/mnist/screen_demo.npz: n held-out clean digits and n triggered ones (of non-target classes).

    The digits are MNIST test rows 5000 onwards (outside the bundled test_2000 subset), from ../shared/data.
    `kind` is 0 for clean and 1 for triggered, so the screening can be scored.
    """
    test = np.load(SHARED / "mnist_test.npz")
    x, y = test["x"][5000 : 5000 + 2 * n], test["y"][5000 : 5000 + 2 * n]
    trig = BadNets(
        target=attack["target"], size=attack["size"], row=attack["row"], col=attack["col"], color=tuple(attack["color"])
    )
    other = np.flatnonzero(y[n:] != trig.target) + n
    stamped = trig.apply(to_model_format(x[other], (1, 28, 28)))
    stamped = to_uint8_images(stamped)
    np.savez_compressed(
        ROOT / "data/mnist/screen_demo.npz",
        x=np.concatenate([x[:n], stamped]),
        y=np.concatenate([y[:n], y[other]]),
        kind=np.concatenate([np.zeros(n, np.int64), np.ones(len(other), np.int64)]),
    )


if __name__ == "__main__":
    main()
