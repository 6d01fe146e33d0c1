"""Input filtering over the backdoored models of a zoo (Xue et al. Tab. II layout): FRR and BASR after filtering.

    .venv/bin/python benchmarks/filtering.py --zoo bench-out/zoo

Screening set per model: held-out clean test images of the zoo's dataset (rows 2,000-2,999, outside the clean
samples) and the same images of non-target classes with the model's trigger. FRR = clean images flagged; BASR
after filtering = triggered images that pass the filter and are still classified as the target.
Run for the UAP rule (uap: with dominant classes' own UAPs and margins, the default; uap1: the paper's rule) and STRIP.
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
from backdoorscan.core.device import resolve_device
from backdoorscan.loading import to_uint8_images

from common import clean_samples, device_name

METHODS = {
    "uap": FilterSettings(),
    "uap1": FilterSettings(class_survival=1.0),  # uap1: the paper's single UAP
    "strip": FilterSettings(method="strip"),
}


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
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="filtering", help="results go to ZOO/NAME.json")
    parser.add_argument("--report", help="filtering.json files (comma-separated): print their tables, run nothing")
    args = parser.parse_args()
    if args.report:
        saved = [json.loads(Path(f).read_text()) for f in args.report.split(",")]
        print_tables([r for d in saved for r in d["rows"]], saved[0]["device"])
        return
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
                res = filter_dataset(source, clean, path, settings=METHODS[method], device=dev)
                flagged = np.array([i.flagged for i in res.items])
                pred = np.array([i.prediction for i in res.items])
                basr_before = float((pred[kind] == attack.target).mean())
                basr_after = float(((pred[kind] == attack.target) & ~flagged[kind]).mean())
                rows.append(
                    {
                        "name": model["name"],
                        "group": model["group"],
                        "method": method,
                        "frr": float(flagged[~kind].mean()),
                        "basr_before": basr_before,
                        "basr_after": basr_after,
                        "epsilon": res.epsilon,
                        "suspected_target": res.suspected_target,
                        "target": attack.target,
                        "aside": bool(model.get("aside")),
                        "size": model["attack"].get("size"),
                        "seconds": round(time.perf_counter() - t, 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    (zoo / f"{args.name}.json").write_text(json.dumps({"device": device_name(dev), "rows": rows}, indent=2) + "\n")
    print_tables(rows, device_name(dev))


def print_tables(rows: list[dict], device: str) -> None:
    """The table of the main part, then of the part set aside before tuning."""
    print(table([r for r in rows if not r.get("aside")], device))
    if any(r.get("aside") for r in rows):
        print("\nSet aside before tuning:\n")
        print(table([r for r in rows if r.get("aside")], device))


def table(rows: list[dict], device: str) -> str:
    """One line per trigger group and method, then BadNets of 3 px and more, then all, per method."""
    lines = [
        "| group | method | models | FRR | BASR before | BASR after filtering | target named | epsilon | s / model |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = [(g, [r for r in rows if r["group"] == g]) for g in dict.fromkeys(r["group"] for r in rows)]
    groups += [("**BadNets >= 3 px**", [r for r in rows if (r.get("size") or 0) >= 3]), ("**all**", rows)]
    for group, members in groups:
        for method in methods:
            rs = [r for r in members if r["method"] == method]
            if not rs:
                continue
            eps = [r["epsilon"] for r in rs if r["epsilon"] is not None]
            lines.append(
                f"| {group} | {method.upper()} | {len(rs)} | {100 * np.mean([r['frr'] for r in rs]):.2f}% | "
                f"{100 * np.mean([r['basr_before'] for r in rs]):.2f}% | "
                f"{100 * np.mean([r['basr_after'] for r in rs]):.2f}% "
                f"(max {100 * max(r['basr_after'] for r in rs):.1f}%) | "
                f"{sum(r['suspected_target'] == r['target'] for r in rs)}/{len(rs)} | "
                f"{f'{np.mean(eps):.3f}' if eps else 'n/a'} | {np.mean([r['seconds'] for r in rs]):.1f} |"
            )
    return "\n".join(lines) + f"\n\nDevice: {device}."


if __name__ == "__main__":
    main()
