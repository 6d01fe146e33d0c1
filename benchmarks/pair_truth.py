"""What the planted trigger itself measures on the scan's own samples, beside what the pairs stage found for its pair.

    .venv/bin/python benchmarks/pair_truth.py --zoo bench-out/c26 --detection bench-out/c26/heldout26cifar.json

For each source-specific model of a families zoo: the scan's clean draw (`--samples`, `--seed` as a default scan),
the first 12 samples the model predicts as the planted source (the pairs stage's batch for that source), stamped
with the planted patch itself; its success and cross-entropy toward the target on them and on every sample of the
source, and its objective as the stage measures one (cross-entropy + 0.01 x the patch's pixels). Beside it, the
stage's own patch for the pair (L1, cross-entropy, objective) from the stored detection row. Where the planted
patch's objective is smaller than the found one, the **inversion** lost the pair (a smaller patch existed and the
search did not reach it); where the planted patch does not move `PAIR_ASR` of the batch, the **attack** is too weak
on these samples for any patch of its size to count as working.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from backdoorscan import ScanSettings
from backdoorscan.usb.pairs import PAIR_ASR

from common import zoo_model
from zoo_families import attack_of


@torch.no_grad()
def measure(zoo: Path, name: str, record: dict, row: dict | None, settings: ScanSettings) -> dict:
    """The planted patch's figures on the scan's samples, and the stage's for the same pair."""
    model, x, y, _ = zoo_model((zoo / record["path"]).with_suffix(""), settings)
    attack = attack_of(record)
    s, t = record["source"], record["target"]
    source = x[y == s]
    batch = source[: settings.pair_samples]

    def figures(images: torch.Tensor) -> tuple[float, float]:
        logits = model(attack.stamp(images))
        target = torch.full((len(images),), t)
        return float((logits.argmax(1) == t).float().mean()), float(F.cross_entropy(logits, target))

    asr_batch, ce_batch = figures(batch)
    asr_all, ce_all = figures(source)
    pixels = record["patch"]["size"] ** 2
    out = {
        "model": name,
        "pair": [s, t],
        "attack_asr": record["asr"],
        "patch_pixels": pixels,
        "planted_asr_batch": round(asr_batch, 4),
        "planted_ce_batch": round(ce_batch, 4),
        "planted_asr_source": round(asr_all, 4),
        "planted_objective": round(ce_batch + settings.pair_cost * pixels, 4),
        "exact": None if row is None else row["exact"],
    }
    pairs = {} if row is None or not row.get("families") else row["families"]["pairs"]
    for p in pairs.get("pairs", []):
        if (p["source"], p["target"]) == (s, t):
            out |= {
                "found_l1": p["l1"],
                "found_ce": p["cross_entropy"],
                "found_asr": p["asr"],
                "found_objective": round(p["cross_entropy"] + settings.pair_cost * p["l1"], 4),
            }
    if out["planted_asr_batch"] < PAIR_ASR:
        out["reading"] = "attack too weak on the batch"
    elif "found_objective" in out and out["planted_objective"] < out["found_objective"]:
        out["reading"] = "inversion: the planted patch is smaller"
    else:
        out["reading"] = "inversion reached the planted patch's size"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True)
    parser.add_argument("--detection", help="the zoo's detection JSON (benchmarks/detection_families.py)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the rows here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    records = json.loads((zoo / "zoo.json").read_text())
    rows = json.loads(Path(args.detection).read_text()) if args.detection else {}
    settings = ScanSettings()
    got = []
    for name, record in records.items():
        if record["family"] != "source_specific" or name not in rows:
            continue
        got.append(measure(zoo, name, record, rows.get(name), settings))
        print(json.dumps(got[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(got, indent=1) + "\n")


if __name__ == "__main__":
    main()
