"""Build a model zoo on real data: clean, BadNets and blended-trigger models on MNIST or CIFAR-10.

    .venv/bin/python benchmarks/zoo.py --out bench-out/zoo --per-group 5
    .venv/bin/python benchmarks/zoo.py --dataset cifar10 --out bench-out/zoo-cifar10 --per-group 3

Attacks follow the USB paper: 10 % poisoning, random target, random position and colour; patches are 2x2 and 3x3
on MNIST, 3x3 and 4x4 on CIFAR-10. Each model is saved as a user would receive it (.pt2), with its seed, attack,
clean accuracy and attack success rate in zoo.json. A backdoored model whose attack failed (ASR < 90 %) is recorded
but not counted, and another seed is trained. The zoo also holds clean.npz, the clean samples its scans use (the
first 2,000 test images, on which accuracy and ASR are measured too).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from backdoorlab import ARCHS, TrainResult, make_attack, save_model, train_classifier
from backdoorlab.data import NUM_CLASSES, dataset
from backdoorlab.recipes import SPACES, Recipe, draw_recipes
from backdoorscan.core.device import resolve_device
from backdoorscan.loading import to_uint8_images
from backdoorscan.report.writer import write_text_atomic

from common import device_name

GROUPS = {
    "mnist": {"clean": (None, 0), "badnets_2x2": ("badnets", 2), "badnets_3x3": ("badnets", 3), "blend": ("blend", 0)},
    "cifar10": {
        "clean": (None, 0),
        "badnets_3x3": ("badnets", 3),
        "badnets_4x4": ("badnets", 4),
        "blend": ("blend", 0),
    },
}
DEFAULTS = {  # archs and file formats cycled through within a group, training images, epochs
    "mnist": ("mnist_cnn,mnist_cnn_bn", "pt2", 20000, 6),
    "cifar10": ("cifar_small,cifar_small_bn", "pt2,onnx,safetensors", 50000, 4),
}
SUFFIX = {"pt2": ".pt2", "onnx": ".onnx", "safetensors": ".safetensors"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", default="mnist", choices=sorted(SPACES), help="gtsrb (43 classes) only with --recipes"
    )
    parser.add_argument("--out", default="bench-out/zoo")
    parser.add_argument("--per-group", type=int, default=5)
    parser.add_argument("--groups", help="default: all groups of the dataset")
    parser.add_argument("--archs", help="cycled through within each group (default per dataset)")
    parser.add_argument("--formats", help=f"file formats cycled through within each group, of {sorted(SUFFIX)}")
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--recipes",
        type=int,
        help="build N models from varied recipes (backdoorlab.recipes) "
        "instead of the fixed groups; a rerun skips models already built",
    )
    args = parser.parse_args()
    if args.recipes:
        varied(args)
        return
    if args.dataset not in GROUPS:
        parser.error(f"--dataset {args.dataset} needs --recipes (the fixed groups are MNIST and CIFAR-10 only)")
    archs_default, formats_default, size_default, epochs_default = DEFAULTS[args.dataset]
    archs = (args.archs or archs_default).split(",")
    formats = (args.formats or formats_default).split(",")
    epochs = args.epochs or epochs_default
    groups = GROUPS[args.dataset]
    dev, out, (x, y, train_src), (xt, yt, test_src) = setup(args)
    x, y = x[: args.train_size or size_default], y[: args.train_size or size_default]
    shape, records = tuple(x.shape[1:]), []
    meta = {
        "dataset": args.dataset,
        "train": train_src,
        "test": test_src,
        "train_size": len(x),
        "epochs": epochs,
        "poison_rate": 0.1,
        "clean_samples": "clean.npz",
        "device": device_name(dev),
        "models": records,
    }
    for g, group in enumerate((args.groups or ",".join(groups)).split(",")):
        kind, size = groups[group]
        counted, attempt = 0, 0
        while counted < args.per_group and attempt < 2 * args.per_group:
            seed = args.seed + 1000 * g + attempt
            arch, fmt = archs[attempt % len(archs)], formats[attempt % len(formats)]
            attempt += 1
            attack = make_attack(kind, shape, 10, np.random.default_rng(seed), size=size) if kind else None
            t = time.perf_counter()
            result = train_classifier(ARCHS[arch], x, y, xt, yt, attack=attack, seed=seed, epochs=epochs, device=dev)
            ok = attack is None or result.asr >= 0.9
            counted += ok
            records.append(keep(result, out, f"{group}_{seed}", fmt, arch, group, seed, ok, xt[:2], t))
            print(json.dumps(records[-1]), flush=True)
            # after every model, so that an interrupted build keeps the records of the models it saved
            write_text_atomic(out / "zoo.json", json.dumps(meta, indent=2) + "\n")


def setup(args: argparse.Namespace) -> tuple[torch.device, Path, tuple, tuple]:
    """Threads, device, the output folder, and the data: train and the first 2,000 test images, on which accuracy
    and ASR are measured and which the scans use as clean samples (written as OUT/clean.npz)."""
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = dataset(args.dataset, "train")
    xt, yt, test_src = dataset(args.dataset, "test")
    xt, yt = xt[:2000], yt[:2000]
    np.savez(out / "clean.npz", x=to_uint8_images(xt), y=yt.numpy())
    return dev, out, train, (xt, yt, test_src)


def keep(
    result: TrainResult,
    out: Path,
    name: str,
    fmt: str,
    arch: str,
    group: str,
    seed: int,
    ok: bool,
    example: torch.Tensor,
    started: float,
) -> dict:
    """Save a model whose attack worked (or a clean one) as a user would receive it, and its zoo.json record."""
    file = f"{name}{SUFFIX[fmt]}"
    if ok:
        save_model(result.model, out / file, fmt, example)
    attack = result.attack
    return {
        "name": name,
        "file": file if ok else None,
        "format": fmt,
        "group": group,
        "arch": arch,
        # safetensors holds weights only: the scan needs the architecture, as a user's would
        "arch_ref": f"backdoorlab.archs:{arch}" if fmt == "safetensors" else None,
        "seed": seed,
        "attack": attack.describe() if attack else None,
        "accuracy": round(result.accuracy, 4),
        "asr": None if result.asr is None else round(result.asr, 4),
        "counted": ok,
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def varied(args: argparse.Namespace) -> None:
    """A zoo from `draw_recipes`: one model per recipe, attempted once (a failed attack is recorded, not retried).

    Models already in OUT/zoo.json are kept, so an interrupted build resumes where it stopped.
    """
    dev, out, (x_all, y_all, train_src), (xt, yt, test_src) = setup(args)
    old = json.loads((out / "zoo.json").read_text()) if (out / "zoo.json").exists() else {"models": []}
    done = {m["name"]: m for m in old["models"]}
    records: list[dict] = []
    meta = {
        "dataset": args.dataset,
        "train": train_src,
        "test": test_src,
        "clean_samples": "clean.npz",
        "device": device_name(dev),
        "recipes_seed": args.seed,
        "models": records,
    }
    for recipe in draw_recipes(args.dataset, args.recipes, args.seed):
        if recipe.name in done:
            records.append(done[recipe.name])
            continue
        records.append(build_recipe(recipe, (x_all, y_all), (xt, yt), out, dev))
        print(json.dumps(records[-1]), flush=True)
        write_text_atomic(out / "zoo.json", json.dumps(meta, indent=2) + "\n")
    write_text_atomic(out / "zoo.json", json.dumps(meta, indent=2) + "\n")


def build_recipe(
    recipe: Recipe,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    out: Path,
    dev: torch.device,
) -> dict:
    """Train one recipe's model, save it into OUT as a user would receive it, and return its zoo.json record."""
    (x_all, y_all), (xt, yt) = train, test
    shape = tuple(x_all.shape[1:])
    rng = np.random.default_rng(recipe.seed)
    classes = NUM_CLASSES[recipe.dataset]
    attack = (
        make_attack(
            recipe.kind,
            shape,
            classes,
            rng,
            size=recipe.size,
            alpha=recipe.alpha,
            position=recipe.position,
            pattern=recipe.pattern,
        )
        if recipe.kind
        else None
    )
    t = time.perf_counter()
    arch = functools.partial(ARCHS[recipe.arch], num_classes=classes)
    result = train_classifier(
        arch,
        x_all[: recipe.train_size],
        y_all[: recipe.train_size],
        xt,
        yt,
        attack=attack,
        poison_rate=recipe.poison_rate,
        epochs=recipe.epochs,
        lr=recipe.lr,
        seed=recipe.seed,
        optimiser=recipe.optimiser,
        schedule=recipe.schedule,
        augment=recipe.augment,
        device=dev,
    )
    ok = attack is None or result.asr >= 0.8  # a backdoor that does not work is no backdoor to find
    return {
        **keep(result, out, recipe.name, recipe.fmt, recipe.arch, recipe.group, recipe.seed, ok, xt[:2], t),
        "aside": recipe.aside,
        "recipe": recipe.describe(),
    }


if __name__ == "__main__":
    main()
