"""Dump the pairs stage's full table (every measured pair's L1, ASR, cross-entropy, spill and index) for each model
of a zoo, so that the pairs' decision can be studied and re-decided offline without scanning again.

    .venv/bin/python benchmarks/pair_tables.py --zoo bench-out/zoo-families --out docs/results/families_pairs.json

Runs only the setup and the pairs stage (not USB's two stages); resumable: models already in OUT are kept.

    .venv/bin/python benchmarks/pair_tables.py --redecide docs/results/families_pairs.json

decides every stored table again with the scan's own decision (`usb.pair_rule.decide_pairs`), rewrites its indices
and findings, and prints per model what was flagged, how far the planted pairs and the others are from flagging,
and the mapping test's statistic.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from backdoorscan import ModelSource, ScanSettings
from backdoorscan.core.device import resolve_device
from backdoorscan.loading import prepare
from backdoorscan.report.writer import write_text_atomic
from backdoorscan.usb.families import FamilyScan, scan_pairs
from backdoorscan.usb.pair_rule import PairDecision, decide_pairs
from backdoorscan.usb.pipeline import class_group

from common import clean_data, clean_samples, device_name


def planted(attack: dict | None) -> set[tuple[int, int]]:
    """The (source, target) pairs an attack recorded in a families zoo plants."""
    if not attack:
        return set()
    if attack.get("kind") == "source_specific":
        return {(attack["source"], attack["target"])}
    if attack.get("kind") == "all_to_all":
        return {(y, (y + attack.get("shift", 1)) % attack.get("num_classes", 10)) for y in range(10)}
    return set()


def decide_table(
    rows: dict[tuple[int, int], dict],
    universal_targets: list[int],
    settings: ScanSettings | None = None,
    decide=decide_pairs,
) -> tuple[list[tuple[int, int]], PairDecision]:
    """A stored pair table ((source, target) -> its row) decided by the scan's own `decide_pairs` (or a candidate
    with its signature); unmeasured spill (None) stays unmeasured (NaN). Pairs in the scan's candidate order at 10
    classes: source-major."""
    pairs = sorted(rows)
    l1, ce, asr = (np.array([rows[p][key] for p in pairs], dtype=np.float64) for key in ("l1", "cross_entropy", "asr"))
    spill = np.array([np.nan if rows[p]["spill"] is None else rows[p]["spill"] for p in pairs])
    # reliance (0.12.0) where the table holds it; older tables have none: unmeasured, no constraint
    reliance = np.array([np.nan if rows[p].get("reliance") is None else rows[p]["reliance"] for p in pairs])
    # the support (measured with --pair-support-ratio): inf where the patch does not work; other tables have none
    stored = all("support" in rows[p] for p in pairs)
    support = (
        np.array([np.inf if rows[p]["support"] is None else rows[p]["support"] for p in pairs]) if stored else None
    )
    # compactness (0.15.0) where the table holds it; older tables have none: no compact route
    compact = (
        np.array([np.nan if rows[p].get("compact") is None else rows[p]["compact"] for p in pairs])
        if any("compact" in rows[p] for p in pairs)
        else None
    )
    # the window test (0.16.0) where the table holds it: only the pairs it was run on carry the two figures
    window_asr, window_ce = (
        np.array([np.nan if rows[p].get(key) is None else rows[p][key] for p in pairs])
        for key in ("window_asr", "window_ce")
    )
    decision = decide(
        pairs,
        l1,
        ce,
        asr,
        settings=settings or ScanSettings(),
        universal_targets=universal_targets,
        spill=spill,
        support=support,
        reliance=reliance,
        stopped=np.array([bool(rows[p].get("stopped")) for p in pairs]),  # staged scans (0.13.0) mark them
        compact=compact,
        window_asr=window_asr,
        window_ce=window_ce,
    )
    return pairs, decision


def pairs_stage(zoo: Path, model: dict, data: str, settings: ScanSettings, device: torch.device) -> FamilyScan:
    """The pairs stage alone, as the scan runs it, on one model of a zoo (its record: file or path, arch_ref)."""
    ready = prepare(
        ModelSource(zoo / (model.get("file") or model["path"]), arch=model.get("arch_ref")),
        data,
        samples=settings.samples,
        seed=settings.seed,
        device=device,
    )
    assert ready.samples is not None and ready.predictions is not None
    x, y, k = ready.samples.x, ready.predictions, ready.num_classes
    group, _ = class_group(ready.model, x, k, settings, device, None)
    result = FamilyScan()
    scan_pairs(ready.model, x, y, k, settings=settings, universal_targets=[], group=group, progress=None, result=result)
    return result


def redecide(path: Path) -> None:
    """Decide each stored table again with the current code; rewrite the file and print one line per model."""
    tables = json.loads(path.read_text())
    print("| model | flagged | planted pair's distance | best other's distance |")
    print("|---|---|---:|---:|")
    for name, entry in tables["models"].items():
        rows = {(p["source"], p["target"]): p for p in entry["pairs"]["pairs"]}
        pairs, decision = decide_table(rows, universal_targets=[])
        for p, value in zip(pairs, decision.index, strict=True):
            rows[p]["index"] = round(float(value), 4) if np.isfinite(value) else None
        entry["pairs"]["pairs"] = sorted(rows.values(), key=lambda r: -(r["index"] if r["index"] is not None else -1e9))
        entry["flagged"] = [list(pairs[i]) for i in decision.flagged]
        want = planted(entry.get("attack"))
        mine = [decision.distance[i] for i, p in enumerate(pairs) if p in want]
        other = min(decision.distance[i] for i, p in enumerate(pairs) if p not in want)
        print(
            f"| {name} | {', '.join(f'{s}->{t}' for s, t in entry['flagged']) or '-'} | "
            f"{f'{min(mine):.2f}' if mine else ''} | {other:.2f} |"
        )
    write_text_atomic(path, json.dumps(tables, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redecide", help="a stored tables file: decide it again, rewrite it, print the table")
    parser.add_argument("--zoo")
    parser.add_argument("--out")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pair-steps", type=int, default=ScanSettings.pair_steps)
    parser.add_argument("--pair-restarts", type=int, default=ScanSettings.pair_restarts)
    parser.add_argument("--pair-recheck", type=int, default=ScanSettings.pair_recheck)
    parser.add_argument("--models", help="comma-separated model names (default: every model of the zoo)")
    parser.add_argument(
        "--pair-support-ratio",
        type=float,
        default=ScanSettings.pair_support_ratio,
        help="measure each pair's support and decide with it under this size guard (0: not measured)",
    )
    parser.add_argument(
        "--shared", action="store_true", help="run the all-to-all shared-patch test too, with the same steps"
    )
    args = parser.parse_args()
    if args.redecide:
        redecide(Path(args.redecide))
        return
    if not (args.zoo and args.out):
        parser.error("--zoo and --out are needed to measure tables")
    from detection_families import shared_patch  # it imports this module

    torch.set_num_threads(args.threads)
    zoo, out = Path(args.zoo), Path(args.out)
    meta = json.loads((zoo / "zoo.json").read_text())
    models = meta["models"] if "models" in meta else list(meta.values())  # the families zoo: name -> record
    data = clean_samples(zoo, meta) if "models" in meta else str(clean_data(zoo))
    dev = resolve_device(args.device)
    tables = json.loads(out.read_text()) if out.exists() else {"device": device_name(dev), "models": {}}
    settings = ScanSettings(
        pair_steps=args.pair_steps,
        pair_support_ratio=args.pair_support_ratio,
        pair_restarts=args.pair_restarts,
        pair_recheck=args.pair_recheck,
    )
    wanted = None if args.models is None else set(args.models.split(","))
    for model in [m for m in models if (m.get("file") or m.get("path")) and (wanted is None or m["name"] in wanted)]:
        if model["name"] in tables["models"]:
            continue
        t = time.perf_counter()
        result = pairs_stage(zoo, model, data, settings, dev)
        pairs = result.to_dict().get("pairs")
        tables["models"][model["name"]] = {
            "attack": model.get("attack"),
            "family": model.get("family", model.get("group")),
            "aside": model.get("aside"),
            "pairs": pairs,
            "findings": [f.to_dict() for f in result.findings],
            "shared_patch": None
            if not args.shared
            else shared_patch(
                ModelSource(zoo / (model.get("file") or model["path"]), arch=model.get("arch_ref")),
                Path(data),
                pairs["pairs"],
                settings,
            ),
            "seconds": round(time.perf_counter() - t, 1),
        }
        write_text_atomic(out, json.dumps(tables, indent=1) + "\n")
        print(model["name"], tables["models"][model["name"]]["seconds"], "s", flush=True)


if __name__ == "__main__":
    main()
