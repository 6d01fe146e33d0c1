"""What the pairs' reliance test (0.12.0) decides on stored tables, with the size guard as it is and loosened.

    .venv/bin/python benchmarks/pair_reliance.py

A planted patch sits where the target's own samples carry nothing of their class; a natural pair's patch is the
edit that makes a source look like its target (an adversarially trained model's 9 -> 4 opens the loop), so
blanking its region with the source's look moves the target's own samples off it (`usb.pairs.measure_reliance`).
The committed study (`docs/results/families_reliance_study.json`) holds every pair's figures and reliance for the
tuning part's hard source-specific and near-flagging clean models, the varied MNIST zoo's clean models (one
inversion each, spill unmeasured: no constraint, which flags more, not fewer) and held-out batches 11 and 12
(0.11.0's pairs stage with the recheck, spill as measured). Each group is decided by the scan's own
`decide_pairs` under each size guard, without and with reliance.
"""

from __future__ import annotations

import json
from unittest import mock

import numpy as np

from backdoorscan import ScanSettings
from backdoorscan.usb import pair_rule
from backdoorscan.usb.pair_rule import decide_pairs

from common import ROOT

STUDY = ROOT / "docs/results/families_reliance_study.json"
RULES = [(0.35, False), (0.35, True), (0.4, False), (0.4, True), (0.45, True)]  # (size guard, reliance)


def decide(entry: dict, guard: float, reliance: bool) -> set[tuple[int, int]]:
    """The pairs the scan's rule flags on one stored table under `guard`, with or without reliance."""
    rows = entry["pairs"]
    pairs = [(r[0], r[1]) for r in rows]
    l1, asr, ce = (np.array([r[k] for r in rows], dtype=np.float64) for k in (2, 3, 4))
    spill = np.array([np.nan if r[5] is None else r[5] for r in rows])
    measured = np.array([r[6] for r in rows], dtype=np.float64) if reliance else None
    with mock.patch.object(pair_rule, "PAIR_MAX_RATIO", guard):
        decision = decide_pairs(
            pairs, l1, ce, asr, settings=ScanSettings(), universal_targets=[], spill=spill, reliance=measured
        )
    return {pairs[i] for i in decision.flagged}


def main() -> None:
    models = json.loads(STUDY.read_text())["models"]
    zoos = list(dict.fromkeys(m["zoo"] for m in models.values()))
    print("| size guard | reliance | " + " | ".join(zoos) + " |")
    print("|---:|---|" + "---|" * len(zoos))
    for guard, reliance in RULES:
        cells = []
        for zoo in zoos:
            group = [m for m in models.values() if m["zoo"] == zoo]
            planted = [m for m in group if m["planted"]]
            clean = [m for m in group if m["family"] == "clean"]
            named = sum(tuple(m["planted"]) in decide(m, guard, reliance) for m in planted)
            flagged = [n for n, m in models.items() if m in clean and decide(m, guard, reliance)]
            cell = f"clean {len(flagged)}/{len(clean)}" + (f" ({', '.join(flagged)})" if flagged else "")
            cells.append((f"ss {named}/{len(planted)}, " if planted else "") + cell)
        print(f"| {guard} | {'yes' if reliance else 'no'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
