"""Speed of a full scan and of screening, with the device named.

    .venv/bin/python benchmarks/speed.py [--device auto] [--skip-sequential]

1. USB scan of the bundled BadNets MNIST CNN (10 classes, 300 samples): wall time, peak memory, and the same scan
   with the classes run one after another (class_group=1): the ratio shows what batching over classes buys.
   Goal on 2 CPU cores: <= 60 s. On a GPU it also scans a CIFAR-10 ResNet-18 (random weights: the speed does
   not depend on them; goal on one H100: <= 20 s).
2. Screening with a stored UAP: images per second from an .npz (goal >= 2,000 / s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backdoorscan import ScanSettings, scan_model
from backdoorscan.core.device import resolve_device
from backdoorscan.screen.pipeline import filter_dataset

from common import BUNDLED_TEST, ROOT, SHARED, device_name

MODEL = ROOT / "models/mnist_badnets_3x3.pt2"
CLEAN = BUNDLED_TEST


def timed_scan(model, data, device: torch.device, **settings) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    scan = scan_model(model, data, settings=ScanSettings(**settings), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-sequential", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    figures = {"device": device_name(dev), "torch": torch.__version__}
    print(f"device: {figures['device']}")

    seconds, scan = timed_scan(MODEL, CLEAN, dev)
    figures["mnist_scan_s"] = round(seconds, 2)
    figures["mnist_scan_phases"] = scan.timings
    figures["mnist_verdict"] = scan.verdict
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(
        f"MNIST CNN scan (batched over classes): {seconds:.1f} s, verdict {scan.verdict}, "
        f"phases {scan.timings}, peak RSS {figures['peak_rss_mb']} MB"
    )
    if not args.skip_sequential:
        seq, _ = timed_scan(MODEL, CLEAN, dev, class_group=1)
        figures["mnist_scan_sequential_s"] = round(seq, 2)
        figures["batched_speedup"] = round(seq / seconds, 2)
        print(f"same scan, classes one after another: {seq:.1f} s; batched is {seq / seconds:.2f}x faster")

    if dev.type == "cuda":
        from backdoorlab import cifar_resnet18

        torch.manual_seed(0)
        cifar = ROOT / "data/cifar10"
        seconds, scan = timed_scan(cifar_resnet18(), cifar, dev)
        figures["cifar_resnet18_scan_s"] = round(seconds, 2)
        figures["cifar_resnet18_phases"] = scan.timings
        figures["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(f"CIFAR-10 ResNet-18 scan: {seconds:.1f} s, phases {scan.timings}")

    src = SHARED / "mnist_test.npz"
    if not src.exists():
        print(f"NOTE: {src} is absent; timing the screening on the bundled 2,000 digits")
        src = CLEAN
    with tempfile.TemporaryDirectory() as tmp:
        uap = Path(tmp) / "m.uap"
        filter_dataset(MODEL, CLEAN, CLEAN, save_uap_to=uap, device=dev)
        x = np.load(src)["x"]
        screen = Path(tmp) / "screen.npz"
        np.savez(screen, x=x)
        t = time.perf_counter()
        res = filter_dataset(MODEL, None, screen, uap_file=uap, device=dev)
        seconds = time.perf_counter() - t
    figures["screening_images"] = res.total
    figures["screening_images_per_s"] = round(res.total / res.timings["screen"], 1)
    figures["screening_total_s"] = round(seconds, 2)
    print(
        f"screening with a stored UAP: {res.total} images, {figures['screening_images_per_s']} images/s "
        f"(screen phase), {seconds:.1f} s with model load"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
