"""Input filtering over the backdoored models of a zoo (Xue et al. Tab. II layout): FRR and BASR after filtering.

    .venv/bin/python benchmarks/filtering.py --zoo bench-out/zoo

Screening set per model: held-out clean test images of the zoo's dataset (rows 2,000-2,999, outside the clean
samples) and the same images of non-target classes with the model's trigger. FRR = clean images flagged; BASR
after filtering = triggered images that pass the filter and are still classified as the target.
Run for the UAP rule and STRIP.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backdoorlab.attacks import BadNets, Blend
from backdoorlab.data import dataset
from backdoorscan import FilterSettings, ModelSource, filter_dataset
from backdoorscan.device import resolve_device
from backdoorscan.loading import to_uint8_images

from common import clean_samples, device_name


def attack_from(meta: dict):
    """Rebuild the trigger recorded in zoo.json."""
    fields = {k: v for k, v in meta.items() if k != "kind"}
    if meta["kind"] == "badnets":
        return BadNets(**{**fields, "color": tuple(fields["color"])})
    return Blend(**{**fields, "shape": tuple(fields["shape"])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="bench-out/zoo")
    parser.add_argument("--clean", help="clean samples (default: the zoo's clean.npz, else the bundled MNIST digits)")
    parser.add_argument("--methods", default="uap,strip")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="filtering", help="results go to ZOO/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    if not (zoo / "zoo.json").exists():
        sys.exit(f"{zoo}/zoo.json not found: build a zoo first with benchmarks/zoo.py")
    meta = json.loads((zoo / "zoo.json").read_text())
    clean = args.clean or clean_samples(zoo, meta)
    xt, yt, _ = dataset(meta.get("dataset", "mnist"), "test")
    xs, ys = xt[2000:3000], yt[2000:3000]
    dev = resolve_device(args.device)
    rows = []
    for model in [m for m in meta["models"] if m["counted"] and m["attack"]]:
        attack = attack_from(model["attack"])
        keep = ys != attack.target
        triggered = attack.apply(xs[keep])
        x = torch.cat([xs, triggered])
        kind = np.r_[np.zeros(len(xs)), np.ones(len(triggered))].astype(bool)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "screen.npz"
            np.savez(path, x=to_uint8_images(x))
            for method in args.methods.split(","):
                t = time.perf_counter()
                source = ModelSource(zoo / model["file"], arch=model.get("arch_ref"))
                res = filter_dataset(source, clean, path, settings=FilterSettings(method=method), device=dev)
                flagged = np.array([i.flagged for i in res.items])
                pred = np.array([i.prediction for i in res.items])
                basr_before = float((pred[kind] == attack.target).mean())
                basr_after = float(((pred[kind] == attack.target) & ~flagged[kind]).mean())
                rows.append({"name": model["name"], "group": model["group"], "method": method,
                             "frr": float(flagged[~kind].mean()), "basr_before": basr_before,
                             "basr_after": basr_after, "epsilon": res.epsilon,
                             "suspected_target": res.suspected_target, "target": attack.target,
                             "aside": bool(model.get("aside")), "size": model["attack"].get("size"),
                             "seconds": round(time.perf_counter() - t, 2)})
                print(json.dumps(rows[-1]), flush=True)
    (zoo / f"{args.name}.json").write_text(json.dumps({"device": device_name(dev), "rows": rows}, indent=2) + "\n")
    print(table([r for r in rows if not r["aside"]], device_name(dev)))
    if any(r["aside"] for r in rows):
        print("\nSet aside before tuning:\n")
        print(table([r for r in rows if r["aside"]], device_name(dev)))


def table(rows: list[dict], device: str) -> str:
    lines = ["| group | method | models | FRR | BASR before | BASR after filtering | target named | "
             "epsilon | s / model |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for group in dict.fromkeys(r["group"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["group"] == group and r["method"] == method]
            eps = np.mean([r["epsilon"] for r in rs]) if rs[0]["epsilon"] is not None else None
            lines.append(f"| {group} | {method.upper()} | {len(rs)} | {100 * np.mean([r['frr'] for r in rs]):.2f}% | "
                         f"{100 * np.mean([r['basr_before'] for r in rs]):.2f}% | "
                         f"{100 * np.mean([r['basr_after'] for r in rs]):.2f}% | "
                         f"{sum(r['suspected_target'] == r['target'] for r in rs)}/{len(rs)} | "
                         f"{'n/a' if eps is None else f'{eps:.3f}'} | {np.mean([r['seconds'] for r in rs]):.1f} |")
    return "\n".join(lines) + f"\n\nDevice: {device}."


if __name__ == "__main__":
    main()
