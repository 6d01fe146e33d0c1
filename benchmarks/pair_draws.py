"""A study: how much a pair's inversion depends on its starting pattern, planted pairs against natural ones.

    .venv/bin/python benchmarks/pair_draws.py --out docs/results/families_cifar10_pair_draws.json \\
        bench-out/c26/source_specific_36 bench-out/c26c/clean_20:6 ...

For one source of each model (the planted source of a source-specific model; for a clean model the source given
after a colon), every pair from that source is inverted as the pairs stage inverts it (12 samples, 100 steps, no
staging) from `--draws` starting patterns (the stage's own draw first). Per pair and draw: the objective
(cross-entropy + 0.01 x L1) where the patch works (moves 0.9 of the batch), else none. Printed: the planted pair's
objective per draw, and per model the ratio of each pair's best objective to its first draw's (how much more
draws shrink it), planted and natural apart. Each MODEL argument is a zoo model file without `.pt2`; its zoo's
clean.npz is the data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from backdoorscan import ScanSettings
from backdoorscan.report.writer import write_text_atomic
from backdoorscan.usb.pairs import PAIR_ASR, invert_pairs

from common import zoo_model


def study(path: Path, source: int | None, draws: int, settings: ScanSettings) -> dict:
    """Every pair of one source of one model, inverted from `draws` starting patterns."""
    record = json.loads((path.parent / "zoo.json").read_text())[path.name]
    planted = (record["source"], record["target"]) if record.get("family") == "source_specific" else None
    s = planted[0] if planted else source
    assert s is not None, f"{path.name}: a clean model needs its source after a colon"
    model, x, y, num_classes = zoo_model(path, settings)
    pairs = [(s, t) for t in range(num_classes) if t != s]
    objective = []
    for draw in range(draws):
        found = invert_pairs(
            model,
            x,
            y,
            pairs,
            steps=settings.pair_steps,
            lr=settings.lr,
            per_source=settings.pair_samples,
            cost=settings.pair_cost,
            group=len(pairs),
            batch=256,
            seed=settings.seed,
            first_restart=draw,
        )
        objective.append(np.where(found.asr >= PAIR_ASR, found.ce + settings.pair_cost * found.l1, np.nan))
    table = np.array(objective)  # (draws, pairs)
    return {
        "model": path.name,
        "source": s,
        "planted": list(planted) if planted else None,
        "pairs": [list(p) for p in pairs],
        "objective": [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in table],
    }


def summary(row: dict) -> str:
    """The planted pair's objective per draw, and best-of-draws over first draw for planted and natural pairs."""
    table = np.array([[np.nan if v is None else v for v in r] for r in row["objective"]])
    first, best = table[0], np.nanmin(np.where(np.isnan(table), np.inf, table), axis=0)
    both = np.isfinite(first) & np.isfinite(best)
    shrink = np.where(both, best / np.where(both, first, 1.0), np.nan)
    planted = row["pairs"].index(row["planted"]) if row["planted"] else None
    natural = [shrink[i] for i in range(len(shrink)) if i != planted and not np.isnan(shrink[i])]
    text = f"{row['model']} source {row['source']}: natural pairs best/first median {np.median(natural):.2f}"
    text += f" (min {min(natural):.2f})" if natural else ""
    if planted is not None:
        per_draw = ["-" if np.isnan(v) else f"{v:.3f}" for v in table[:, planted]]
        text += f" | planted {tuple(row['planted'])}: per draw {', '.join(per_draw)}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="ZOO/MODEL[:SOURCE]")
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows: list[dict] = json.loads(out.read_text())["rows"] if out.exists() else []
    for spec in args.models:
        name, _, source = spec.partition(":")
        rows.append(study(Path(name), int(source) if source else None, args.draws, ScanSettings()))
        print(summary(rows[-1]), flush=True)
        doc = {"about": __doc__.splitlines()[0], "draws": args.draws, "rows": rows}
        write_text_atomic(out, json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
