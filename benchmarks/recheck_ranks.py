"""How many sources the pairs stage's recheck needs: where the planted pair's source stands among the sources
nearest to flagging, over every stored source-specific table of the families zoo (no model is loaded).

    .venv/bin/python benchmarks/recheck_ranks.py --out docs/results/families_recheck_ranks.json

Batches 2-11 were scanned before the recheck (0.11.0): their single-pass tables are decided by today's rule
(`pair_tables.decide_table`) and the sources ordered as the scan orders them (`families.nearest_sources`). Batches
12-16 were scanned with the recheck: the scan stored the sources it rechecked, nearest first
(`rechecked_sources`), so the planted source's place there is the one the scan saw. A recheck of N sources can
only help a planted pair whose source is among the first N.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from backdoorscan.report.writer import write_text_atomic
from backdoorscan.usb.families import nearest_sources

from common import ROOT
from pair_tables import decide_table

RESULTS = ROOT / "docs/results"
SINGLE_PASS = range(2, 12)  # batches scanned before the recheck existed
RECHECKED = {12: None, 13: None, 14: "v0_13_0", 15: "v0_13_0", 16: "recheck2"}  # batch -> the scan that counts


def _rows(batch: int, key: str | None) -> dict[str, dict]:
    """The stored scan rows of a held-out batch (model name -> row), empty where the file is absent."""
    path = RESULTS / f"families_heldout{batch}_detection.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    data = data[key] if key else data
    return {name: row for name, row in data.items() if isinstance(row, dict) and row.get("families")}


def _table(row: dict) -> list[dict] | None:
    """A scan row's pair table, None where the pairs stage did not run."""
    pairs = (row["families"] or {}).get("pairs") or {}
    return pairs.get("pairs") or None


def ranks() -> list[dict]:
    """Per source-specific model with a stored table: its batch, planted source, that source's place among the
    sources nearest to flagging (0: the nearest; None: not among them) and whether the scan named the pair."""
    zoo = json.loads((RESULTS / "families_zoo.json").read_text())
    out = []
    for batch in [*SINGLE_PASS, *RECHECKED]:
        for name, row in _rows(batch, RECHECKED.get(batch)).items():
            recipe, table = zoo.get(name), _table(row)
            if not recipe or recipe["family"] != "source_specific" or table is None:
                continue
            source = recipe["source"]
            if batch in RECHECKED:
                order = row["families"]["pairs"].get("rechecked_sources") or []
            else:
                rows = {(r["source"], r["target"]): r for r in table}
                pairs, decision = decide_table(rows, universal_targets=row.get("usb_alone_flagged") or [])
                order = nearest_sources(pairs, decision.distance, 10)
            place = order.index(source) if source in order else None
            out.append({"model": name, "batch": batch, "source": source, "place": place, "named": bool(row["exact"])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows and the counts here (JSON)")
    args = parser.parse_args()
    rows = ranks()
    counts = Counter("not listed" if r["place"] is None else str(r["place"]) for r in rows)
    for r in rows:
        if r["place"] != 0:
            print(f"{r['model']} (batch {r['batch']}): source {r['source']} at place {r['place']}, named {r['named']}")
    places = dict(sorted(counts.items()))
    print(f"{len(rows)} tables; the planted source's place among the nearest sources: {places}")
    if args.out:
        about = __doc__.splitlines()[0]
        write_text_atomic(args.out, json.dumps({"about": about, "counts": places, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
