"""The GPU path, measured in one short run on a lent accelerator (docs/benchmarks.md records the figures).

    PYTHONPATH=src:lab:benchmarks python3 benchmarks/gpu.py --out OUT.json

1. USB scan of the bundled BadNets MNIST CNN (`models/mnist_badnets_3x3.pt2`) on the GPU, in-process: wall time,
   phases, verdict (the same scan takes 22.5 s on 2 CPU cores).
2. The same scan through the CLI with the sandbox (`--sandbox auto --device cuda`): which confinement layers held
   beside the CUDA driver, and the wall time including the child's start.
3. A CIFAR-10 ResNet-18 with a 3x3 BadNets patch (target 0), trained here on the GPU on the 300 bundled CIFAR-10
   images (an overfitted but real classifier of its scan data), then scanned with default settings (goal <= 20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models/mnist_badnets_3x3.pt2"
MNIST = ROOT / "data/mnist/test_2000.npz"
CIFAR = ROOT / "data/cifar10"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mnist_scan(dev: torch.device) -> dict:
    from backdoorscan import scan_model

    _sync()
    t = time.perf_counter()
    scan = scan_model(MODEL, MNIST, device=dev)
    _sync()
    return {
        "seconds": round(time.perf_counter() - t, 2),
        "verdict": scan.verdict,
        "targets": scan.target_classes,
        "phases": scan.timings,
    }


def cli_scan(dev: torch.device) -> dict:
    t = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "backdoorscan",
            "model",
            str(MODEL),
            "--data",
            str(MNIST),
            "--device",
            str(dev),
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    seconds = round(time.perf_counter() - t, 2)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        return {"exit": proc.returncode, "seconds": seconds, "stderr": proc.stderr[-800:]}
    return {
        "exit": proc.returncode,
        "seconds": seconds,
        "verdict": report["verdict"],
        "sandbox": report.get("sandbox"),
        "phases": report["timings"],
    }


def cifar_images() -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    xs, ys = [], []
    for label, folder in enumerate(sorted(p for p in CIFAR.iterdir() if p.is_dir())):
        for path in sorted(folder.iterdir()):
            xs.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8))
            ys.append(label)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(ys)


def cifar_resnet_scan(dev: torch.device, tmp: Path) -> dict:
    from backdoorlab import cifar_resnet18
    from backdoorscan import scan_model

    torch.manual_seed(0)
    x, y = cifar_images()
    model = cifar_resnet18().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xd, yd = x.to(dev), y.to(dev)
    t = time.perf_counter()
    for _epoch in range(60):
        perm = torch.randperm(len(xd), device=dev)
        for i in range(0, len(xd), 64):
            idx = perm[i : i + 64]
            xb, yb = xd[idx].clone(), yd[idx].clone()
            poison = torch.rand(len(idx), device=dev) < 0.2
            xb[poison, :, -4:-1, -4:-1] = 1.0  # a white 3x3 patch near the corner
            yb[poison] = 0
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xd).argmax(1) == yd).float().mean())
        xt = xd.clone()
        xt[:, :, -4:-1, -4:-1] = 1.0
        asr = float((model(xt[yd != 0]).argmax(1) == 0).float().mean())
    train_s = round(time.perf_counter() - t, 1)
    path = tmp / "cifar_resnet18_badnets.pt2"
    batch = torch.export.Dim("batch", min=1, max=4096)  # a dynamic batch: a static one is run in chunks
    torch.export.save(torch.export.export(model, (xd[:2],), dynamic_shapes=({0: batch},)), path)
    _sync()
    t = time.perf_counter()
    scan = scan_model(path, CIFAR, device=dev)
    _sync()
    return {
        "train_s": train_s,
        "clean_accuracy_on_scan_data": round(acc, 3),
        "asr": round(asr, 3),
        "seconds": round(time.perf_counter() - t, 2),
        "verdict": scan.verdict,
        "targets": scan.target_classes,
        "phases": scan.timings,
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu.json")
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures: dict = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    for name, fn in (
        ("mnist_scan", lambda: mnist_scan(dev)),
        ("mnist_scan_again", lambda: mnist_scan(dev)),
        ("cli_sandboxed", lambda: cli_scan(dev)),
    ):
        try:
            figures[name] = fn()
        except Exception as exc:  # a benchmark row that fails is recorded, not fatal
            figures[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(name, figures[name], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            figures["cifar_resnet18"] = cifar_resnet_scan(dev, Path(tmp))
        except Exception as exc:
            figures["cifar_resnet18"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print("cifar_resnet18", figures["cifar_resnet18"], flush=True)
    Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
