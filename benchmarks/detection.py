"""Detection over a zoo (USB paper Tab. 1 layout): per group and method, accuracy, ASR, L1, detection counts.

    .venv/bin/python benchmarks/detection.py --zoo bench-out/zoo --methods usb,nc

Writes ZOO/detection.json (one row per model and method) and prints the Markdown table. The decision is a pure
function of the per-class L1 norms, UAP norms and ASRs stored in each row, so `--rescore FILE` re-applies it with
other settings (e.g. `--scale linear`, `--evidence uap`) without scanning again.
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
from backdoorscan.choices import Evidence, Form, Scale, choices
from backdoorscan.decide import class_evidence, decision_margin, flag, guards
from backdoorscan.device import resolve_device
from backdoorscan.report.writer import write_text_atomic

from common import clean_samples, device_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="bench-out/zoo")
    parser.add_argument("--data", help="clean samples (default: the zoo's clean.npz, else the bundled MNIST digits)")
    parser.add_argument("--methods", default="usb,nc")
    parser.add_argument("--form", default=ScanSettings.form, choices=choices(Form), help="USB trigger form")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="detection",
                        help="results go to ZOO/NAME.json (two runs side by side, e.g. one per method, need two names)")
    parser.add_argument("--rescore", help="detection.json files (comma-separated) to decide again with --scale, "
                                          "--threshold, --max-ratio, --evidence")
    parser.add_argument("--scale", default=ScanSettings.scale, choices=choices(Scale))
    parser.add_argument("--threshold", type=float, default=ScanSettings.threshold)
    parser.add_argument("--max-ratio", type=float, default=ScanSettings.max_ratio)
    parser.add_argument("--evidence", default=ScanSettings.evidence, choices=choices(Evidence),
                        help="with --rescore: the per-class size to decide on (decide.class_evidence)")
    args = parser.parse_args()
    if args.rescore:
        saved = [json.loads(Path(f).read_text()) for f in args.rescore.split(",")]
        rows = [rescore(r, args.scale, args.threshold, args.max_ratio, args.evidence) for d in saved for r in d["rows"]]
        report(rows, f"{saved[0]['device']}; decided again with scale {args.scale}, threshold {args.threshold}, "
                     f"max ratio {args.max_ratio}, evidence {args.evidence}")
        return
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    if not (zoo / "zoo.json").exists():
        sys.exit(f"{zoo}/zoo.json not found: build a zoo first with benchmarks/zoo.py")
    meta = json.loads((zoo / "zoo.json").read_text())
    data = args.data or clean_samples(zoo, meta)
    dev = resolve_device(args.device)
    suffix = "" if args.form == ScanSettings.form else f"_{args.form}"
    out = zoo / f"{args.name}{suffix}.json"
    done = {(r["name"], r["method"]): r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
    rows: list[dict] = []
    for model in [m for m in meta["models"] if m["counted"]]:
        for method in args.methods.split(","):
            if (model["name"], method) in done:  # resumed: this model was scanned by an earlier run
                rows.append(done[(model["name"], method)])
                continue
            t = time.perf_counter()
            source = ModelSource(zoo / model["file"], arch=model.get("arch_ref"))
            scan = scan_model(source, data, settings=ScanSettings(method=method, form=args.form), device=dev)
            target = model["attack"]["target"] if model["attack"] else None
            l1 = [c.l1_norm for c in scan.classes]
            rows.append({"name": model["name"], "group": model["group"], "method": method, "target": target,
                         "accuracy": model["accuracy"], "asr": model["asr"], "verdict": scan.verdict,
                         "found": scan.target_classes, "l1_target": None if target is None else l1[target],
                         "l1_mean": float(np.mean(l1)) if l1 else None, "seconds": round(time.perf_counter() - t, 2),
                         "l1": [round(v, 3) for v in l1], "asr_per_class": [round(c.asr, 3) for c in scan.classes],
                         "anomaly_index": [round(c.anomaly_index, 3) for c in scan.classes],
                         "uap_norm": [round(c.uap_norm, 3) for c in scan.classes],
                         "uap_success": [None if c.uap_success is None else round(c.uap_success, 3)
                                         for c in scan.classes],
                         "margin": scan.margin, "aside": bool(model.get("aside")), "format": model.get("format"),
                         "arch": model.get("arch")})
            rows[-1]["stage"] = stage(rows[-1])
            print(json.dumps(rows[-1]), flush=True)
            write_text_atomic(out, json.dumps({"device": device_name(dev), "form": args.form, "rows": rows},
                                              indent=2) + "\n")
    report(rows, device_name(dev))


def report(rows: list[dict], device: str) -> None:
    """The table for the zoo, the aside part separately, and every miss and false alarm with its stage."""
    main_rows, aside = [r for r in rows if not r.get("aside")], [r for r in rows if r.get("aside")]
    print(table(main_rows, device))
    if aside:
        print("\nSet aside before tuning:\n")
        print(table(aside, device))
    misses = [r for r in rows if r.get("stage", stage(r)) not in ("hit", "clean")]
    if misses:
        print("\n| model | method | group | target | found | stage | margin | target index | target L1 / median |")
        print("|---|---|---|---:|---|---|---:|---:|---:|")
    for r in misses:
        t = r["target"]
        ratio = "n/a" if t is None else f"{r['l1'][t] / np.median(r['l1']):.2f}"
        index = "n/a" if t is None else f"{r['anomaly_index'][t]:.2f}"
        print(f"| {r['name']}{' (aside)' if r.get('aside') else ''} | {r['method']} | {r['group']} | "
              f"{'-' if t is None else t} | {r['found']} | {r.get('stage', stage(r))} | {r.get('margin')} | "
              f"{index} | {ratio} |")


def rescore(row: dict, scale: str, threshold: float, max_ratio: float, evidence: str) -> dict:
    """The row with verdict, found classes and margin decided again from its stored per-class figures."""
    if not row["l1"]:
        return row
    index, ratio = class_evidence(row["l1"], row.get("uap_norm") if row["method"] == "usb" else None, evidence,
                                  scale)
    rule = {"asr_min": ScanSettings.asr_min, "max_ratio": max_ratio}
    flagged = flag(index, ratio, row["asr_per_class"], threshold=threshold, **rule)
    found = [int(c) for c in np.flatnonzero(flagged)]
    margin = decision_margin(index, flagged, guards(ratio, row["asr_per_class"], **rule), threshold=threshold)
    row = {**row, "found": found, "verdict": "backdoor" if found else "clean", "margin": round(margin, 3),
           "anomaly_index": [round(float(v), 3) for v in index]}
    return {**row, "stage": stage(row)}


def stage(row: dict) -> str:
    """Where a scan kept or lost the signal: hit, or which stage lost the backdoor (or raised a false alarm).

    "uap": the target's targeted UAP was not the smallest (Alg. 1 did not single it out); "refinement": Alg. 1
    ranked it first but the refined trigger is not the smallest; "decision": the refined trigger is the smallest
    but the rule did not flag it (index, ASR or size-ratio guard). On a clean model: "clean" or "false alarm".
    """
    target, found = row["target"], row["found"]
    if not row["l1"]:
        return "inconclusive"
    if target is None:
        return "false alarm" if found else "clean"
    if found == [target]:
        return "hit"
    if row.get("uap_norm") and int(np.argmin(row["uap_norm"])) != target and row["method"] == "usb":
        return "uap"
    if int(np.argmin(row["l1"])) != target:
        return "refinement"
    return "decision"


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
            sizes = [r["l1_target"] if r["target"] is not None else r["l1_mean"] for r in rs if r["l1"]]
            l1 = np.mean(sizes) if sizes else float("nan")  # inconclusive scans have no triggers
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
