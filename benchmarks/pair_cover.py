"""A study, not kept in the method: does a pair's patch still work when it must leave the other classes alone?

    .venv/bin/python benchmarks/pair_cover.py --out docs/results/families_cifar10_cover_study.json \\
        bench-out/c24/source_specific_25:2,0:3,0 bench-out/c22c/clean_09:3,5 ...

A source-specific backdoor is trained with cover samples (the trigger on other classes keeps their labels), so a
trigger exists that moves its source and is inert elsewhere; a natural pair's patch (the feature that makes a cat a
dog) may move every class toward its target. Each named pair is inverted as the pairs stage inverts it (its 12
source samples, 100 steps), then inverted on from there with a cover term: the mean of -log(1 - p_target) over 60
samples of the other classes, weight `--weight`. Printed and stored per pair: success, cross-entropy, L1, spill
(on every other-class sample) and compactness, before and after. Each MODEL:PAIRS argument is a zoo model file
without `.pt2` (its zoo's clean.npz is the data), then colon-separated pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backdoorscan import ScanSettings
from backdoorscan.report.writer import write_text_atomic
from backdoorscan.usb.pairs import _Run, blend, invert_pairs, pair_compactness, pair_success

from common import zoo_model
from pair_tables import planted

OTHERS = 60  # other-class samples in each pair's cover batch


def cover_on(run: _Run, x: torch.Tensor, y: torch.Tensor, steps: int, cost: float, weight: float) -> None:
    """`steps` more Adam steps of `run` with the cover term added to each pair's objective."""
    others = torch.stack([x[torch.nonzero((y != s) & (y != t)).flatten()[:OTHERS]] for s, t in run.pairs])
    n_pairs = len(run.pairs)
    targets = torch.tensor([t for _, t in run.pairs], device=x.device).view(n_pairs, 1, 1)
    for _ in range(steps):
        mask = (torch.tanh(run.mask_p) + 1) / 2
        pattern = (torch.tanh(run.pattern_p) + 1) / 2
        logits = run.model(blend(run.xb, mask[:, None], pattern[:, None]).flatten(0, 1))
        ce = F.cross_entropy(logits, run.targets, reduction="none").view(n_pairs, -1).mean(1)
        other = run.model(blend(others, mask[:, None], pattern[:, None]).flatten(0, 1)).view(*others.shape[:2], -1)
        p_target = other.softmax(-1).gather(2, targets.expand(-1, others.shape[1], 1)).squeeze(2)
        cover = -torch.log1p(-p_target.clamp(max=1 - 1e-6)).mean(1)
        objective = ce + cost * mask.flatten(1).sum(1) + weight * cover
        run.opt.zero_grad(set_to_none=True)
        objective.sum().backward()
        run.opt.step()


@torch.no_grad()
def spill(model, x: torch.Tensor, y: torch.Tensor, pairs, mask: torch.Tensor, pattern: torch.Tensor) -> list[float]:
    """Per pair, the share of every other-class sample its patch sends to the target."""
    out = []
    for i, (s, t) in enumerate(pairs):
        other = x[(y != s) & (y != t)]
        out.append(float((model(blend(other, mask[i], pattern[i])).argmax(1) == t).float().mean()))
    return out


def figures(model, x, y, pairs, mask, pattern) -> list[dict]:
    """Success, cross-entropy, L1, spill and compactness of each pair's patch."""
    asr, ce = pair_success(model, x, y, pairs, mask, pattern)
    l1 = mask.flatten(1).sum(1).cpu().numpy()
    rows = zip(asr, ce, l1, spill(model, x, y, pairs, mask, pattern), pair_compactness(mask), strict=True)
    keys = ("asr", "cross_entropy", "l1", "spill", "compact")
    return [{k: round(float(v), 4) for k, v in zip(keys, row, strict=True)} for row in rows]


def study(path: Path, pairs: list[tuple[int, int]], weight: float, settings: ScanSettings) -> list[dict]:
    """Both inversions of `pairs` on one zoo model."""
    model, x, y, _ = zoo_model(path, settings)
    common = {"lr": settings.lr, "per_source": settings.pair_samples}
    found = invert_pairs(
        model, x, y, pairs, steps=settings.pair_steps, cost=settings.pair_cost, group=len(pairs), batch=256, **common
    )
    run = _Run.resume(model, x, y, pairs, found.mask, found.pattern, **common)
    cover_on(run, x, y, settings.pair_steps, settings.pair_cost, weight)
    before = figures(model, x, y, pairs, found.mask, found.pattern)
    after = figures(model, x, y, pairs, *run.unit)
    record = json.loads((path.parent / "zoo.json").read_text()).get(path.name, {})
    want = planted(record.get("attack"))
    return [
        {"model": path.name, "source": s, "target": t, "planted": (s, t) in want, "stage": b, "cover": a}
        for (s, t), b, a in zip(pairs, before, after, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="ZOO/MODEL:S,T[:S,T...]")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows: list[dict] = json.loads(out.read_text())["rows"] if out.exists() else []
    for spec in args.models:
        name, *pairs = spec.split(":")
        got = study(Path(name), [tuple(map(int, p.split(","))) for p in pairs], args.weight, ScanSettings())
        for r in got:
            b, c, tag = r["stage"], r["cover"], " (planted)" if r["planted"] else ""
            print(
                f"{r['model']} {r['source']}->{r['target']}{tag}: stage asr {b['asr']:.2f} ce {b['cross_entropy']:.3f} "
                f"l1 {b['l1']:.1f} spill {b['spill']:.2f} | cover asr {c['asr']:.2f} ce {c['cross_entropy']:.3f} "
                f"l1 {c['l1']:.1f} spill {c['spill']:.2f}",
                flush=True,
            )
        rows += got
        doc = {"about": __doc__.splitlines()[0], "weight": args.weight, "rows": rows}
        write_text_atomic(out, json.dumps(doc, indent=1) + "\n")
    print(np.mean([r["cover"]["asr"] >= 0.9 for r in rows]))


if __name__ == "__main__":
    main()
