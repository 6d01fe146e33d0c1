"""Detection over a zoo (USB paper Tab. 1 layout): per group and method, accuracy, ASR, L1, detection counts.

    .venv/bin/python benchmarks/detection.py --zoo bench-out/zoo --methods usb,nc

Writes ZOO/detection.json (one row per model and method) and prints the Markdown table. The decision is a pure
function of the per-class L1 norms and ASRs stored in each row, so `--rescore FILE` re-applies it with other
settings (e.g. `--scale linear`) without scanning again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backdoorscan import ModelSource, ScanSettings, scan_model
from backdoorscan.choices import Form, Scale, choices
from backdoorscan.decide import flag_classes
from backdoorscan.device import resolve_device

from common import clean_samples, device_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="bench-out/zoo")
    parser.add_argument("--data", help="clean samples (default: the zoo's clean.npz, else the bundled MNIST digits)")
    parser.add_argument("--methods", default="usb,nc")
    parser.add_argument("--form", default=ScanSettings.form, choices=choices(Form), help="USB trigger form")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rescore", help="a detection.json to decide again with --scale/--threshold/--max-ratio")
    parser.add_argument("--scale", default=ScanSettings.scale, choices=choices(Scale))
    parser.add_argument("--threshold", type=float, default=ScanSettings.threshold)
    parser.add_argument("--max-ratio", type=float, default=ScanSettings.max_ratio)
    args = parser.parse_args()
    if args.rescore:
        saved = json.loads(Path(args.rescore).read_text())
        rows = [rescore(r, args.scale, args.threshold, args.max_ratio) for r in saved["rows"]]
        print(table(rows, f"{saved['device']}; decided again with scale {args.scale}, threshold "
                          f"{args.threshold}, max ratio {args.max_ratio}"))
        return
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    if not (zoo / "zoo.json").exists():
        sys.exit(f"{zoo}/zoo.json not found: build a zoo first with benchmarks/zoo.py")
    meta = json.loads((zoo / "zoo.json").read_text())
    data = args.data or clean_samples(zoo, meta)
    dev = resolve_device(args.device)
    rows = []
    for model in [m for m in meta["models"] if m["counted"]]:
        for method in args.methods.split(","):
            t = time.perf_counter()
            source = ModelSource(zoo / model["file"], arch=model.get("arch_ref"))
            scan = scan_model(source, data, settings=ScanSettings(method=method, form=args.form), device=dev)
            target = model["attack"]["target"] if model["attack"] else None
            l1 = [c.l1_norm for c in scan.classes]
            rows.append({"name": model["name"], "group": model["group"], "method": method, "target": target,
                         "accuracy": model["accuracy"], "asr": model["asr"], "verdict": scan.verdict,
                         "found": scan.target_classes, "l1_target": None if target is None else l1[target],
                         "l1_mean": float(np.mean(l1)), "seconds": round(time.perf_counter() - t, 2),
                         "l1": [round(v, 3) for v in l1], "asr_per_class": [round(c.asr, 3) for c in scan.classes],
                         "anomaly_index": [round(c.anomaly_index, 3) for c in scan.classes]})
            print(json.dumps(rows[-1]), flush=True)
    suffix = "" if args.form == ScanSettings.form else f"_{args.form}"
    (zoo / f"detection{suffix}.json").write_text(json.dumps({"device": device_name(dev), "form": args.form,
                                                             "rows": rows}, indent=2) + "\n")
    print(table(rows, device_name(dev)))


def rescore(row: dict, scale: str, threshold: float, max_ratio: float) -> dict:
    """The row with verdict and found classes decided again from its stored per-class L1 and ASR."""
    _, flagged = flag_classes(row["l1"], row["asr_per_class"], threshold=threshold, max_ratio=max_ratio,
                              asr_min=ScanSettings.asr_min, scale=scale)
    found = [int(c) for c in np.flatnonzero(flagged)]
    return {**row, "found": found, "verdict": "backdoor" if found else "clean"}


def table(rows: list[dict], device: str) -> str:
    """Tab. 1 of the USB paper: one line per group and method."""
    lines = ["| group | models | accuracy | ASR | method | L1 of reversed trigger | detected clean | detected "
             "backdoored | target correct | correct set | wrong | s / model |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for group in dict.fromkeys(r["group"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["group"] == group and r["method"] == method]
            if not rs:
                continue
            bad = [r for r in rs if r["target"] is not None]
            l1 = np.mean([r["l1_target"] if r["target"] is not None else r["l1_mean"] for r in rs])
            correct = sum(r["found"] == [r["target"]] for r in bad)
            cset = sum(r["target"] in r["found"] and len(r["found"]) > 1 for r in bad)
            wrong = sum(bool(r["found"]) and r["target"] not in r["found"] for r in bad)
            asr = f"{100 * np.mean([r['asr'] for r in bad]):.2f}" if bad else "n/a"
            lines.append(f"| {group} | {len(rs)} | {100 * np.mean([r['accuracy'] for r in rs]):.2f} | {asr} | "
                         f"{method.upper()} | {l1:.2f} | {sum(r['verdict'] == 'clean' for r in rs)} | "
                         f"{sum(r['verdict'] == 'backdoor' for r in rs)} | "
                         f"{correct if bad else 'n/a'} | {cset if bad else 'n/a'} | {wrong if bad else 'n/a'} | "
                         f"{np.mean([r['seconds'] for r in rs]):.1f} |")
    return "\n".join(lines) + f"\n\nDevice: {device}."


if __name__ == "__main__":
    main()
