"""Dump the pairs stage's full table (every measured pair's L1, ASR, cross-entropy, spill and index) for each model
of a zoo, so that the pairs' decision can be studied and re-decided offline without scanning again.

    .venv/bin/python benchmarks/pair_tables.py --zoo bench-out/zoo-families --out docs/results/families_pairs.json

Runs only the setup and the pairs stage (not USB's two stages); resumable: models already in OUT are kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from backdoorscan import ModelSource, ScanSettings
from backdoorscan.core.device import resolve_device
from backdoorscan.loading import prepare
from backdoorscan.report.writer import write_text_atomic
from backdoorscan.usb.families import FamilyScan, scan_pairs
from backdoorscan.usb.pipeline import class_group

from common import BUNDLED_TEST, clean_samples, device_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pair-steps", type=int, default=ScanSettings.pair_steps)
    parser.add_argument("--models", help="comma-separated model names (default: every model of the zoo)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo, out = Path(args.zoo), Path(args.out)
    meta = json.loads((zoo / "zoo.json").read_text())
    models = meta["models"] if "models" in meta else list(meta.values())  # the families zoo: name -> record
    data = clean_samples(zoo, meta) if "models" in meta else str(BUNDLED_TEST)
    dev = resolve_device(args.device)
    tables = json.loads(out.read_text()) if out.exists() else {"device": device_name(dev), "models": {}}
    settings = ScanSettings(pair_steps=args.pair_steps)
    wanted = None if args.models is None else set(args.models.split(","))
    for model in [m for m in models if (m.get("file") or m.get("path")) and (wanted is None or m["name"] in wanted)]:
        if model["name"] in tables["models"]:
            continue
        t = time.perf_counter()
        ready = prepare(
            ModelSource(zoo / (model.get("file") or model["path"])),
            data,
            samples=settings.samples,
            seed=settings.seed,
            device=dev,
        )
        assert ready.samples is not None and ready.predictions is not None
        group, _ = class_group(ready.model, ready.samples.x, ready.num_classes, settings, dev, None)
        result = FamilyScan()
        scan_pairs(
            ready.model,
            ready.samples.x,
            ready.predictions,
            ready.num_classes,
            settings=settings,
            universal_targets=[],
            group=group,
            progress=None,
            result=result,
        )
        tables["models"][model["name"]] = {
            "attack": model.get("attack"),
            "family": model.get("family", model.get("group")),
            "aside": model.get("aside"),
            "pairs": result.to_dict().get("pairs"),
            "findings": [f.to_dict() for f in result.findings],
            "seconds": round(time.perf_counter() - t, 1),
        }
        write_text_atomic(out, json.dumps(tables, indent=1) + "\n")
        print(model["name"], tables["models"][model["name"]]["seconds"], "s", flush=True)


if __name__ == "__main__":
    main()
