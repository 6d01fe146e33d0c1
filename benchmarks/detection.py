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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backdoorlab.data import NUM_CLASSES
from backdoorscan import ModelSource, ScanSettings, scan_model
from backdoorscan.core.choices import Form, MaskCost, Refine, Scale, SizeEvidence, choices
from backdoorscan.core.device import resolve_device
from backdoorscan.loading import prepare
from backdoorscan.report.writer import write_text_atomic
from backdoorscan.usb.decide import class_evidence, class_threshold, decision_margin, flag, guards, name_targets
from backdoorscan.usb.staging import ranking, select, stage_one

from common import clean_samples, device_name

# The USB authors' code (xiaoyunxxy/usb, gene_uap/targeted_uap.py and adversarial_perturbation.py): L-inf UAPs with
# xi = 20 on [0, 1] images (no bound in effect; x + v is still clipped here), DeepFool's overshoot 0.2 and 20 steps,
# done at a targeted success of 1 - delta = 0.4, five passes; the refinement's adaptive L1 weight (TrojanZoo's NC);
# no other family.
AUTHORS = {
    "norm": "linf",
    "delta": 1.0,
    "theta": 0.4,
    "overshoot": 0.2,
    "deepfool_iter": 20,
    "max_passes": 5,
    "mask_cost": "adaptive",
    "families": "universal",  # USB as published: one universal trigger per target
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="bench-out/zoo")
    parser.add_argument("--data", help="clean samples (default: the zoo's clean.npz, else the bundled MNIST digits)")
    parser.add_argument("--methods", default="usb,nc")
    parser.add_argument("--form", default=ScanSettings.form, choices=choices(Form), help="USB trigger form")
    parser.add_argument(
        "--mask-cost",
        default=ScanSettings.mask_cost,
        choices=choices(MaskCost),
        help="USB refinement's size penalty (refine.py)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--refine",
        default=ScanSettings.refine,
        choices=choices(Refine),
        help="staged (default) or all; an 'all' run also stores the stage-1 ranking, so that "
        "--staged-from can decide the staged scan from its figures",
    )
    parser.add_argument(
        "--authors",
        action="store_true",
        help="scan with the USB authors' code's settings (L-inf UAPs, adaptive L1 weight; rows named usb_authors)",
    )
    parser.add_argument("--models", help="comma-separated model names to scan (default: every counted model)")
    parser.add_argument(
        "--staged-from",
        help="detection.json files of --refine all runs: decide each model as the "
        "staged scan would (its refined classes' figures) and compare",
    )
    parser.add_argument(
        "--name",
        default="detection",
        help="results go to ZOO/NAME.json (two runs side by side, e.g. one per method, need two names)",
    )
    parser.add_argument(
        "--rescore",
        help="detection.json files (comma-separated) to decide again with --scale, "
        "--threshold, --max-ratio, --evidence",
    )
    parser.add_argument("--scale", default=ScanSettings.scale, choices=choices(Scale))
    parser.add_argument("--threshold", type=float, default=ScanSettings.threshold)
    parser.add_argument("--threshold-classes", type=int, default=ScanSettings.threshold_classes)
    parser.add_argument("--target-share", type=float, default=ScanSettings.target_share)
    parser.add_argument("--max-ratio", type=float, default=ScanSettings.max_ratio)
    parser.add_argument(
        "--evidence",
        default=ScanSettings.evidence,
        choices=choices(SizeEvidence),
        help="with --rescore: the per-class size to decide on (decide.class_evidence)",
    )
    args = parser.parse_args()
    args.label, args.overrides = ("usb_authors", AUTHORS) if args.authors else (None, None)
    if args.staged_from:
        compare_staged([json.loads(Path(f).read_text()) for f in args.staged_from.split(",")])
        return
    if args.rescore:
        saved = [json.loads(Path(f).read_text()) for f in args.rescore.split(",")]
        rule = Rule(
            args.scale, args.threshold, args.max_ratio, args.evidence, args.threshold_classes, args.target_share
        )
        rows = [rescore(r, rule) for d in saved for r in d["rows"]]
        report(rows, f"{saved[0]['device']}; decided again with {rule}")
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
    wanted = None if args.models is None else set(args.models.split(","))
    for model in [m for m in meta["models"] if m["counted"] and (wanted is None or m["name"] in wanted)]:
        for method in args.methods.split(","):
            key = (model["name"], method_name(method, args))
            if key in done:  # resumed: scanned by an earlier run
                rows.append(done[key])
                continue
            rows.append(scan_row(zoo, meta, model, method, data, dev, args))
            print(json.dumps(rows[-1]), flush=True)
            save(out, rows, dev, args.form)
    save(out, rows, dev, args.form)  # rows resumed after the last scan are kept too
    report(rows, device_name(dev))


def method_name(method: str, args: argparse.Namespace) -> str:
    """A row's method: usb, nc, or for USB a variant's label (`args.label`: usb_authors with --authors, or one of
    benchmarks/gpu_zoo.py's variants)."""
    return args.label if method == "usb" and getattr(args, "label", None) else method


def scan_settings(method: str, args: argparse.Namespace) -> ScanSettings:
    """The settings of one zoo scan: the defaults with this run's options, and for USB a variant's overrides
    (`args.overrides`: AUTHORS with --authors)."""
    extra = (getattr(args, "overrides", None) or {}) if method == "usb" else {}
    return ScanSettings(
        **{"method": method, "form": args.form, "refine": args.refine, "mask_cost": args.mask_cost, **extra}
    )


def scan_row(
    zoo: Path, meta: dict, model: dict, method: str, data: str, dev: torch.device, args: argparse.Namespace
) -> dict:
    """Scan one zoo model with one method; its row holds every figure a later decision rule needs."""
    t = time.perf_counter()
    source = ModelSource(
        zoo / model["file"],
        arch=model.get("arch_ref"),
        num_classes=NUM_CLASSES.get(meta["dataset"]) if model.get("arch_ref") else None,
    )
    settings = scan_settings(method, args)
    scan = scan_model(source, data, settings=settings, device=dev)
    target = model["attack"]["target"] if model["attack"] else None
    l1 = [c.l1_norm for c in scan.classes]
    ids = [c.cls for c in scan.classes]
    order = scan.staging.order if scan.staging is not None else None
    if order is None and args.refine == "all" and scan.classes:
        order = stage1_order(source, data, settings, dev, scan.batching.get("class_group"))
    row = {
        "name": model["name"],
        "group": model["group"],
        "method": method_name(method, args),
        "target": target,
        "accuracy": model["accuracy"],
        "asr": model["asr"],
        "verdict": scan.verdict,
        "found": scan.target_classes,
        "num_classes": scan.staging.num_classes if scan.staging else None,
        "threshold": scan.threshold,
        "weaker": [c.cls for c in scan.classes if c.flagged and not c.target],
        "l1_target": l1[ids.index(target)] if target in ids else None,
        "refine": None if scan.staging is None else scan.staging.mode,
        "classes": ids,
        "weights": [c.weight for c in scan.classes],
        "stage1_order": order,
        "l1_mean": float(np.mean(l1)) if l1 else None,
        "seconds": round(time.perf_counter() - t, 2),
        "l1": [round(v, 3) for v in l1],
        "asr_per_class": [round(c.asr, 3) for c in scan.classes],
        "anomaly_index": [round(c.anomaly_index, 3) for c in scan.classes],
        "uap_norm": [round(c.uap_norm, 3) for c in scan.classes],
        "uap_success": [None if c.uap_success is None else round(c.uap_success, 3) for c in scan.classes],
        "margin": scan.margin,
        "aside": bool(model.get("aside")),
        "format": model.get("format"),
        "arch": model.get("arch"),
        "timings": scan.timings,
        "findings": [] if scan.families is None else [f.to_dict() for f in scan.families.findings],
        "family_margins": {} if scan.families is None else scan.families.to_dict()["margins"],
        # every measured pair and warp, so that a later decision rule can be applied to stored scans
        "families": None if scan.families is None else scan.families.to_dict(),
    }
    row["stage"] = stage(row)
    return row


def save(out: Path, rows: list[dict], dev: torch.device, form: str) -> None:
    """The rows so far, atomically (a killed run resumes from them)."""
    write_text_atomic(out, json.dumps({"device": device_name(dev), "form": form, "rows": rows}, indent=2) + "\n")


def stage1_order(
    source: ModelSource, data: str, settings: ScanSettings, dev: torch.device, group: int | None
) -> list[int]:
    """The staged scan's stage-1 ranking of a model (for decisions of the staged scan from a full scan's figures),
    in the class groups the scan itself used."""
    ready = prepare(source, data, samples=settings.samples, seed=settings.seed, device=dev)
    return ranking(
        *stage_one(
            ready.model, ready.samples.x, ready.predictions, ready.num_classes, settings, group or ready.num_classes
        )
    )


def staged_row(
    row: dict,
    suspects: int = ScanSettings.suspects,
    references: int = ScanSettings.references,
    seed: int = ScanSettings.seed,
) -> dict:
    """A full scan's row decided as the staged scan decides: on the classes it would refine, with their weights.

    Exact up to floating point, since each class's Alg. 1 and Alg. 2 run independently of the others.
    """
    order, k = row.get("stage1_order"), len(row["classes"])
    if order is None or k <= suspects + references:
        return row
    refined, _, weights = select(order, suspects, references, seed)
    pos = [row["classes"].index(c) for c in refined]
    pick = {key: [row[key][i] for i in pos] for key in ("l1", "asr_per_class", "uap_norm", "uap_success")}
    return rescore({**row, **pick, "classes": refined, "weights": weights, "num_classes": k}, Rule())


def compare_staged(saved: list[dict]) -> None:
    """Per model: the full scan's verdict and targets beside the staged scan's, decided from the same figures."""
    print("| model | group | target | target's stage-1 rank | full scan | staged scan | same |")
    print("|---|---|---:|---:|---|---|:---:|")
    same = total = 0
    for row in (r for d in saved for r in d["rows"]):
        if row.get("refine") != "all" or not row.get("stage1_order"):
            continue
        row, staged = rescore(row, Rule()), staged_row(row)  # both decided by today's rule
        t = row["target"]
        rank = "-" if t is None else row["stage1_order"].index(t)
        agree = staged["found"] == row["found"]
        same, total = same + agree, total + 1
        print(
            f"| {row['name']} | {row['group']} | {'-' if t is None else t} | {rank} | {row['found'] or 'clean'} "
            f"| {staged['found'] or 'clean'} | {'yes' if agree else '**no**'} |"
        )
    print(f"\nSame verdict and targets: {same}/{total}")


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
        i = _position(r, t)
        ratio = "n/a" if i is None else f"{r['l1'][i] / np.median(r['l1']):.2f}"
        index = "n/a" if i is None else f"{r['anomaly_index'][i]:.2f}"
        print(
            f"| {r['name']}{' (aside)' if r.get('aside') else ''} | {r['method']} | {r['group']} | "
            f"{'-' if t is None else t} | {r['found']} | {r.get('stage', stage(r))} | {r.get('margin')} | "
            f"{index} | {ratio} |"
        )


@dataclass(frozen=True)
class Rule:
    """The decision's settings, as `scan_model` applies them (defaults: ScanSettings')."""

    scale: str = ScanSettings.scale
    threshold: float = ScanSettings.threshold
    max_ratio: float = ScanSettings.max_ratio
    evidence: str = ScanSettings.evidence
    threshold_classes: int = ScanSettings.threshold_classes
    target_share: float = ScanSettings.target_share


def num_classes(row: dict) -> int:
    """K of a row's model: stored, else the stage-1 ranking's length, else the number of classes scanned."""
    return row.get("num_classes") or len(row.get("stage1_order") or row["l1"])


def rescore(row: dict, rule: Rule) -> dict:
    """The row with verdict, found classes and margin decided again from its stored per-class figures."""
    if not row["l1"]:
        return row
    index, ratio = class_evidence(
        row["l1"],
        row.get("uap_norm") if row["method"] != "nc" else None,
        rule.evidence,
        rule.scale,
        row.get("weights"),
    )
    guard = {"asr_min": ScanSettings.asr_min, "max_ratio": rule.max_ratio}
    threshold = class_threshold(rule.threshold, num_classes(row), rule.threshold_classes)
    flagged = flag(index, ratio, row["asr_per_class"], threshold=threshold, **guard)
    named = name_targets(index, flagged, threshold=threshold, share=rule.target_share)
    ids = row.get("classes") or list(range(len(row["l1"])))
    found = [int(ids[i]) for i in np.flatnonzero(named)]
    margin = decision_margin(index, named, guards(ratio, row["asr_per_class"], **guard), threshold=threshold)
    row = {
        **row,
        "found": found,
        "verdict": "backdoor" if found else "clean",
        "margin": round(margin, 3),
        "anomaly_index": [round(float(v), 3) for v in index],
        "threshold": round(threshold, 3),
        "weaker": [int(ids[i]) for i in np.flatnonzero(flagged & ~named)],
    }
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
    ids = row.get("classes") or list(range(len(row["l1"])))
    if target not in ids:
        return "stage 1"
    if row.get("uap_norm") and ids[int(np.argmin(row["uap_norm"]))] != target and row["method"] != "nc":
        return "uap"
    if ids[int(np.argmin(row["l1"]))] != target:
        return "refinement"
    return "decision"


def _position(row: dict, cls: int | None) -> int | None:
    """Where class `cls` sits in a row's per-class lists (a staged scan stores only its refined classes)."""
    ids = row.get("classes") or list(range(len(row["l1"])))
    return ids.index(cls) if cls is not None and cls in ids else None


def table(rows: list[dict], device: str) -> str:
    """Tab. 1 of the USB paper: one line per group and method."""
    lines = [
        "| group | models | accuracy | ASR | method | L1 of reversed trigger | detected clean | detected "
        "backdoored | target correct | correct set | wrong | s / model |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
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
            lines.append(
                f"| {group} | {len(rs)} | {100 * np.mean([r['accuracy'] for r in rs]):.2f} | {asr} | "
                f"{method.upper()} | {l1:.2f} | {sum(r['verdict'] == 'clean' for r in rs)} | "
                f"{sum(r['verdict'] == 'backdoor' for r in rs)} | "
                f"{correct if bad else 'n/a'} | {cset if bad else 'n/a'} | {wrong if bad else 'n/a'} | "
                f"{np.mean([r['seconds'] for r in rs]):.1f} |"
            )
    return "\n".join(lines) + f"\n\nDevice: {device}."


if __name__ == "__main__":
    main()
