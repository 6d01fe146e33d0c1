"""Detection on the families zoo (benchmarks/zoo_families.py): the default scan (every family) per model, with
what USB alone (the universal stage of the same scan) would have said, each miss named with the stage that lost it.

    .venv/bin/python benchmarks/detection_families.py --zoo bench-out/zoo-families [--threads 1]

Writes ZOO/detection-IofN.json per shard and ZOO/detection.json (all shards, one row per model) and prints the
per-family table of docs/results.md. Exact means:
source-specific, the planted (source, target) pair among the findings; all-to-all, three or more flagged pairs,
all on the planted mapping; WaNet, a warp finding on the planted target; clean models, no finding at all.

    .venv/bin/python benchmarks/detection_families.py --redecide bench-out/zoo-families/heldout2.json

decides stored rows again (each keeps its full pair table) with the current pairs decision, without scanning:
the universal and warp findings are kept; writes NAME-redecided.json beside the file and prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from filtering_families import keep_triggers

from backdoorscan import ScanSettings, scan_model
from backdoorscan.core.seeding import seeded
from backdoorscan.loading import ModelSource, prepare
from backdoorscan.usb.alltoall import shared_test
from backdoorscan.usb.families import PAIR_ASR
from backdoorscan.usb.pair_rule import pair_family

from common import clean_data
from pair_tables import decide_table, planted
from zoo_families import FAMILIES


def hit(entry: dict, universal: list[int], findings: list[tuple[str, int | None, int]]) -> bool:
    """Whether findings ((family, source, target)) and universal targets are exactly what the entry planted:
    nothing for a clean model, the pair, three or more pairs all on the mapping, or a warp on the target."""
    kind = entry["family"]
    if kind.startswith("clean"):
        return not universal and not findings
    if kind == "wanet":
        return any(f == "warp" and t == entry["target"] for f, _, t in findings)
    want = planted(entry["attack"])
    pairs = {(s, t) for _, s, t in findings if s is not None}
    if kind == "source_specific":
        return want <= pairs
    on_map = [(s, t) for f, s, t in findings if f == "all-to-all" and (s, t) in want]
    return len(on_map) >= 3 and pairs <= want


def exact(entry: dict, scan) -> tuple[bool, str]:
    """Whether the scan found the planted backdoor (or, for a clean model, nothing), and where it was lost."""
    fam = scan.families
    findings = [] if fam is None else fam.findings
    universal = [c.cls for c in scan.classes if c.flagged]
    kind = entry["family"]
    if hit(entry, universal, [(f.family, f.source, f.target) for f in findings]):
        return True, ""
    if kind.startswith("clean"):
        fired = [f"universal {universal}"] if universal else []
        fired += [f"{f.family} {f.source}->{f.target}" for f in findings]
        return False, "flagged by " + "; ".join(fired)
    if fam is None or (fam.warps if kind == "wanet" else fam.pairs) is None:  # Neural Cleanse, --families universal
        return False, f"universal triggers only: flagged {universal}" if universal else "universal triggers only"
    if kind == "wanet":
        i = fam.warps.targets.index(entry["target"])
        return False, (
            f"warp stage: target displacement {fam.warps.displacement[i]:.2f} px, ASR "
            f"{fam.warps.asr[i]:.2f}, index {fam.warp_index[i]:.2f} (threshold {fam.warp_threshold:.2f})"
        )
    mapping = planted(entry["attack"])
    if kind == "source_specific":
        (want,) = mapping
        return False, _pair_loss(fam, want)
    on_map = [f for f in findings if f.family == "all-to-all" and (f.source, f.target) in mapping]
    off_map = [f for f in findings if f.source is not None and (f.source, f.target) not in mapping]
    best = sorted(_pair_loss(fam, p) for p in mapping)[:2]
    return False, f"{len(on_map)} mapping pairs flagged, {len(off_map)} others; e.g. " + " | ".join(best)


def redecide(entry: dict, row: dict, zoo: Path | None = None, shared: dict | None = None) -> dict:
    """A stored row decided again with the current pairs decision (`usb.pair_rule.decide_pairs`) from its stored
    pair table; the universal and warp stages' findings are kept as they were. With `zoo`, the shared patch
    (`usb.alltoall`, new in 0.8.0) is inverted on the model itself and decided against the stored pairs' sizes;
    `shared` is such a test's stored result (benchmarks/pair_tables.py --shared)."""
    universal = row["usb_alone_flagged"]
    stored = {(p["source"], p["target"]): p for p in row["families"]["pairs"]["pairs"]}
    pairs, decision = decide_table(stored, universal_targets=universal)
    family = pair_family(pairs, decision.flagged)
    findings = [f for f in row["findings"] if f["source"] is None]  # universal and warp findings
    findings += [
        {"family": family, "source": pairs[i][0], "target": pairs[i][1], "index": round(float(decision.index[i]), 4)}
        for i in decision.flagged
    ]
    if zoo is not None:
        shared = shared_patch(ModelSource.of(zoo / entry["path"]), clean_data(zoo), list(stored.values()))
    if shared is not None:
        named = {(f["source"], f["target"]) for f in findings}
        if shared["flagged"]:
            findings += [
                {"family": "all-to-all", "source": s, "target": t, "index": shared["index"]}
                for s, t in shared["mapping"]
                if (s, t) not in named
            ]
    found = [(f["family"], f["source"], f["target"]) for f in findings]
    ok = hit(entry, universal, found)
    return {
        **row,
        "verdict": "backdoor" if universal or findings else "clean",
        "exact": ok,
        "lost": "" if ok else row["lost"] or "redecided, found: " + ", ".join(f"{f} {s}->{t}" for f, s, t in found),
        "findings": findings,
        "pairs_margin": decision.margin,
        **({"shared_patch": shared} if shared is not None else {}),
    }


def shared_patch(source: ModelSource, data: Path, table: list[dict], settings: ScanSettings | None = None) -> dict:
    """The shared-patch test on a zoo model, as the default scan runs it (same samples, predictions, settings),
    decided against a stored pair table (its rows: source, target, l1, asr): its sources, its working pairs' L1."""
    settings = settings or ScanSettings()
    ready = prepare(source, data, samples=settings.samples, seed=settings.seed, device="cpu")
    sources = sorted({p["source"] for p in table})
    pair_l1 = np.asarray([p["l1"] for p in table if p["asr"] >= PAIR_ASR])
    with seeded(settings.seed):
        patch, verdict = shared_test(
            ready.model, ready.samples.x, ready.predictions, sources, pair_l1, settings=settings
        )
    return {
        "l1": round(patch.l1, 3),
        "ratio": round(verdict.ratio, 4),
        "moved": round(patch.moved, 4),
        "mapping": [list(p) for p in verdict.mapped],
        "distance": round(verdict.distance, 4),
        "index": round(verdict.index, 4),
        "flagged": verdict.flagged,
    }


def _pair_loss(fam, pair: tuple[int, int]) -> str:
    if fam is None or fam.pairs is None or pair not in fam.pairs.pairs:
        return f"pairs stage: {pair} not measured"
    i = fam.pairs.pairs.index(pair)
    return (
        f"pairs stage: {pair} L1 {fam.pairs.l1[i]:.1f}, ASR {fam.pairs.asr[i]:.2f}, CE {fam.pairs.ce[i]:.3f}, "
        f"index {fam.pair_index[i]:.2f} by L1"
        + (f", {fam.pair_objective_index[i]:.2f} by objective" if fam.pair_objective_index is not None else "")
        + f" (threshold {fam.pair_threshold:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="bench-out/zoo-families")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="I/N: scan models I, I+N, ... (side-by-side processes)")
    parser.add_argument("--table", action="store_true", help="only print the table of what the shards wrote")
    parser.add_argument("--name", default="detection", help="results go to ZOO/NAME-IofN.json and ZOO/NAME.json")
    parser.add_argument("--models", help="a regular expression the model names must match (default: all)")
    parser.add_argument(
        "--min-asr", type=float, default=0.7, help="skip backdoored models whose attack took less (not counted)"
    )
    parser.add_argument("--method", default=ScanSettings.method, help="usb (every family) or nc (Neural Cleanse)")
    parser.add_argument("--mask-cost", default=ScanSettings.mask_cost, help="Alg. 2's L1 weight: fixed or adaptive")
    parser.add_argument("--families", default=ScanSettings.families, help="all, universal+warp or universal")
    parser.add_argument("--pair-restarts", type=int, default=ScanSettings.pair_restarts, help="pairs: inversions")
    parser.add_argument(
        "--pair-recheck", type=int, default=ScanSettings.pair_recheck, help="pairs: sources inverted again"
    )
    parser.add_argument("--seed", type=int, default=ScanSettings.seed, help="the scan's seed (its samples and draws)")
    parser.add_argument(
        "--redecide",
        help="a stored NAME.json: decide its pairs again from the stored tables (no scan), write NAME-redecided.json",
    )
    parser.add_argument(
        "--shared", action="store_true", help="with --redecide: run the shared-patch test on each model too"
    )
    args = parser.parse_args()
    if args.redecide:
        stored = Path(args.redecide)
        zoo = json.loads((stored.parent / "zoo.json").read_text())
        torch.set_num_threads(args.threads)
        where = stored.parent if args.shared else None
        rows = {name: redecide(zoo[name], row, where) for name, row in json.loads(stored.read_text()).items()}
        stored.with_name(stored.stem + "-redecided.json").write_text(json.dumps(rows, indent=1))
        for name, row in rows.items():
            print(f"{name}: {row['verdict']} exact={row['exact']} {row['lost']}")
        table(rows)
        return
    shard, shards = (int(v) for v in args.shard.split("/"))
    torch.set_num_threads(args.threads)
    zoo_dir = Path(args.zoo)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    out_path = zoo_dir / f"{args.name}-{shard}of{shards}.json"
    wanted = re.compile(args.models or ".")
    rows = json.loads(out_path.read_text()) if out_path.exists() else {}
    took = [(name, e) for name, e in zoo.items() if e["asr"] is None or e["asr"] >= args.min_asr]
    chosen = [(name, entry) for name, entry in took if wanted.search(name)]
    for n, (name, entry) in enumerate(chosen):
        if name in rows or n % shards != shard or args.table:
            continue
        t = time.perf_counter()
        settings = ScanSettings(
            method=args.method,
            mask_cost=args.mask_cost,
            families=args.families,
            pair_restarts=args.pair_restarts,
            pair_recheck=args.pair_recheck,
            seed=args.seed,
        )
        scan = scan_model(zoo_dir / entry["path"], clean_data(zoo_dir), settings=settings, device="cpu")
        ok, lost = exact(entry, scan)
        if settings == ScanSettings():  # a default scan's triggers, for `filtering_families.py --method erase`
            keep_triggers(zoo_dir, name, scan.found_triggers())
        usb_alone = [c.cls for c in scan.classes if c.flagged]
        rows[name] = {
            "family": entry["family"],
            "aside": entry["aside"],
            "asr": entry["asr"],
            "accuracy": entry["accuracy"],
            "verdict": scan.verdict,
            "targets": scan.target_classes,
            "exact": ok,
            "lost": lost,
            "usb_alone_flagged": usb_alone,
            "margin": scan.margin,
            "findings": [f.to_dict() for f in (scan.families.findings if scan.families else [])],
            # every measured pair and warp: later decision rules are applied to stored scans, not new ones
            "families": scan.families.to_dict() if scan.families else None,
            "timings": scan.timings,
            "seconds": round(time.perf_counter() - t, 1),
        }
        out_path.write_text(json.dumps(rows, indent=1))
        print(f"{name}: {scan.verdict} exact={ok} usb_alone={usb_alone} {lost} ({rows[name]['seconds']} s)", flush=True)
    rows = {}
    for part_file in sorted(zoo_dir.glob(f"{args.name}-*of*.json")):
        rows.update(json.loads(part_file.read_text()))
    (zoo_dir / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    table(rows)


def table(rows: dict) -> None:
    """The per-family table of docs/results.md."""
    print("\n| family | part | models | exact (new scan) | flagged at all | USB alone flagged | clean verdicts |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for family in FAMILIES:
        for aside in (False, True):
            part = [r for r in rows.values() if r["family"] == family and r["aside"] == aside]
            if not part:
                continue
            print(
                f"| {family} | {'aside' if aside else 'main'} | {len(part)} | {sum(r['exact'] for r in part)} | "
                f"{sum(r['verdict'] == 'backdoor' for r in part)} | {sum(bool(r['usb_alone_flagged']) for r in part)} "
                f"| {sum(r['verdict'] == 'clean' for r in part)} |"
            )


if __name__ == "__main__":
    main()
