"""A candidate route for the pairs decision, replayed on every stored pair table against today's rule.

    .venv/bin/python benchmarks/pair_routes.py [FILES...]

The candidate (studied for 0.19.0 and again before CIFAR-10 batch 25 was scanned, 2026-12-03): a compact patch
(compactness or window test met) may flag by the inversion's *objective* (cross-entropy plus the weighted L1) under
the compact route's looser size guard (`PAIR_COMPACT_MAX_RATIO`), with the L1 route's certainty (cross-entropy at
most `PAIR_CE_MAX`) and every other criterion (spill with the compact allowance, reliance, staging) as today. On
CIFAR-10 a planted 3x3 or 4x4 patch is certain and compact but its L1 is not an outlier among a weak model's small
natural pairs, while its objective is. Prints each model whose flagged pairs or margin the candidate changes.
FILES: detection JSONs holding pair tables (default: every families and varied-zoo detection file in docs/results).
"""

from __future__ import annotations

import argparse
import glob
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from backdoorscan.usb import pair_rule as F

from pair_tables import decide_table

TODAY = F.decide_pairs


def objective_compact(pairs, l1, ce, asr, *, settings, universal_targets, **measured) -> F.PairDecision:
    """Today's decision, with the candidate route taken as one more way for a pair to flag."""
    today = TODAY(pairs, l1, ce, asr, settings=settings, universal_targets=universal_targets, **measured)
    compact, spill, reliance, stopped = (measured.get(k) for k in ("compact", "spill", "reliance", "stopped"))
    if compact is None:
        return today
    works = np.asarray(asr) >= F.PAIR_ASR
    objective = np.asarray(ce) + settings.pair_cost * np.asarray(l1)
    usable = works & np.isfinite(objective)
    index, ratio, sigma = F.index_pairs(pairs, objective, usable)
    size = F.flip_distance(
        np.where(usable, index, -1e9),
        ratio,
        asr,
        threshold=today.threshold,
        asr_min=F.PAIR_ASR,
        max_ratio=F.PAIR_COMPACT_MAX_RATIO,
        sigma=sigma,
    )
    shape = F.compact_distance(np.asarray(compact))
    if measured.get("window_asr") is not None and measured.get("window_ce") is not None:
        shape = np.minimum(shape, F.window_distance(measured["window_asr"], measured["window_ce"]))
    route = np.maximum(np.maximum(size, F.confidence_distance(ce)), shape)
    if spill is not None:
        route = np.maximum(route, F.spill_distance(np.asarray(spill, dtype=np.float64), shape))
    if reliance is not None:
        route = np.maximum(route, F.reliance_distance(np.asarray(reliance, dtype=np.float64)))
    if stopped is not None:
        route = np.where(stopped, np.inf, route)
    today.distance = np.minimum(today.distance, route)
    today.flagged = [i for i in range(len(pairs)) if today.distance[i] < 0 and pairs[i][1] not in universal_targets]
    today.margin = F.family_margin(today.distance, today.flagged)
    return today


def stored_tables(files: list[str]) -> Iterator[tuple[str, str, str, dict, list[int]]]:
    """(file, run, model, pair table, universal targets) for every model row holding a pair table."""

    def walk(node, path):
        if isinstance(node, dict):
            pairs = (node.get("families") or {}).get("pairs") if isinstance(node.get("families"), dict) else None
            if isinstance(pairs, dict) and isinstance(pairs.get("pairs"), list):
                yield path, node
                return
            for key, value in node.items():
                yield from walk(value, (*path, key))

    for file in files:
        for path, row in walk(json.loads(Path(file).read_text()), ()):
            families = row["families"]
            rows = {(p["source"], p["target"]): p for p in families["pairs"]["pairs"]}
            universal = sorted({f["target"] for f in families.get("findings", []) if f.get("family") == "universal"})
            yield file, str(path[0]) if len(path) > 1 else "", str(path[-1]), rows, universal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*")
    args = parser.parse_args()
    files = args.files or sorted(
        glob.glob("docs/results/families_*detection*.json") + glob.glob("docs/results/varied_*detection_families*.json")
    )
    count = 0
    for file, run, name, rows, universal in stored_tables(files):
        count += 1
        pairs, today = decide_table(rows, universal)
        _, candidate = decide_table(rows, universal, decide=objective_compact)
        before, after = [pairs[i] for i in today.flagged], [pairs[i] for i in candidate.flagged]
        if before != after or candidate.margin < today.margin - 1e-9:
            print(
                f"{Path(file).stem} {run} {name}: flagged {before} -> {after}, "
                f"margin {today.margin:.2f} -> {candidate.margin:.2f}"
            )
    print(f"{count} stored tables")


if __name__ == "__main__":
    main()
