"""Build a model zoo on real MNIST: clean models and BadNets 2x2 / 3x3 and blended-trigger models.

    .venv/bin/python benchmarks/zoo.py --out bench-out/zoo --per-group 5

Attacks follow the USB paper: 10 % poisoning, random target, random position and colour. Each model is saved as
a user would receive it (.pt2), with its seed, attack, clean accuracy and attack success rate in zoo.json. A
backdoored model whose attack failed (ASR < 90 %) is recorded but not counted, and another seed is trained.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import mnist

from backdoorscan.zoo import ARCHS, make_attack, save_model, train_classifier

GROUPS = {"clean": (None, 0), "badnets_2x2": ("badnets", 2), "badnets_3x3": ("badnets", 3), "blend": ("blend", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/zoo")
    parser.add_argument("--per-group", type=int, default=5)
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--archs", default="mnist_cnn,mnist_cnn_bn", help="cycled through within each group")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, train_src = mnist("train")
    xt, yt, test_src = mnist("test")
    x, y = x[: args.train_size], y[: args.train_size]
    xt, yt = xt[:2000], yt[:2000]  # accuracy and ASR on the first 2,000 test digits
    archs = args.archs.split(",")
    records = []
    for g, group in enumerate(args.groups.split(",")):
        kind, size = GROUPS[group]
        counted, attempt = 0, 0
        while counted < args.per_group and attempt < 2 * args.per_group:
            seed = args.seed + 1000 * g + attempt
            arch = archs[attempt % len(archs)]
            attempt += 1
            attack = make_attack(kind, (1, 28, 28), 10, np.random.default_rng(seed), size=size) if kind else None
            t = time.perf_counter()
            result = train_classifier(ARCHS[arch], x, y, xt, yt, attack=attack, seed=seed, epochs=args.epochs)
            ok = attack is None or result.asr >= 0.9
            name = f"{group}_{seed}"
            if ok:
                save_model(result.model, out / f"{name}.pt2", "pt2", xt[:2])
                counted += 1
            records.append({"name": name, "file": f"{name}.pt2" if ok else None, "group": group, "arch": arch,
                            "seed": seed, "attack": attack.describe() if attack else None,
                            "accuracy": round(result.accuracy, 4),
                            "asr": None if result.asr is None else round(result.asr, 4), "counted": ok,
                            "train_seconds": round(time.perf_counter() - t, 1)})
            print(json.dumps(records[-1]), flush=True)
    meta = {"dataset": "mnist", "train": train_src, "test": test_src, "train_size": len(x), "epochs": args.epochs,
            "poison_rate": 0.1, "models": records}
    (out / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
