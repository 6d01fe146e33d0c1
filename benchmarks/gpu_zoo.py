"""Build and scan the batch-norm zoos of issue 26 on one lent GPU, in one bounded run (docs/results.md).

    PYTHONPATH=src:lab:benchmarks python3 benchmarks/gpu_zoo.py --out OUT --budget 480 --workers 8

Worker processes share the GPU. In priority order they train the `cifar10_bn` recipes (1,500 images a class, the
issue's size), scan every counted model with default settings, train more `gtsrb_bn` recipes (after the eight built
on a CPU), scan with Neural Cleanse, scan the GTSRB models, and scan with the USB authors' code's settings
(`detection.AUTHORS`). No task starts after --budget seconds; tasks still running at --hard are abandoned. After
every task OUT/zoo-DATASET.json and OUT/detection-DATASET.json are rewritten, in the layout of `benchmarks/zoo.py`
and `benchmarks/detection.py` (every figure a later decision rule needs), so a run cut short keeps what finished.
Models stay on the GPU machine (ZOO_ROOT); their records and scans come back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from detection import AUTHORS

ROOT = Path(__file__).resolve().parents[1]
# recipes (first:last) of each space, seed 7 as every varied zoo; gtsrb_bn_000-007 were built and scanned on a CPU
SPACES = "cifar10_bn=0:24,gtsrb_bn=8:24"
ORDER = [  # (task kind, the space's position in --spaces, method): the priority of the work
    ("train", 0, None),
    ("scan", 0, "usb"),
    ("train", 1, None),
    ("scan", 0, "nc"),
    ("scan", 1, "usb"),
    ("scan", 0, "usb_authors"),
    ("scan", 1, "nc"),
    ("scan", 1, "usb_authors"),
]
# Variants of the USB scan measured against the default (universal family only: they change USB's stages)
VARIANTS = {
    "usb_authors": AUTHORS,
    "usb_adaptive": {"mask_cost": "adaptive", "families": "universal"},  # the authors' L1 weight alone
    "usb_linf": {**AUTHORS, "mask_cost": "fixed"},  # the authors' L-inf UAPs alone, with 0.8.0's fixed L1 weight
}
_DATA: dict[str, tuple] = {}


def _init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _data(space: str) -> tuple:
    """A space's training images and labels and its first 2,000 test ones (each worker reads them once)."""
    from backdoorlab.data import dataset

    if space not in _DATA:
        x, y, _ = dataset(space, "train")
        xt, yt, _ = dataset(space, "test")
        _DATA[space] = (x, y, xt[:2000], yt[:2000])
    return _DATA[space]


def train_task(space: str, index: int, zoo: str, device: str) -> dict:
    """Train recipe `index` of `space` into `zoo`; its zoo.json record."""
    import torch
    from zoo import build_recipe

    from backdoorlab.recipes import draw_recipes

    recipe = draw_recipes(space, index + 1)[index]
    x, y, xt, yt = _data(space)
    return build_recipe(recipe, (x, y), (xt, yt), Path(zoo), torch.device(device))


def scan_task(zoo: str, meta: dict, model: dict, method: str, device: str) -> dict:
    """Scan one model with `method` (usb, nc or usb_authors); the row `benchmarks/detection.py` stores."""
    import torch
    from detection import scan_row

    from backdoorscan.core.settings import ScanSettings

    args = SimpleNamespace(
        form=ScanSettings.form,
        refine=ScanSettings.refine,
        mask_cost=ScanSettings.mask_cost,
        label=method if method in VARIANTS else None,
        overrides=VARIANTS.get(method),
    )
    base = "nc" if method == "nc" else "usb"
    return scan_row(Path(zoo), meta, model, base, str(Path(zoo) / "clean.npz"), torch.device(device), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the records and scans are written")
    parser.add_argument("--report", action="store_true", help="only print the tables of what OUT holds")
    parser.add_argument("--zoo-root", default=str(ROOT / "bench-out" / "gpu-zoos"), help="where models are saved")
    parser.add_argument("--spaces", default=SPACES, help="recipe spaces and the recipes of each, NAME=FIRST:LAST")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", help="comma-separated recipe numbers to train (default: every one in --spaces)")
    parser.add_argument(
        "--scans",
        help=f"comma-separated scans to run, of usb, nc, {', '.join(VARIANTS)} (default: ORDER's)",
    )
    parser.add_argument("--keep-models", action="store_true", help="pack the trained models into OUT (<= 15 MB each)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no task starts")
    parser.add_argument("--hard", type=float, default=560.0, help="seconds after which running tasks are dropped")
    args = parser.parse_args()
    if args.report:
        report(Path(args.out))
        return
    spaces = {name: tuple(map(int, span.split(":"))) for name, span in (s.split("=") for s in args.spaces.split(","))}
    names = list(spaces)
    only = None if args.only is None else {int(i) for i in args.only.split(",")}
    order = ORDER
    if args.scans:
        order = [t for t in ORDER if t[0] == "train"]
        order += [("scan", pos, m) for m in args.scans.split(",") for pos in range(len(names))]
    start = time.perf_counter()
    out, root = Path(args.out), Path(args.zoo_root)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "gpu_zoo.log").open("a")

    def say(msg: str) -> None:
        line = f"[{time.perf_counter() - start:6.1f}s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    import torch

    from backdoorlab.data import dataset
    from backdoorscan.loading import to_uint8_images
    from backdoorscan.report.writer import write_text_atomic

    from common import device_name

    metas: dict[str, dict] = {}
    rows: dict[str, list[dict]] = {}
    for space in spaces:  # decode the data once (cached for the workers) and write each zoo's clean samples
        zoo = root / space
        zoo.mkdir(parents=True, exist_ok=True)
        dataset(space, "train")
        xt, yt, test_src = dataset(space, "test")
        np.savez(zoo / "clean.npz", x=to_uint8_images(xt[:2000]), y=yt[:2000].numpy())
        metas[space] = {
            "dataset": space,
            "test": test_src,
            "clean_samples": "clean.npz",
            "device": device_name(torch.device(args.device)),
            "recipes_seed": 7,
            "models": [],
        }
        rows[space] = []
    say(f"data ready; {metas[names[0]]['device']}, torch {torch.__version__}, {args.workers} workers")

    def save(space: str) -> None:
        for name, obj in ((f"zoo-{space}.json", metas[space]), (f"detection-{space}.json", {"rows": rows[space]})):
            write_text_atomic(out / name, json.dumps({**obj, "device": metas[space]["device"]}, indent=2) + "\n")

    pending: list[tuple] = []  # (priority, kind, space, arg)
    for priority, (kind, position, _) in enumerate(order):
        if kind == "train" and position < len(names):
            first, last = spaces[names[position]]
            pending += [
                (priority, "train", names[position], i) for i in range(first, last) if only is None or i in only
            ]
    running: dict[Future, tuple] = {}
    ctx = get_context("spawn")
    pool = ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init, initargs=(args.threads,))

    def submit(task: tuple) -> None:
        _, kind, space, arg = task
        zoo = str(root / space)
        if kind == "train":
            fut = pool.submit(train_task, space, arg, zoo, args.device)
        else:
            model, method = arg
            fut = pool.submit(scan_task, zoo, {**metas[space], "models": []}, model, method, args.device)
        running[fut] = (task, time.perf_counter())

    while pending or running:
        pending.sort(key=lambda t: (t[0], str(t[3])))
        while pending and len(running) < args.workers and time.perf_counter() - start < args.budget:
            submit(pending.pop(0))
        if not running:
            break
        left = args.hard - (time.perf_counter() - start)
        if left <= 0:
            say(f"hard limit: {len(running)} tasks dropped: {[t[0][2:] for t in running.values()]}")
            break
        done, _ = wait(running, timeout=min(left, 30), return_when=FIRST_COMPLETED)
        for fut in done:
            (priority, kind, space, arg), began = running.pop(fut)
            took = time.perf_counter() - began
            try:
                result = fut.result()
            except Exception as exc:  # one failed task must not lose the others' results
                say(f"FAILED {kind} {space} {arg}: {type(exc).__name__}: {exc}")
                continue
            if kind == "train":
                metas[space]["models"].append(result)
                metas[space]["models"].sort(key=lambda m: m["name"])
                say(
                    f"trained {result['name']} in {took:.0f} s: acc {result['accuracy']} asr {result['asr']} "
                    f"counted {result['counted']}"
                )
                if result["counted"]:
                    for p, (k, position, method) in enumerate(order):
                        if k == "scan" and names[position : position + 1] == [space]:
                            pending.append((p, "scan", space, (result, method)))
            else:
                rows[space].append(result)
                say(
                    f"scanned {result['name']} {result['method']} in {took:.0f} s: {result['verdict']} "
                    f"{result['found']} (target {result['target']}, stage {result['stage']}, margin {result['margin']})"
                )
            save(space)
    say(f"stopped: {len(pending)} tasks not started")
    for space in spaces:
        save(space)
    if args.keep_models:
        pack([root / space / m["file"] for space in spaces for m in metas[space]["models"] if m["file"]], out)
    log.close()
    pool.shutdown(wait=False, cancel_futures=True)
    sys.stdout.flush()
    os._exit(0)  # workers still running past --hard are not waited for


def report(out: Path) -> None:
    """Per space, method and part: backdoors named exactly and clean models flagged; then every miss's stage."""
    for det in sorted(out.glob("detection-*.json")):
        space = det.stem.removeprefix("detection-")
        models = {m["name"]: m for m in json.loads((out / f"zoo-{space}.json").read_text())["models"]}
        rows = json.loads(det.read_text())["rows"]
        print(f"\n{space} ({out})\n")
        print("| method | part | backdoored: exact | clean flagged | scan s (median) |")
        print("|---|---|---:|---:|---:|")
        for method in dict.fromkeys(r["method"] for r in rows):
            for aside in (False, True):
                part = [r for r in rows if r["method"] == method and models[r["name"]]["aside"] == aside]
                bad = [r for r in part if r["target"] is not None]
                clean = [r for r in part if r["target"] is None]
                exact = sum(r["found"] == [r["target"]] for r in bad)
                seconds = np.median([r["seconds"] for r in part]) if part else float("nan")
                print(
                    f"| {method} | {'aside' if aside else 'main'} | {exact}/{len(bad)} | "
                    f"{sum(r['verdict'] == 'backdoor' for r in clean)}/{len(clean)} | {seconds:.0f} |"
                )
        print("\n| model | method | target | found | stage | margin |")
        print("|---|---|---:|---|---|---:|")
        for r in sorted(rows, key=lambda r: (r["name"], r["method"])):
            if r["stage"] not in ("hit", "clean"):
                aside = " (aside)" if models[r["name"]]["aside"] else ""
                print(
                    f"| {r['name']}{aside} | {r['method']} | {r['target']} | {r['found'] or '-'} | {r['stage']} | "
                    f"{r['margin']:.2f} |"
                )


def pack(paths: list[Path], out: Path, limit: int = 15 << 20) -> None:
    """Model files as OUT/models-N.tar (SPACE/FILE inside), each under `limit` bytes (what a lent machine sends
    back)."""
    import tarfile

    batches: list[list[Path]] = [[]]
    size = 0
    for path in paths:
        if batches[-1] and size + path.stat().st_size > limit:
            batches.append([])
            size = 0
        batches[-1].append(path)
        size += path.stat().st_size
    for i, batch in enumerate(b for b in batches if b):
        with tarfile.open(out / f"models-{i}.tar", "w") as tar:
            for path in batch:
                tar.add(path, arcname=f"{path.parent.name}/{path.name}")


if __name__ == "__main__":
    main()
