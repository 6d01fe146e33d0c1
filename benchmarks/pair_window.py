"""The window study: does a pair's patch still work when it is confined to one small window? A planted trigger is a
few pixels at one place, so its pair should be reached as well from inside a small square around its mask's
densest part; a natural pair's edit is a stroke along the source's shape, which a window cuts. For every model
of some zoos: the pairs stage as the scan runs it, then, for the planted pair, the pairs held back by the size
guard alone and the five pairs of highest index, an inversion confined to a window (sides in `--sides`, placed on
the stage's mask's densest part), started from the stage's patch, with the stage's samples, steps and cost.

    .venv/bin/python benchmarks/pair_window.py --zoos bench-out/h20,bench-out/h20c --out study.json

Resumable: models in OUT are kept. `--summary OUT` prints the planted and natural pairs' figures.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

import backdoorscan.usb.pair_rule as fam
from backdoorscan import ScanSettings
from backdoorscan.core.seeding import seeded
from backdoorscan.loading import ModelSource, prepare
from backdoorscan.report.writer import write_text_atomic
from backdoorscan.usb.families import FamilyScan, scan_pairs
from backdoorscan.usb.pairs import PairTriggers, pair_compactness, window_test
from backdoorscan.usb.pipeline import class_group

from common import BUNDLED_TEST
from pair_tables import decide_table

TOP = 5  # pairs of highest index studied per model, beside the planted and the guard-held ones


def guard_held(rows: dict, settings: ScanSettings) -> set[tuple[int, int]]:
    """Pairs that would flag with the size guard at 0.65 and no compactness asked: the guard's own candidates."""
    saved = fam.PAIR_MAX_RATIO
    fam.PAIR_MAX_RATIO = fam.PAIR_COMPACT_MAX_RATIO
    try:
        loose_rows = {p: {k: v for k, v in r.items() if k != "compact"} for p, r in rows.items()}
        pairs, loose = decide_table(loose_rows, [], settings)
    finally:
        fam.PAIR_MAX_RATIO = saved
    return {pairs[i] for i in loose.flagged}


def study(zoo: Path, settings: ScanSettings, sides: list[int], done: dict, only: str = "") -> dict:
    """The studied pairs of every model of one zoo not in `done`: name -> {family, planted, pairs}."""
    meta = json.loads((zoo / "zoo.json").read_text())
    out = {}
    for m in meta.values():
        if m["name"] in done or m["family"] == "wanet" or not re.search(only, m["name"]):
            continue
        t = time.perf_counter()
        with seeded(settings.seed):
            source = ModelSource(zoo / m["path"])
            ready = prepare(source, str(BUNDLED_TEST), samples=settings.samples, seed=settings.seed)
            assert ready.samples is not None and ready.predictions is not None
            x, y, k = ready.samples.x, ready.predictions, ready.num_classes
            group, _ = class_group(ready.model, x, k, settings, torch.device("cpu"), None)
            result = FamilyScan()
            scan_pairs(
                ready.model, x, y, k, settings=settings, universal_targets=[], group=group, progress=None, result=result
            )
            found = result.pairs
            assert found is not None
            rows = {(r["source"], r["target"]): r for r in result.to_dict()["pairs"]["pairs"]}
            pairs, decision = decide_table(rows, [], settings)
            flagged = {pairs[i] for i in decision.flagged}
            planted = [(m["source"], m["target"])] if m["family"] == "source_specific" else []
            held = guard_held(rows, settings)
            assert result.pair_index is not None
            order = np.argsort(-np.nan_to_num(result.pair_index, neginf=-1e9))
            chosen = list(dict.fromkeys(planted + sorted(held) + [found.pairs[i] for i in order[:TOP]]))
            at = [found.pairs.index(p) for p in chosen]
            entry_pairs = []
            figures = {}
            for side in sides:
                confined = PairTriggers(
                    pairs=chosen,
                    mask=found.mask[at],
                    pattern=found.pattern[at],
                    l1=found.l1[at],
                    asr=found.asr[at],
                    spill=found.spill[at],
                    ce=found.ce[at],
                )
                window_test(
                    ready.model,
                    x,
                    y,
                    confined,
                    list(range(len(chosen))),
                    steps=settings.pair_steps,
                    lr=settings.lr,
                    per_source=settings.pair_samples,
                    cost=settings.pair_cost,
                    side=side,
                )
                figures[side] = (confined.window_asr, confined.window_ce, confined.window_l1)
            compact = pair_compactness(found.mask[at])
            for j, p in enumerate(chosen):
                i = found.pairs.index(p)
                entry_pairs.append(
                    {
                        **rows[p],
                        "compact": round(float(compact[j]), 4),
                        "flagged": p in flagged,
                        "guard_held": p in held,
                        "distance": round(float(decision.distance[pairs.index(p)]), 4),
                        "index_rank": int(np.flatnonzero(order == i)[0]),
                        "window": {
                            str(side): {
                                "asr": round(float(a[j]), 4),
                                "ce": round(float(c[j]), 4),
                                "l1": round(float(size[j]), 3),
                            }
                            for side, (a, c, size) in figures.items()
                        },
                    }
                )
        out[m["name"]] = {
            "family": m["family"],
            "planted": [list(p) for p in planted],
            "pairs": entry_pairs,
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(m["name"], out[m["name"]]["seconds"], "s", flush=True)
    return out


def summary(tables: dict, sides: list[int]) -> None:
    """Per kind of pair (planted, guard-held natural, other natural): each window side's success and L1 ratio."""
    for entry_name, entry in sorted(tables["models"].items()):
        mine = {tuple(p) for p in entry["planted"]}
        for p in entry["pairs"]:
            pair = (p["source"], p["target"])
            kind = "PLANT" if pair in mine else ("held " if p["guard_held"] else "other")
            if kind == "other" and entry["family"] == "all_to_all":
                continue
            ws = "  ".join(
                f"w{s}: asr {p['window'][str(s)]['asr']:.2f} ce {p['window'][str(s)]['ce']:.3f} "
                f"l1x {p['window'][str(s)]['l1'] / max(p['l1'], 1e-9):.2f}"
                for s in sides
            )
            flag = "F" if p["flagged"] else " "
            print(
                f"{kind} {entry_name:20s} {pair} idx {p['index'] or 0:5.2f} d {p['distance']:5.2f} "
                f"cmp {p['compact']:.2f} l1 {p['l1']:5.1f} ce {p['cross_entropy']:.3f} {flag} {ws}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", help="comma-separated families zoo folders")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sides", default="5,7")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="", help="only the models whose name matches this pattern")
    parser.add_argument("--summary", action="store_true", help="only print the summary of OUT")
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    out = Path(args.out)
    tables = json.loads(out.read_text()) if out.exists() else {"models": {}}
    if args.summary:
        summary(tables, sides)
        return
    torch.set_num_threads(args.threads)
    settings = ScanSettings()
    for zoo in args.zoos.split(","):
        tables["models"].update(study(Path(zoo), settings, sides, tables["models"], args.models))
        write_text_atomic(out, json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
