"""What a default (staged) scan costs as the number of classes and the input side grow, in units of the model.

    .venv/bin/python benchmarks/scaling.py [--classes 10,43,100,1000] [--sides 32,64] [--threads 1] [--eta]

One trunk for every row: a batch-norm CNN with global pooling (so it takes any side), trained for a few epochs on
the bundled GTSRB signs; a K-class head keeps the trained rows of the first min(K, 43) classes and adds random
rows for the rest (random-weight heads are fine for cost). Samples are the bundled signs without labels (labels from
the model's predictions), resized by the scan to the side. Each row runs in its own process so that its peak
memory (max RSS) is its own; the unit, one forward+backward pass over the samples, is measured in that process
just before the scan. `--eta` also starts a 1,000-class ResNet-18 at 224 px (random weights) on the CPU for 60 s
and records the class group the memory budget chose, the peak memory and the ETA its progress stated.
Results: bench-out/scaling.json and a Markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from common import ROOT, device_name
from cost import unit_seconds

OUT = ROOT / "bench-out"
TRUNK = OUT / "scaling_trunk.pt"
SAMPLES = OUT / "scaling_samples.npz"
TRAINED = 43


class Net(nn.Module):
    """Three conv blocks, global pooling to 4x4, a 128-wide layer and a K-class head."""

    def __init__(self, k: int) -> None:
        super().__init__()
        blocks = []
        for cin, cout in ((3, 32), (32, 64), (64, 128)):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.trunk = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2048, 128), nn.ReLU())
        self.head = nn.Linear(128, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def prepare_trunk() -> None:
    """Train the trunk once (cached) and write the unlabelled samples."""
    from backdoorlab import train_classifier
    from backdoorlab.data import bundled_gtsrb

    x, y, xt, yt = bundled_gtsrb()
    if not SAMPLES.exists():
        images = (torch.cat([xt, x]) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        np.savez(SAMPLES, x=images)  # no labels: the scan balances by the model's predictions
    if not TRUNK.exists():
        trained = train_classifier(
            lambda: Net(TRAINED), x, y, xt, yt, epochs=30, lr=0.003, optimiser="adam", schedule="cosine", seed=0
        )
        print(f"trunk trained: accuracy {trained.accuracy:.2f} on the held-out signs", file=sys.stderr)
        torch.save(trained.model.state_dict(), TRUNK)


def model_with(k: int) -> nn.Module:
    """The trained trunk with a K-class head: trained rows first, random rows (same scale) after."""
    state = torch.load(TRUNK, weights_only=True)
    net = Net(k)
    head_w, head_b = state.pop("head.weight"), state.pop("head.bias")
    net.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        keep = min(k, TRAINED)
        net.head.weight[:keep] = head_w[:keep]
        net.head.bias[:keep] = head_b[:keep]
        if k > keep:
            net.head.weight[keep:] = torch.randn(k - keep, 128, generator=g) * head_w.std()
            net.head.bias[keep:] = head_b.min()
    return net.eval()


def one(k: int, side: int, threads: int) -> dict:
    """One row, in this process: the unit (as `cost.py` measures it), then the default scan."""
    from backdoorscan import ModelSource, ScanSettings, scan_model

    torch.set_num_threads(threads)
    source = ModelSource(model_with(k), input_size=(side, side), channels=3)
    unit = unit_seconds(source, str(SAMPLES), torch.device("cpu"), ScanSettings.samples)
    t = time.perf_counter()
    scan = scan_model(source, SAMPLES, device="cpu")
    seconds = time.perf_counter() - t - scan.timings["load"]
    phases = {p: round(v / unit) for p, v in scan.timings.items() if p not in ("total", "load")}
    return {
        "classes": k,
        "side": side,
        "samples": scan.data["samples"],
        "unit_ms": round(1000 * unit, 1),
        "seconds": round(seconds, 1),
        "units": round(seconds / unit),
        "phases": phases,
        "refined": len(scan.classes),
        "staging": scan.staging.mode if scan.staging else None,
        "verdict": scan.verdict,
        "class_group": scan.batching.get("class_group"),
        "budget_mb": _budget_mb(),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def eta(threads: int, limit: float = 60.0) -> dict:
    """A 1,000-class ResNet-18 at 224 px on the CPU: what its first minute says."""
    import torchvision

    from backdoorscan import ModelSource, scan_model
    from backdoorscan.core.errors import ScanError

    torch.set_num_threads(threads)
    torch.manual_seed(0)  # random weights, but the same ones every run
    net = torchvision.models.resnet18(num_classes=1000)
    with np.load(SAMPLES) as d, torch.no_grad():  # batch-norm statistics of the samples, so that the random
        x = torch.from_numpy(d["x"][:64]).permute(0, 3, 1, 2).float() / 255  # network tells them apart (an
        for m in net.modules():  # untouched one sends every sample to one class: an inconclusive scan)
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        net.train()(nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))
    net.eval()
    start = time.perf_counter()
    seen: dict = {}

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter() - start
        first = seen.setdefault(phase, {"t0": now, "d0": done})
        rate = (done - first["d0"]) / max(now - first["t0"], 1e-9)
        seen[phase].update(
            done=done, total=total, at=round(now, 1), eta_s=round((total - done) / rate) if rate > 0 else None
        )
        if now > limit:
            raise ScanError("stopped after the first minute (benchmark)")

    scan_error = None
    try:
        scan = scan_model(ModelSource(net, input_size=(224, 224), channels=3), SAMPLES, device="cpu", progress=progress)
        scan_error = f"finished: {scan.verdict} ({'; '.join(scan.reasons)})"  # e.g. an unmeasurable random model
    except ScanError as exc:
        scan_error = str(exc)
    return {
        "model": "resnet18, 1000 classes, 224 px, random weights",
        "stopped": scan_error,
        "phases": {p: {k: v for k, v in d.items() if k not in ("t0", "d0")} for p, d in seen.items()},
        "budget_mb": _budget_mb(),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def _budget_mb() -> int:
    from backdoorscan.safety.limits import Limits, available_memory
    from backdoorscan.usb.batching import memory_budget

    return round(memory_budget(torch.device("cpu"), Limits().max_memory, available_memory()) / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="10,43,100,1000")
    parser.add_argument("--sides", default="32,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eta", action="store_true", help="also the 1,000-class ResNet-18 at 224 px, first minute")
    parser.add_argument("--one", help="K,SIDE: one row in this process (used by the parent), or 'eta'")
    args = parser.parse_args()
    if args.one:
        row = eta(args.threads) if args.one == "eta" else one(*map(int, args.one.split(",")), args.threads)
        print(json.dumps(row), flush=True)
        return
    prepare_trunk()
    out = OUT / "scaling.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["classes"], r["side"]) for r in rows if "classes" in r}
    jobs = [
        f"{k},{s}"
        for s in map(int, args.sides.split(","))
        for k in map(int, args.classes.split(","))
        if (k, s) not in done
    ] + (["eta"] if args.eta else [])
    for job in jobs:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", job, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if not (job == "eta" and "model" in r)] + [row]
        out.write_text(
            json.dumps({"device": device_name(torch.device("cpu")), "threads": args.threads, "rows": rows}, indent=2)
            + "\n"
        )
    table(rows)


def table(rows: list[dict]) -> None:
    """The Markdown table, with each row's cost over the 10-class scan of the same side."""
    base = {r["side"]: r["units"] for r in rows if r.get("classes") == 10}
    print(
        "\n| classes | side | refined | unit (ms) | seconds | units | x 10-class | per phase (units) | peak MB | "
        "budget MB |\n|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    )
    for r in sorted((r for r in rows if "classes" in r), key=lambda r: (r["side"], r["classes"])):
        ratio = f"{r['units'] / base[r['side']]:.2f}" if r["side"] in base else "n/a"
        print(
            f"| {r['classes']} | {r['side']} | {r['refined']} | {r['unit_ms']} | {r['seconds']} | {r['units']} | "
            f"{ratio} | {', '.join(f'{k} {v}' for k, v in r['phases'].items())} | {r['peak_mb']} | "
            f"{r['budget_mb']} |"
        )
    for r in (r for r in rows if "model" in r):
        print(
            f"\n{r['model']}: peak {r['peak_mb']} MB (budget {r['budget_mb']} MB); {r['stopped']}; phases "
            + json.dumps(r["phases"])
        )


if __name__ == "__main__":
    main()
