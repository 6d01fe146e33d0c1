"""How much a verdict depends on the scan's seed: the same models scanned with several `--seed` values.

    .venv/bin/python benchmarks/detection_families.py --zoo bench-out/h24 --name seed1 --seed 1
    .venv/bin/python benchmarks/seed_agreement.py bench-out/h24/seed0.json bench-out/h24/seed1.json ...

The seed draws the scan's clean samples and every inversion's starting point, so two seeds are two users with
different clean data. Each argument is a `detection_families.py` result (NAME.json) of one seed over the same zoo;
printed: per model, the verdict and targets each seed gave, and per family how many models every seed called the
same way, and how many were exact under every seed, under some, under none.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def outcome(row: dict) -> str:
    """One scan's result in a word: exact, wrong target, clean, inconclusive (backdoored) or flagged (clean)."""
    clean_model = row["family"].startswith("clean")
    if clean_model:
        return "flagged" if row["verdict"] == "backdoor" else row["verdict"]
    if row["exact"]:
        return "exact"
    return "wrong target" if row["verdict"] == "backdoor" else row["verdict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="NAME.json of one seed each, the same zoo")
    args = parser.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in args.results]
    names = sorted(set.intersection(*(set(r) for r in runs)))
    per_family: dict[str, list[list[str]]] = {}
    for name in names:
        outcomes = [outcome(run[name]) for run in runs]
        targets = [run[name]["targets"] for run in runs]
        per_family.setdefault(runs[0][name]["family"], []).append(outcomes)
        print(f"{name}: {' | '.join(f'{o} {t}' for o, t in zip(outcomes, targets, strict=True))}")
    print(f"\n| family | models | same outcome under all {len(runs)} seeds | exact: all / some / none | clean: all |")
    print("|---|---:|---:|---:|---:|")
    for family, rows in sorted(per_family.items()):
        same = sum(len(set(r)) == 1 for r in rows)
        if family.startswith("clean"):
            every = sum(all(o == "clean" for o in r) for r in rows)
            print(f"| {family} | {len(rows)} | {same} | | {every} |")
            continue
        exact = [sum(o == "exact" for o in r) for r in rows]
        alls, none = sum(e == len(runs) for e in exact), sum(e == 0 for e in exact)
        print(f"| {family} | {len(rows)} | {same} | {alls} / {len(rows) - alls - none} / {none} | |")


if __name__ == "__main__":
    main()
