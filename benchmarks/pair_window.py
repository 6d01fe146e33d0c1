"""The window study: does a pair's patch still work when it is confined to one small window? A planted trigger is a
few pixels at one place, so its pair should be reached as well from inside a small square around its mask's
densest part; a natural pair's edit is a stroke along the source's shape, which a window cuts. For every model
of some zoos: the pairs stage as the scan runs it, then, for the planted pair, the pairs held back by the size
guard alone and the five pairs of highest index, an inversion confined to a window (sides in `--sides`, placed on
the stage's mask's densest part), started from the stage's patch, with the stage's samples, steps and cost.

    .venv/bin/python benchmarks/pair_window.py --zoos bench-out/h20,bench-out/h20c --out study.json

Resumable: models in OUT are kept. `--summary OUT` prints the planted and natural pairs' figures.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import backdoorscan.usb.families as fam
from backdoorscan import ScanSettings
from backdoorscan.core.seeding import seeded
from backdoorscan.loading import ModelSource, prepare
from backdoorscan.report.writer import write_text_atomic
from backdoorscan.usb.families import FamilyScan, scan_pairs
from backdoorscan.usb.pairs import _source_batches, blend, pair_compactness, pair_success
from backdoorscan.usb.pipeline import class_group

from common import BUNDLED_TEST
from pair_tables import decide_table

TOP = 5  # pairs of highest index studied per model, beside the planted and the guard-held ones


def window_of(mask: torch.Tensor, side: int) -> torch.Tensor:
    """(P, 1, H, W) ones on each mask's densest `side` x `side` square, zeros elsewhere."""
    p, _, h, w = mask.shape
    pooled = F.avg_pool2d(mask.float(), side, stride=1)  # (P, 1, H - side + 1, W - side + 1)
    at = pooled.flatten(1).argmax(1)
    cols = pooled.shape[-1]
    out = torch.zeros_like(mask)
    for i, a in enumerate(at.tolist()):
        r, c = divmod(a, cols)
        out[i, :, r : r + side, c : c + side] = 1
    return out


def invert_in_window(
    model, x, y, pairs, mask, pattern, window, *, steps: int, lr: float, per_source: int, cost: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on each pair's mask (inside its window only) and pattern, from the stage's patch."""
    rows = _source_batches(y, pairs, per_source)
    xb = x[rows]
    eps = 1e-4
    mask_p = torch.atanh((mask * window).clamp(eps, 1 - eps) * 2 - 1).detach().requires_grad_(True)
    pattern_p = torch.atanh(pattern.clamp(eps, 1 - eps) * 2 - 1).detach().requires_grad_(True)
    opt = torch.optim.Adam([mask_p, pattern_p], lr=lr, betas=(0.5, 0.9))
    targets = torch.tensor([t for _, t in pairs]).repeat_interleave(xb.shape[1])
    for _ in range(steps):
        m = window * (torch.tanh(mask_p) + 1) / 2
        pat = (torch.tanh(pattern_p) + 1) / 2
        logits = model(blend(xb, m[:, None], pat[:, None]).flatten(0, 1))
        ce = F.cross_entropy(logits, targets, reduction="none").view(len(pairs), -1).mean(1)
        objective = ce + cost * m.flatten(1).sum(1)
        opt.zero_grad(set_to_none=True)
        objective.sum().backward()
        opt.step()
    with torch.no_grad():
        return window * (torch.tanh(mask_p) + 1) / 2, (torch.tanh(pattern_p) + 1) / 2


def guard_held(rows: dict, settings: ScanSettings) -> set[tuple[int, int]]:
    """Pairs that would flag with the size guard at 0.65 and no compactness asked: the guard's own candidates."""
    saved = fam.PAIR_MAX_RATIO
    fam.PAIR_MAX_RATIO = fam.PAIR_COMPACT_MAX_RATIO
    try:
        loose_rows = {p: {k: v for k, v in r.items() if k != "compact"} for p, r in rows.items()}
        pairs, loose = decide_table(loose_rows, [], settings)
    finally:
        fam.PAIR_MAX_RATIO = saved
    return {pairs[i] for i in loose.flagged}


def study(zoo: Path, settings: ScanSettings, sides: list[int], done: dict, only: str = "") -> dict:
    """The studied pairs of every model of one zoo not in `done`: name -> {family, planted, pairs}."""
    meta = json.loads((zoo / "zoo.json").read_text())
    out = {}
    for m in meta.values():
        if m["name"] in done or m["family"] == "wanet" or not re.search(only, m["name"]):
            continue
        t = time.perf_counter()
        with seeded(settings.seed):
            source = ModelSource(zoo / m["path"])
            ready = prepare(source, str(BUNDLED_TEST), samples=settings.samples, seed=settings.seed)
            assert ready.samples is not None and ready.predictions is not None
            x, y, k = ready.samples.x, ready.predictions, ready.num_classes
            group, _ = class_group(ready.model, x, k, settings, torch.device("cpu"), None)
            result = FamilyScan()
            scan_pairs(
                ready.model, x, y, k, settings=settings, universal_targets=[], group=group, progress=None, result=result
            )
            found = result.pairs
            assert found is not None
            rows = {(r["source"], r["target"]): r for r in result.to_dict()["pairs"]["pairs"]}
            pairs, decision = decide_table(rows, [], settings)
            flagged = {pairs[i] for i in decision.flagged}
            planted = [(m["source"], m["target"])] if m["family"] == "source_specific" else []
            held = guard_held(rows, settings)
            order = np.argsort(-np.nan_to_num(found_index := result.pair_index, neginf=-1e9))  # type: ignore[arg-type]
            chosen = list(dict.fromkeys(planted + sorted(held) + [found.pairs[i] for i in order[:TOP]]))
            at = [found.pairs.index(p) for p in chosen]
            entry_pairs = []
            figures = {}
            for side in sides:
                window = window_of(found.mask[at], side)
                mask, pattern = invert_in_window(
                    ready.model,
                    x,
                    y,
                    chosen,
                    found.mask[at],
                    found.pattern[at],
                    window,
                    steps=settings.pair_steps,
                    lr=settings.lr,
                    per_source=settings.pair_samples,
                    cost=settings.pair_cost,
                )
                asr, ce = pair_success(ready.model, x, y, chosen, mask, pattern)
                figures[side] = (asr, ce, mask.flatten(1).sum(1).numpy())
            compact = pair_compactness(found.mask[at])
            for j, p in enumerate(chosen):
                i = found.pairs.index(p)
                entry_pairs.append(
                    {
                        **rows[p],
                        "compact": round(float(compact[j]), 4),
                        "flagged": p in flagged,
                        "guard_held": p in held,
                        "distance": round(float(decision.distance[pairs.index(p)]), 4),
                        "index_rank": int(np.flatnonzero(order == i)[0]),
                        "window": {
                            str(side): {
                                "asr": round(float(a[j]), 4),
                                "ce": round(float(c[j]), 4),
                                "l1": round(float(size[j]), 3),
                            }
                            for side, (a, c, size) in figures.items()
                        },
                    }
                )
        out[m["name"]] = {
            "family": m["family"],
            "planted": [list(p) for p in planted],
            "pairs": entry_pairs,
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(m["name"], out[m["name"]]["seconds"], "s", flush=True)
        del found_index
    return out


def summary(tables: dict, sides: list[int]) -> None:
    """Per kind of pair (planted, guard-held natural, other natural): each window side's success and L1 ratio."""
    for entry_name, entry in sorted(tables["models"].items()):
        mine = {tuple(p) for p in entry["planted"]}
        for p in entry["pairs"]:
            pair = (p["source"], p["target"])
            kind = "PLANT" if pair in mine else ("held " if p["guard_held"] else "other")
            if kind == "other" and entry["family"] == "all_to_all":
                continue
            ws = "  ".join(
                f"w{s}: asr {p['window'][str(s)]['asr']:.2f} ce {p['window'][str(s)]['ce']:.3f} "
                f"l1x {p['window'][str(s)]['l1'] / max(p['l1'], 1e-9):.2f}"
                for s in sides
            )
            flag = "F" if p["flagged"] else " "
            print(
                f"{kind} {entry_name:20s} {pair} idx {p['index'] or 0:5.2f} d {p['distance']:5.2f} "
                f"cmp {p['compact']:.2f} l1 {p['l1']:5.1f} ce {p['cross_entropy']:.3f} {flag} {ws}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", help="comma-separated families zoo folders")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sides", default="5,7")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="", help="only the models whose name matches this pattern")
    parser.add_argument("--summary", action="store_true", help="only print the summary of OUT")
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    out = Path(args.out)
    tables = json.loads(out.read_text()) if out.exists() else {"models": {}}
    if args.summary:
        summary(tables, sides)
        return
    torch.set_num_threads(args.threads)
    settings = ScanSettings()
    for zoo in args.zoos.split(","):
        tables["models"].update(study(Path(zoo), settings, sides, tables["models"], args.models))
        write_text_atomic(out, json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
