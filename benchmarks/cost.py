"""What a scan and a screening cost in units of one forward+backward pass of the model over the clean samples.

    .venv/bin/python benchmarks/cost.py [--model FILE] [--data FILE] [--threads 2]

The unit is measured in the same run, on the same model, samples and device: the median of 5 timed
forward+backward passes over all the samples in one batch. Units make figures comparable across machines and
thread counts (issue 11 asks that a scan cost no more than about 375 of them on the MNIST batch-norm CNN).
Default model: the first batch-norm CNN of the varied MNIST zoo (bench-out/zoo-varied-mnist), else the bundled
BadNets model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from backdoorscan import FilterSettings, ModelSource, ScanSettings, filter_dataset, scan_model
from backdoorscan.core.device import resolve_device
from backdoorscan.loading import prepare

from common import BUNDLED_TEST, ROOT, device_name

ZOO = ROOT / "bench-out/zoo-varied-mnist"


def default_model() -> tuple[ModelSource, str]:
    """A batch-norm MNIST CNN from the varied zoo when it is built, else the bundled BadNets model."""
    if (ZOO / "zoo.json").exists():
        for m in json.loads((ZOO / "zoo.json").read_text())["models"]:
            if m["counted"] and m["arch"] == "mnist_cnn_bn":
                return ModelSource(ZOO / m["file"], arch=m.get("arch_ref")), str(ZOO / "clean.npz")
    print(f"NOTE: {ZOO} is not built; measuring the bundled BadNets model instead")
    return ModelSource(ROOT / "models/mnist_badnets_3x3.pt2"), str(BUNDLED_TEST)


def unit_seconds(source: ModelSource, data: str, device: torch.device, samples: int) -> float:
    """Median time of one forward+backward pass of the model over the samples (input gradients, as the scan)."""
    ready = prepare(source, data, samples=samples, seed=0, device=device)
    x = ready.samples.x
    times = []
    for _ in range(6):
        xi = x.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ready.model(xi).logsumexp(1).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # the first pass warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint (default: see above)")
    parser.add_argument("--data", help="clean samples for --model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pair-steps", type=int, default=ScanSettings.pair_steps, help="the default scan's")
    parser.add_argument("--scans-only", action="store_true", help="the two USB scans only (no NC, no filter)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    source, data = (ModelSource(args.model), args.data or str(BUNDLED_TEST)) if args.model else default_model()
    unit = unit_seconds(source, data, dev, ScanSettings.samples)
    print(f"model {source.path}; device {device_name(dev)}; one unit = {1000 * unit:.1f} ms")
    rows = []
    for name, settings in (
        ("USB scan, default settings (every family)", ScanSettings(pair_steps=args.pair_steps)),
        ("USB scan, universal triggers only (USB as published)", ScanSettings(families="universal")),
        *([] if args.scans_only else [("Neural Cleanse scan", ScanSettings(method="nc"))]),
    ):
        t = time.perf_counter()
        scan = scan_model(source, data, settings=settings, device=dev)
        total = time.perf_counter() - t
        phases = {k: round(v / unit) for k, v in scan.timings.items() if k not in ("total", "load")}
        rows.append((name, total, round((total - scan.timings["load"]) / unit), phases))
    filters = (
        ("filter: UAP with epsilon search, dominant classes' UAPs (default)", FilterSettings()),
        ("filter: the same, one UAP only (class_survival=1)", FilterSettings(class_survival=1.0)),
    )
    for name, settings in () if args.scans_only else filters:
        t = time.perf_counter()
        res = filter_dataset(source, data, data, settings=settings, device=dev)
        total = time.perf_counter() - t
        prepared = round(res.timings["prepare"] / unit)
        rows.append(
            (
                name,
                total,
                prepared,
                {"UAPs": prepared, f"screening {res.total} images": round(res.timings["screen"] / unit)},
            )
        )
    print(f"every family costs {rows[0][2] / max(rows[1][2], 1):.2f}x the universal-only scan (issue 25: <= 2x)")
    print("\n| what | seconds | units (without loading) | per phase |\n|---|---:|---:|---|")
    for name, total, units, phases in rows:
        print(f"| {name} | {total:.1f} | {units} | {', '.join(f'{k} {v}' for k, v in phases.items())} |")


if __name__ == "__main__":
    main()
