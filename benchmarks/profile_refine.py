"""Where Alg. 2's time goes on a device: 30 refinement steps of a CIFAR-10 ResNet-18 over 10 classes, profiled.

    PYTHONPATH=src:lab python3 benchmarks/profile_refine.py [--device cuda] [--export]

Prints the seconds per step as a plain module and (with --export) as an exported program's module, and the
profiler's top operators by device time, so a slow step can be traced to the operator or the Python between them.
"""

from __future__ import annotations

import argparse
import time

import torch


def steps_per_second(model, x, y, dev, steps: int = 30) -> float:
    from backdoorscan.usb.refine import refine

    targets = torch.arange(10, device=dev)
    v = torch.rand(10, *x.shape[1:], device=dev) * 0.1
    failed = torch.zeros(10, dtype=torch.bool, device=dev)
    kwargs = dict(form="blend", lr=0.1, batch=16, betas=(0.5, 0.9), w0=10.0, mask_cost="fixed", init_cost=1e-3)
    refine(model, x, y, targets, v, failed, steps=3, **kwargs)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    refine(model, x, y, targets, v, failed, steps=steps, **kwargs)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    from backdoorlab import cifar_resnet18
    from backdoorscan.loading.preprocess import InputSpec, PixelModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--export", action="store_true")
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    net = cifar_resnet18().eval().to(dev)
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(300, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (300,), device=dev)
    plain = PixelModel(net, InputSpec(3, 32, 32)).to(dev)
    print(f"plain module: {steps_per_second(plain, x, y, dev) * 1000:.1f} ms per step")
    if args.export:
        batch = torch.export.Dim("batch", min=1, max=4096)
        exported = torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},)).module()
        wrapped = PixelModel(exported, InputSpec(3, 32, 32)).to(dev)
        print(f"exported module: {steps_per_second(wrapped, x, y, dev) * 1000:.1f} ms per step")
    else:
        wrapped = plain
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        steps_per_second(wrapped, x, y, dev, steps=5)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
