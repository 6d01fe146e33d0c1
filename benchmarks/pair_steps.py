"""What the pairs stage would decide had it stopped earlier: every pair's patch snapshotted along its inversion,
then each stopping policy (fewer steps for all pairs, or successive halving) decided by the scan's own rule.

    .venv/bin/python benchmarks/pair_steps.py --zoo bench-out/zoo-families --out bench-out/pair-steps \
        --models source_specific_06,clean_32

Pairs are independent rows of the inversion (Adam is elementwise and the loss a sum over pairs), so a pair stopped
at step s has exactly the patch of the snapshot at s: one inversion gives every policy, and no policy is rerun.
The inversion is the scan's (`usb.pairs`: the same samples, starting patterns, learning rate and L1 weight). Spill
and reliance are measured, as the scan does, for the pairs a report would name (reliance since 0.13.0's study).
Snapshots go to OUT/NAME.npz (resumable); the
decisions to OUT/policies.json, and a table is printed. The issue-25 cost study (docs/results.md) used this.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from backdoorscan import ModelSource, ScanSettings
from backdoorscan.loading import prepare
from backdoorscan.usb.families import PAIRS_REPORTED
from backdoorscan.usb.pair_rule import decide_pairs
from backdoorscan.usb.pairs import (
    PairTriggers,
    _going_on,
    _invert,
    _scale_stopped,
    candidate_pairs,
    initial_patterns,
    measure_reliance,
    measure_spill,
    pair_success,
)

from common import BUNDLED_TEST, clean_samples

# snapshots -> (per pair: the snapshot it stops at, cost share, and optionally per pair a factor its size is
# scaled by: a stopped pair's estimate of the size it would have reached)
Policy = Callable[[dict], tuple[np.ndarray, float] | tuple[np.ndarray, float, np.ndarray]]


def snapshots(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, at: list[int], per_source: int) -> dict:
    """Invert every candidate pair with the scan's own inversion (`usb.pairs._invert`) on `per_source` samples of
    its source, keeping each pair's patch at the steps in `at` and its training objective at every step; per
    snapshot, the attack success, cross-entropy and L1 the scan measures. The candidates are the scan's whatever
    `per_source` (sources with fewer samples have them repeated, as the scan does)."""
    st = ScanSettings()
    pairs = candidate_pairs(k, y, lambda: model(x), min_samples=st.pair_samples)
    objective, masks, patterns = np.zeros((max(at), len(pairs))), [], []

    def keep(done: int, value: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        objective[done - 1] = value.cpu().numpy()
        if done in at:
            masks.append(mask)
            patterns.append(pattern)

    _invert(
        model,
        x,
        y,
        pairs,
        initial_patterns(pairs, tuple(x.shape[1:]), st.seed),
        steps=max(at),
        lr=st.lr,
        per_source=per_source,
        cost=st.pair_cost,
        progress=lambda done, total: None,
        on_step=keep,
    )
    measured = [pair_success(model, x, y, pairs, m, p) for m, p in zip(masks, patterns, strict=True)]
    return {
        "pairs": np.array(pairs),
        "at": np.array(at),
        "objective": objective,
        "asr": np.array([a for a, _ in measured]),
        "ce": np.array([c for _, c in measured]),
        "l1": np.array([m.flatten(1).sum(1).numpy() for m in masks]),
        "mask": torch.stack(masks).numpy(),
        "pattern": torch.stack(patterns).numpy(),
        "per_source": np.array(per_source),
    }


def stop_all(steps: int) -> Policy:
    """Every pair stops at `steps`."""

    def policy(snap: dict) -> tuple[np.ndarray, float]:
        at = list(snap["at"])
        return np.full(len(snap["pairs"]), at.index(steps)), steps / max(at)

    return policy


def halving(first: int, share: float) -> Policy:
    """Every pair runs `first` steps; the `share` of pairs smallest against their source's median objective (the
    training objective at that step) run to the last snapshot, the others stop there."""

    def policy(snap: dict) -> tuple[np.ndarray, float]:
        pairs, at = snap["pairs"], list(snap["at"])
        value = np.log(snap["objective"][first - 1])
        for s in np.unique(pairs[:, 0]):
            rows = pairs[:, 0] == s
            value[rows] -= np.median(value[rows])
        stop = np.full(len(pairs), at.index(first))
        go_on = np.argsort(value)[: int(round(share * len(pairs)))]
        stop[go_on] = len(at) - 1
        return stop, (first * len(pairs) + (max(at) - first) * len(go_on)) / (max(at) * len(pairs))

    return policy


def halving_scaled(first: int, keep: int) -> Policy:
    """The scan's staged stage (`usb.pairs.invert_pairs`): every pair runs `first` steps; per source the `keep`
    pairs smallest against their source's median objective run to the last snapshot, and a stopped pair's L1 and
    cross-entropy are scaled by its source's finished pairs' median shrink, with the scan's own helpers."""

    def policy(snap: dict) -> tuple[np.ndarray, float, np.ndarray]:
        rows, at = [tuple(map(int, p)) for p in snap["pairs"]], list(snap["at"])
        i0, end = at.index(first), len(at) - 1
        on = _going_on(rows, len(rows), snap["objective"][first - 1], keep)  # the scan's own choice and scaling
        kept = np.flatnonzero(on)
        sizes = [(snap[key][i0], snap[key][end, kept]) for key in ("l1", "ce")]
        scaled = _scale_stopped(rows, len(rows), kept, *sizes)
        scale = np.stack(
            [
                np.where(on, 1.0, v / np.maximum(snap[key][i0], 1e-12))
                for v, key in zip(scaled, ("l1", "ce"), strict=True)
            ]
        )
        stop = np.where(on, end, i0)
        return stop, (first * len(rows) + (max(at) - first) * len(kept)) / (max(at) * len(rows)), scale

    return policy


def decide(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, snap: dict, stop: np.ndarray, scale: np.ndarray | None
) -> dict:
    """The scan's rule on the table the policy leaves, spill and reliance measured as the scan does
    (`measure_spill`, `measure_reliance`) for the pairs that would flag and the PAIRS_REPORTED of the highest index.
    Where the policy scales sizes (a staged stage), the stopped pairs are the scan's references: never flagged."""
    pairs, cols = [tuple(map(int, p)) for p in snap["pairs"]], np.arange(len(stop))
    l1, ce, asr = snap["l1"][stop, cols], snap["ce"][stop, cols], snap["asr"][stop, cols]
    stopped = None
    if scale is not None:
        l1, ce = l1 * scale[0], ce * scale[1]
        stopped = stop < len(snap["at"]) - 1
    found = PairTriggers(
        pairs=pairs,
        mask=torch.from_numpy(snap["mask"][stop, cols]),
        pattern=torch.from_numpy(snap["pattern"][stop, cols]),
        l1=l1,
        asr=asr,
        spill=np.full(len(pairs), np.nan),
        ce=ce,
        stopped=stopped,
    )
    decide_with = functools.partial(
        decide_pairs, pairs, l1, ce, asr, settings=ScanSettings(), universal_targets=[], stopped=stopped
    )
    first = decide_with()
    order = [int(i) for i in np.argsort(-first.index) if stopped is None or not stopped[i]]
    named = sorted(set(first.flagged) | {i for i in order[:PAIRS_REPORTED] if np.isfinite(first.index[i])})
    measure_spill(model, x, y, found, named)
    measure_reliance(model, x, y, found, named)
    final = decide_with(spill=found.spill, reliance=found.reliance)
    return {"flagged": [list(pairs[i]) for i in final.flagged], "distance": final.distance.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True)
    parser.add_argument("--out", required=True, help="a folder: snapshots per model and policies.json")
    parser.add_argument("--models", required=True, help="comma-separated model names")
    parser.add_argument("--at", default="30,50,60,70,80,90,100", help="snapshot steps; the last is the full run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--pair-samples",
        type=int,
        default=ScanSettings.pair_samples,
        help="samples of its source each pair is fitted on",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo, out, at = Path(args.zoo), Path(args.out), sorted(int(s) for s in args.at.split(","))
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((zoo / "zoo.json").read_text())
    records = meta["models"] if "models" in meta else [dict(v, name=k) for k, v in meta.items()]
    data = clean_samples(zoo, meta) if "models" in meta else str(BUNDLED_TEST)
    policies: dict[str, Policy] = {f"{s} steps": stop_all(s) for s in reversed(at)}
    if 30 in at:
        policies["halving: 30 steps, then 30 % go on"] = halving(30, 0.3)
        for first, keep in ((30, 3), (30, 4), (30, 2), (50, 3), (50, 2)):
            if first in at:
                policies[f"halving, stopped sizes scaled: {first} steps, then {keep} a source go on"] = halving_scaled(
                    first, keep
                )
    results: dict[str, dict] = {}
    for record in [r for r in records if r["name"] in args.models.split(",")]:
        name, t = record["name"], time.perf_counter()
        ready = prepare(
            ModelSource(zoo / (record.get("file") or record.get("path") or f"{name}.pt2"), arch=record.get("arch_ref")),
            data,
            samples=ScanSettings.samples,
            seed=ScanSettings.seed,
            device=torch.device("cpu"),
        )
        model, x, y = ready.model, ready.samples.x, ready.predictions
        path = out / f"{name}.npz"
        if path.exists() and list(np.load(path)["at"]) == at and int(np.load(path)["per_source"]) == args.pair_samples:
            snap = dict(np.load(path))
        else:
            snap = snapshots(model, x, y, ready.num_classes, at, args.pair_samples)
            np.savez(path, **snap)
        attack = record.get("attack") or {}
        want = [attack["source"], attack["target"]] if attack.get("kind") == "source_specific" else None
        results[name] = {"planted": want, "policies": {}}
        for label, policy in policies.items():
            stop, cost, *scaled = policy(snap)
            row = decide(model, x, y, snap, stop, scaled[0] if scaled else None)
            pairs = snap["pairs"].tolist()
            row["cost"] = round(cost, 3)
            row["planted_distance"] = row["distance"][pairs.index(want)] if want in pairs else None
            row["closest"] = min(row.pop("distance"))
            results[name]["policies"][label] = row
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    (out / "policies.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| policy | cost | planted pairs named | other models flagged | closest other |")
    print("|---|---:|---:|---:|---:|")
    for label in policies:
        rows = [(r["planted"], r["policies"][label]) for r in results.values()]
        named = sum(p in r["flagged"] for p, r in rows if p)
        others = [r for p, r in rows if not p]
        print(
            f"| {label} | {np.mean([r['cost'] for _, r in rows]):.2f} | {named}/{sum(1 for p, _ in rows if p)} | "
            f"{sum(bool(r['flagged']) for r in others)}/{len(others)} | "
            f"{min((r['closest'] for r in others), default=float('nan')):+.2f} |"
        )


if __name__ == "__main__":
    main()
