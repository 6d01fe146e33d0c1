"""What a second inversion of only some sources' pairs would decide, from stored tables of two inversions per pair.

    .venv/bin/python benchmarks/pair_recheck.py

The pairs of one source are compared with each other first (a pair's size against its source's median), so a
second look can be spent on a few sources, each inverted whole, instead of on every pair (`--pair-restarts 2`).
This replays that on the committed tables of models inverted from two starting patterns
(`docs/results/families_restarts_study.json`: the tuning models, the varied MNIST zoo's clean models and held-out
batch 10; `families_heldout11_pairs.json` with `families_heldout11_pairs_restarts2.json` for batch 11, whose
second table is already the better of two per pair): the first table decided by the scan's own rule, the sources
nearest to flagging taken from the second where it is better (the restarts' rule), and the merged table decided
again. Spill stays as stored (unmeasured: no constraint), as it would be re-measured by the scan for the pairs it
names. Also prints where the planted pair's source ranks among the sources by that nearness over every stored
source-specific table (the tuning part, batches 2-11), which is what sizes the recheck.
"""

from __future__ import annotations

import json

import numpy as np

from backdoorscan import ScanSettings
from backdoorscan.usb.families import nearest_sources
from backdoorscan.usb.pairs import _best_restarts

from common import ROOT
from pair_tables import decide_table, planted

RESULTS = ROOT / "docs/results"
Row = dict
Table = dict[tuple[int, int], Row]
POLICIES: list[int | None] = [0, 1, 2, 3, None]  # sources rechecked; None: every source (--pair-restarts 2)


def _rows(listed: list[list]) -> Table:
    """The restarts study's rows ([source, target, l1, asr, cross_entropy, spill]) by pair."""
    return {(int(r[0]), int(r[1])): {"l1": r[2], "asr": r[3], "cross_entropy": r[4], "spill": r[5]} for r in listed}


def _table(stored: list[dict]) -> Table:
    """A report's pairs table by pair."""
    return {(p["source"], p["target"]): p for p in stored}


def models() -> dict[str, tuple[str, set[tuple[int, int]], Table, Table, bool]]:
    """Name -> (zoo, planted pairs, first table, second table, whether the second is already the better of two)."""
    out = {}
    study = json.loads((RESULTS / "families_restarts_study.json").read_text())["models"]
    batch10 = json.loads((RESULTS / "families_heldout10_detection.json").read_text())
    for name, entry in study.items():
        runs = entry["runs"]
        second = "restart1" if "restart1" in runs else "seed1" if "seed1" in runs else None
        if second is None:
            continue
        first = _rows(runs["seed0"]) if "seed0" in runs else _table(batch10[name]["families"]["pairs"]["pairs"])
        out[name] = (entry["zoo"], planted(entry["attack"]), first, _rows(runs[second]), False)
    single = json.loads((RESULTS / "families_heldout11_pairs.json").read_text())["models"]
    best = json.loads((RESULTS / "families_heldout11_pairs_restarts2.json").read_text())["models"]
    for name, entry in best.items():
        first, second = _table(single[name]["pairs"]["pairs"]), _table(entry["pairs"]["pairs"])
        out[name] = ("families held-out batch 11", planted(single[name]["attack"]), first, second, True)
    return out


def better(a: Row, b: Row, cost: float) -> Row:
    """The restarts' rule for one pair (`pairs._best_restarts`): the working row of the smaller objective, else the
    one that moves more."""
    asr = np.array([a["asr"], b["asr"]])
    objective = np.array([r["cross_entropy"] + cost * r["l1"] for r in (a, b)])
    return (a, b)[int(_best_restarts(asr, objective, 1)[0])]


def replay(entry: tuple, count: int | None, settings: ScanSettings) -> tuple[set[tuple[int, int]], float]:
    """The pairs flagged when the `count` nearest sources (None: all) take their second table, and the nearest
    distance of the merged table."""
    _, _, first, second, is_best = entry
    pairs, decision = decide_table(first, [], settings)
    chosen = {s for s, _ in pairs} if count is None else set(nearest_sources(pairs, decision.distance, count))
    merged = {
        p: (second[p] if is_best else better(first[p], second[p], settings.pair_cost))
        if p[0] in chosen and p in second
        else first[p]
        for p in pairs
    }
    pairs, decision = decide_table(merged, [], settings)
    return {pairs[i] for i in decision.flagged}, float(np.min(decision.distance))


def source_ranks() -> list[int]:
    """Over every stored source-specific table (the tuning part, batches 2-11; a model whose recipe is not in
    `families_zoo.json` is left out): the planted source's rank among the sources by nearness to flagging."""
    from pair_ranks import stored_tables  # the tuning part and batches 2-8

    tables = {name: table for name, (_, table, _) in stored_tables().items()}
    for batch in (9, 10):
        for name, row in json.loads((RESULTS / f"families_heldout{batch}_detection.json").read_text()).items():
            if (row.get("families") or {}).get("pairs"):
                tables[name] = row["families"]["pairs"]["pairs"]
    for name, row in json.loads((RESULTS / "families_heldout11_pairs.json").read_text())["models"].items():
        tables[name] = row["pairs"]["pairs"]
    zoo = json.loads((RESULTS / "families_zoo.json").read_text())
    ranks = []
    for name, table in sorted(tables.items()):
        want = planted((zoo.get(name) or {}).get("attack"))
        if len(want) != 1:
            continue
        ((source, _),) = want
        pairs, decision = decide_table({(p["source"], p["target"]): p for p in table}, universal_targets=[])
        ranks.append(nearest_sources(pairs, decision.distance, len(pairs)).index(source) + 1)
    return ranks


def main() -> None:
    settings = ScanSettings()
    entries = models()
    print("| sources inverted twice | " + " | ".join(sorted({e[0] for e in entries.values()})) + " |")
    for count in POLICIES:
        cells = []
        for zoo in sorted({e[0] for e in entries.values()}):
            found = clean = n_found = n_clean = 0
            closest = np.inf
            for entry in [e for e in entries.values() if e[0] == zoo]:
                flagged, nearest = replay(entry, count, settings)
                if len(entry[1]) == 1:
                    n_found += 1
                    found += bool(entry[1] & flagged)
                elif not entry[1]:
                    n_clean += 1
                    clean += bool(flagged)
                    closest = min(closest, nearest)
            cells.append(f"ss {found}/{n_found}, clean {clean}/{n_clean} (closest {closest:+.2f})")
        print(f"| {'every source' if count is None else count} | " + " | ".join(cells) + " |")
    ranks = source_ranks()
    counts = {int(r): int(n) for r, n in zip(*np.unique(ranks, return_counts=True), strict=True)}
    print(f"the planted source's rank among the sources, over {len(ranks)} stored tables: {counts}")


if __name__ == "__main__":
    main()
