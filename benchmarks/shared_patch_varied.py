"""The all-to-all shared patch (version 0.8.0) on the varied zoos' stored scans: would it flag any of them?

    .venv/bin/python benchmarks/shared_patch_varied.py --zoo bench-out/zoo-varied-mnist [--threads 1]

Issue 25's no-loss check for a new stage: each model of a `benchmarks/detection.py` zoo whose stored
`detection-families*.json` rows hold a full pair table gets the shared patch inverted on it (the scan's samples,
predictions and settings) and decided against that table's pair sizes. Prints one line per model and the count
flagged; writes ZOO/shared-patch.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from detection_families import shared_patch

from backdoorlab.data import NUM_CLASSES
from backdoorscan import ModelSource
from backdoorscan.report.writer import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    meta = json.loads((zoo / "zoo.json").read_text())
    models = {m["name"]: m for m in meta["models"]}
    rows = {}
    for stored in sorted(zoo.glob("detection-families*.json")):
        for row in json.loads(stored.read_text())["rows"]:
            if row.get("method") == "usb" and len(row["families"].get("pairs", {}).get("pairs", [])) > 10:
                rows[row["name"]] = row  # the full table (docs/results keeps only the top ten)
    out = {}
    for name, row in sorted(rows.items()):
        model = models[name]
        classes = NUM_CLASSES.get(meta["dataset"]) if model.get("arch_ref") else None
        source = ModelSource(zoo / model["file"], arch=model.get("arch_ref"), num_classes=classes)
        out[name] = {
            "group": model["group"],
            **shared_patch(source, zoo / "clean.npz", row["families"]["pairs"]["pairs"]),
        }
        r = out[name]
        print(
            f"{name} {r['group']}: L1 {r['l1']:.1f} ratio {r['ratio']:.2f} moved {r['moved']:.2f} "
            f"mapped {len(r['mapping'])} flagged {r['flagged']}",
            flush=True,
        )
    write_text_atomic(zoo / "shared-patch.json", json.dumps(out, indent=1) + "\n")
    print(f"flagged by the shared patch: {sum(r['flagged'] for r in out.values())} of {len(out)}")


if __name__ == "__main__":
    main()
