"""The compactness study behind 0.15.0's compact route (`usb.pairs.pair_compactness`): for every model of some
zoos, the pairs stage as the scan runs it, then the compactness of the ten pairs of highest index and of the
planted pair, beside their index, cross-entropy, spill and reliance.

    .venv/bin/python benchmarks/pair_compactness.py --zoos bench-out/h16,bench-out/h16c --out study.json

A varied zoo (a `zoo.json` with `models`) contributes its clean models only. Resumable: models in OUT are kept.
`--summary OUT` prints the planted and natural pairs' compactness.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from backdoorscan import ScanSettings
from backdoorscan.report.writer import write_text_atomic
from backdoorscan.usb.pairs import pair_compactness

from common import BUNDLED_TEST, clean_samples
from pair_tables import pairs_stage

NEAREST = 10  # pairs of highest index kept per model


def study(zoo: Path, settings: ScanSettings, done: dict) -> dict:
    """The kept pairs of every model of one zoo not in `done`: name -> {family, planted, pairs}."""
    meta = json.loads((zoo / "zoo.json").read_text())
    varied = "models" in meta
    records = meta["models"] if varied else list(meta.values())
    data = clean_samples(zoo, meta) if varied else str(BUNDLED_TEST)
    out = {}
    for m in records:
        if m["name"] in done or (varied and m.get("group") != "clean"):
            continue
        t = time.perf_counter()
        result = pairs_stage(zoo, m, data, settings, torch.device("cpu"))
        found, index = result.pairs, result.pair_index
        assert found is not None and index is not None
        planted = [[m["source"], m["target"]]] if m.get("family") == "source_specific" else []
        keep = [int(i) for i in np.argsort(-np.nan_to_num(index, neginf=-1e9))[:NEAREST]]
        keep += [found.pairs.index(tuple(p)) for p in planted if found.pairs.index(tuple(p)) not in keep]
        compact = pair_compactness(found.mask)
        rows = {(r["source"], r["target"]): r for r in result.to_dict()["pairs"]["pairs"]}
        out[m["name"]] = {
            "family": m.get("family", m.get("group")),
            "planted": planted,
            "pairs": [{**rows[found.pairs[i]], "compact": round(float(compact[i]), 4)} for i in keep],
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(m["name"], out[m["name"]]["seconds"], "s", flush=True)
    return out


def summary(tables: dict) -> None:
    """The planted pairs' compactness and the natural pairs' highest, over every stored model."""
    planted, natural = [], []
    for entry in tables["models"].values():
        mine = {tuple(p) for p in entry["planted"]}
        for p in entry["pairs"]:
            if (p["source"], p["target"]) in mine:
                planted.append(p["compact"])
            elif entry["family"] not in ("all_to_all", "wanet"):
                natural.append(p["compact"])
    print(f"{len(tables['models'])} models; planted pairs {len(planted)}: {np.round(sorted(planted), 2).tolist()}")
    print(f"natural pairs {len(natural)}: highest {np.round(sorted(natural)[-5:], 2).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", help="comma-separated zoo folders")
    parser.add_argument("--out", required=True)
    parser.add_argument("--summary", action="store_true", help="only print the summary of OUT")
    args = parser.parse_args()
    out = Path(args.out)
    tables = json.loads(out.read_text()) if out.exists() else {"models": {}}
    if not args.summary:
        torch.set_num_threads(1)
        for zoo in args.zoos.split(","):
            tables["models"].update(study(Path(zoo), ScanSettings(), tables["models"]))
            write_text_atomic(out, json.dumps(tables, indent=1) + "\n")
    summary(tables)


if __name__ == "__main__":
    main()
