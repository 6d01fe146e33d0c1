"""A zoo of backdoors that are not one universal patch (issue 25): source-specific, all-to-all, WaNet, and clean
controls (plain, adversarially trained with PGD, trained like the WaNet models), from random recipes; every fourth
model set aside before tuning.

    .venv/bin/python benchmarks/zoo_families.py --out bench-out/zoo-families --per-family 6
    .venv/bin/python benchmarks/zoo_families.py --dataset cifar10 --out bench-out/zoo-families-cifar10

Models are trained on ../shared MNIST (20,000 training digits; the bundled 8,000 when it is absent, said on
stderr) or CIFAR-10 (20,000 training images, ../shared needed; the varied zoo's small CNNs and 3x3 or 4x4
checkerboard patches, which a CIFAR-10 CNN learns where a solid shade competes with natural colours; the first
2,000 test images are written as ZOO/clean.npz, the scan's clean samples) and saved as `.pt2`; `zoo.json` records
each recipe, its clean accuracy, its attack success rate (on the sources the backdoor covers) and, for
source-specific models, how inert the patch is on other classes. A rerun skips models already built.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from backdoorlab import BadNets, save_model, train_classifier
from backdoorlab.archs import cifar_small, cifar_small_bn, mnist_cnn, mnist_cnn_bn
from backdoorlab.data import dataset
from backdoorlab.families import AllToAll, SourceSpecific, WaNet, inert_rate

# clean_adam: clean controls trained as the WaNet models are (batch-norm CNN, Adam, 6-8 epochs), so that a finding
# on a WaNet model can be told from one the training recipe alone produces (added after the first scan)
FAMILIES = ("source_specific", "all_to_all", "wanet", "clean", "clean_pgd", "clean_adam")


# per dataset: image side, the plain and batch-norm architectures, epochs of an SGD and an Adam recipe, patch pattern
DATASETS = {
    "mnist": {"side": 28, "archs": ("mnist_cnn", "mnist_cnn_bn"), "epochs": (3, 4), "adam": (6, 8), "pattern": "solid"},
    "cifar10": {
        "side": 32,
        "archs": ("cifar_small", "cifar_small_bn"),
        "epochs": (8, 10),
        "adam": (10, 12),
        "pattern": "checkerboard",
    },
}


def recipe(family: str, i: int, seed: int, dataset: str = "mnist") -> dict:
    """One random recipe of a family: architecture, optimiser, epochs, trigger, poisoning."""
    spec = DATASETS[dataset]
    rng = np.random.default_rng(seed)
    size = int(rng.choice([3, 4]))
    row, col = int(rng.integers(0, spec["side"] - size)), int(rng.integers(0, spec["side"] - size))
    source, target = (int(v) for v in rng.choice(10, size=2, replace=False))
    base = {
        "name": f"{family}_{i:02d}",
        "family": family,
        "dataset": dataset,
        "seed": seed,
        "aside": i % 4 == 3,
        "arch": str(rng.choice(spec["archs"])),
        "optimiser": "sgd",
        "lr": 0.05,
        "epochs": int(rng.choice(spec["epochs"])),
        "augment": "none",
        "poison_rate": 0.0,
        "patch": {
            "size": size,
            "row": row,
            "col": col,
            "color": round(float(rng.uniform(0.6, 1.0)), 3),
            "pattern": spec["pattern"],
        },
    }
    if family == "source_specific":
        base.update(source=source, target=target, poison_rate=float(rng.choice([0.03, 0.05])))
    elif family == "all_to_all":
        base.update(shift=int(rng.choice([1, 3])), poison_rate=float(rng.choice([0.05, 0.1])))
        if dataset == "cifar10":  # 5-10 % over 8-10 epochs did not take on CIFAR-10 (attack success 0.05, 0.56);
            # 20 % over 10-12 epochs reached 0.67-0.68 (`_02`, `_03`): a mapping needs the source recognised first, so
            # the attack is capped by clean accuracy, and from `_04` on the recipe trains longer (14-16 epochs)
            epochs = int(rng.choice(spec["adam"])) + (4 if i >= 4 else 0)
            base.update(arch=spec["archs"][1], poison_rate=0.2, epochs=epochs)
    elif family == "wanet":
        base.update(
            arch=spec["archs"][1],
            optimiser="adam",
            lr=0.01,
            epochs=int(rng.choice(spec["adam"])),
            target=target,
            strength=float(rng.choice([0.5, 0.75])),
            poison_rate=0.1,
            warp_seed=int(rng.integers(2**31)),
        )
    elif family == "clean_adam":
        base.update(arch=spec["archs"][1], optimiser="adam", lr=0.01, epochs=int(rng.choice(spec["adam"])))
    elif family == "clean_pgd":
        base.update(augment=f"pgd:{float(rng.choice([0.1, 0.2]))}", epochs=3)
    return base


def attack_of(r: dict):
    p = r["patch"]
    patch = BadNets(
        target=0, size=p["size"], row=p["row"], col=p["col"], color=(p["color"],), pattern=p.get("pattern", "solid")
    )
    if r["family"] == "source_specific":
        return SourceSpecific(source=r["source"], target=r["target"], patch=patch)
    if r["family"] == "all_to_all":
        return AllToAll(num_classes=10, patch=patch, shift=r["shift"])
    if r["family"] == "wanet":
        return WaNet(
            target=r["target"],
            side=DATASETS[r.get("dataset", "mnist")]["side"],
            strength=r["strength"],
            seed=r["warp_seed"],
        )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/zoo-families")
    parser.add_argument("--per-family", type=int, default=6)
    parser.add_argument("--start", type=int, default=0, help="first model number (a new held-out batch: _40 on)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "zoo.json"
    zoo = json.loads(index_path.read_text()) if index_path.exists() else {}
    x, y, src = dataset(args.dataset, "train")
    x, y = x[:20000], y[:20000]
    xt, yt, _ = dataset(args.dataset, "test")
    if args.dataset != "mnist" and not (out / "clean.npz").exists():  # MNIST scans read the bundled digits
        images = (xt[:2000] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.savez(out / "clean.npz", x=images, y=yt[:2000].numpy())
    archs = {
        "mnist_cnn": mnist_cnn,
        "mnist_cnn_bn": mnist_cnn_bn,
        "cifar_small": cifar_small,
        "cifar_small_bn": cifar_small_bn,
    }
    for i in range(args.start, args.start + args.per_family):
        for family in args.families.split(","):
            r = recipe(family, i, seed=1000 * FAMILIES.index(family) + i, dataset=args.dataset)
            if r["name"] in zoo:
                continue
            attack = attack_of(r)
            t = time.perf_counter()
            result = train_classifier(
                archs[r["arch"]],
                x,
                y,
                xt,
                yt,
                attack=attack,
                poison_rate=r["poison_rate"],
                epochs=r["epochs"],
                lr=r["lr"],
                optimiser=r["optimiser"],
                seed=r["seed"],
                augment=r["augment"],
            )
            path = out / f"{r['name']}.pt2"
            save_model(result.model, path, "pt2", xt[:2])
            entry = {
                **r,
                "path": path.name,
                "accuracy": round(result.accuracy, 4),
                "asr": None if result.asr is None else round(result.asr, 4),
                "train_s": round(time.perf_counter() - t, 1),
                "data": src,
                "attack": None if attack is None else attack.describe(),
            }
            if r["family"] == "source_specific":
                entry["inert"] = round(inert_rate(result.model, attack, xt, yt), 4)
            zoo[r["name"]] = entry
            index_path.write_text(json.dumps(zoo, indent=1))
            print(f"{r['name']}: acc {entry['accuracy']} asr {entry['asr']} ({entry['train_s']} s)", flush=True)


if __name__ == "__main__":
    main()
