"""Where a pair's target stands among its source's clean logits (K-Arm's pre-screening observation), for the planted
pairs and for every pair a stored families table flags, under the scan's size guard and a relaxed one.

    .venv/bin/python benchmarks/pair_ranks.py --out docs/results/families_pair_ranks.json

Reads the stored held-out tables (`docs/results/families_heldout{2..8}_detection.json` where present) and the
tuning part's (`families_pairs.json`), loads each model of the families zoo once, and ranks each pair's target among
the other classes by its mean logit over the source's clean test digits (1: the source's runner-up class). It
asks two questions of the decision, without changing it: would the runner-up rank tell planted pairs from the
natural pairs a looser size guard lets through, and are the planted pairs what a K-Arm-style shortlist keeps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import backdoorscan.usb.pair_rule as pair_rule
from backdoorscan import ModelSource
from backdoorscan.loading import prepare

from common import BUNDLED_TEST, ROOT
from pair_tables import decide_table, planted

RESULTS = ROOT / "docs/results"


def stored_tables() -> dict[str, tuple[str, list[dict], list[int]]]:
    """Model name -> (batch, its stored pair table, the universal stage's flagged classes)."""
    tables: dict[str, tuple[str, list[dict], list[int]]] = {}
    for name, entry in json.loads((RESULTS / "families_pairs.json").read_text())["models"].items():
        tables[name] = ("tuning", entry["pairs"]["pairs"], [])
    for batch in range(2, 9):
        path = RESULTS / f"families_heldout{batch}_detection.json"
        if not path.exists():
            continue
        for name, row in json.loads(path.read_text()).items():
            if (row.get("families") or {}).get("pairs"):
                tables[name] = (f"heldout{batch}", row["families"]["pairs"]["pairs"], row["usb_alone_flagged"])
    return tables


def flagged_under(guard: float, table: list[dict], universal: list[int]) -> set[tuple[int, int]]:
    """The pairs the scan's own decision flags with the size guard set to `guard` (restored after)."""
    with mock.patch.object(pair_rule, "PAIR_MAX_RATIO", guard):
        pairs, decision = decide_table({(p["source"], p["target"]): p for p in table}, universal_targets=universal)
    return {pairs[i] for i in decision.flagged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="bench-out/zoo-families")
    parser.add_argument("--relaxed", type=float, default=0.5, help="the looser size guard to compare with")
    parser.add_argument("--out", default="docs/results/families_pair_ranks.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    zoo = json.loads((Path(args.zoo) / "zoo.json").read_text())
    rows = []
    for name, (batch, table, universal) in sorted(stored_tables().items()):
        entry = zoo[name]
        if entry["family"] == "wanet":
            continue
        want = planted(entry["attack"])
        now = flagged_under(pair_rule.PAIR_MAX_RATIO, table, universal)
        loose = flagged_under(args.relaxed, table, universal)
        pairs = sorted((want if entry["family"] == "source_specific" else set()) | loose | now)
        if not pairs:
            continue
        ready = prepare(
            ModelSource.of(Path(args.zoo) / entry["path"]), BUNDLED_TEST, samples=2000, seed=0, device="cpu"
        )
        with torch.no_grad():
            logits = ready.model(ready.samples.x)
        y = ready.samples.y
        for s, t in pairs:
            mean = logits[y == s].float().mean(0)
            others = sorted((c for c in range(len(mean)) if c != s), key=lambda c: -float(mean[c]))
            rows.append(
                {
                    "model": name,
                    "family": entry["family"],
                    "batch": batch,
                    "pair": [s, t],
                    "planted": (s, t) in want,
                    "rank": others.index(t) + 1,
                    "logit_gap": round(float(mean[t] - mean[s]), 3),
                    "flagged": (s, t) in now,
                    "flagged_relaxed": (s, t) in loose,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"relaxed_guard": args.relaxed, "rows": rows}, indent=1))
    summary(rows)


def summary(rows: list[dict]) -> None:
    """The rank of planted source-specific pairs, and of clean models' pairs flagged now or under the looser guard."""

    def ranks(pick) -> str:
        r = np.array([row["rank"] for row in rows if pick(row)])
        return f"{len(r)} pairs, rank 1: {int((r == 1).sum())}, ranks {sorted(set(r.tolist()))}" if len(r) else "none"

    print("planted source-specific:", ranks(lambda r: r["planted"] and r["family"] == "source_specific"))
    print("clean, flagged now:", ranks(lambda r: r["family"].startswith("clean") and r["flagged"]))
    print("clean, flagged relaxed:", ranks(lambda r: r["family"].startswith("clean") and r["flagged_relaxed"]))


if __name__ == "__main__":
    main()
