"""All-to-all backdoors as one patch: a small patch that moves every class, each to a class of its own (y -> pi(y)).

An all-to-all trigger (Gu et al. 2019; Phan et al. 2022) is one patch shared by every source; only the target
depends on the source. Inverting it pair by pair fits the shared patch to 12 samples of one source at a time, and
on batch-norm models those inversions often stop short of it (families zoo: 9 of 18 mappings named that way). Here
the patch is inverted once, untargeted, on every measured source's samples together: it is pushed to move each
sample *away from its own label* (loss -log(1 - p_y)) with the pairs' L1 weight, so it needs no mapping in advance;
the mapping is read off afterwards, each source's most frequent new label.

| argument | meaning |
|---|---|
| `sources` | the classes measured (those with `per_source` clean samples) |
| `steps`, `lr`, `cost` | as the pairs stage's (`ScanSettings.pair_steps`, `lr`, `pair_cost`) |
| `per_source` | clean samples of each source (`ScanSettings.pair_samples`) |

Flagged when the patch (a) moves at least `SHARED_MOVED` of the samples, (b) sends at least half the sources (and
at least `MIN_SOURCES`) each to a target of its own, at least `SHARED_SHARE` of that source's samples, and (c) is
no larger than `SHARED_MAX_RATIO` times the median pair patch of the same model (a patch that moves one class to a
chosen target). A clean model's smallest such patch collapses onto one or two easy classes (MNIST's 8 and 2) and
is 1.3-4x the median pair; a universal (all-to-one) backdoor sends every source to one target (USB's to find).
Families zoo (168 models): all-to-all 0.21-0.66x the median pair with 9-10 distinct targets; every clean,
source-specific and WaNet model 1.34x or more with at most 4, or a patch that did not work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .decide import spread
from .pairs import blend

SHARED_MOVED = 0.8  # share of all measured samples the patch must move off their label
SHARED_SHARE = 0.6  # share of a source's samples that must go to its one target for the source to count as mapped
SHARED_MAX_RATIO = 1.0  # the patch's L1 against the median working pair patch's
MIN_SOURCES = 4  # mapped sources (distinct targets) a mapping needs at least, and half the measured sources
# below this moved share the inversion did not take hold (a confident CIFAR-10 model's patch can shrink to nothing
# before it moves anything): the scan says so, as all-to-all is then covered by the pairs one by one only
SHARED_TOOK = 0.5


@dataclass
class SharedPatch:
    """The reversed shared patch and what it does to each source."""

    mask: torch.Tensor  # (1, H, W) in [0, 1]
    pattern: torch.Tensor  # (C, H, W) in [0, 1]
    l1: float  # mask L1 in pixels
    moved: float  # share of the samples whose label the patch changes
    targets: dict[int, int]  # source -> its most frequent new label
    shares: dict[int, float]  # source -> share of its samples sent there


@dataclass
class SharedDecision:
    """What the shared-patch test decided (pure: benchmarks decide again from stored figures)."""

    mapped: list[tuple[int, int]]  # (source, target) pairs of the mapping: distinct targets, strongest share first
    needed: int  # mapped sources a mapping needs
    reference: float  # the median working pair patch's L1
    ratio: float  # the patch's L1 over the reference
    distance: float  # from flagging (negative: flagged), every criterion counted
    index: float  # the size criterion in anomaly-index units: log(reference / l1) / sigma
    threshold: float  # where the size criterion is met: log(1 / SHARED_MAX_RATIO) / sigma

    @property
    def flagged(self) -> bool:
        return self.distance < 0


def invert_shared(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sources: list[int],
    *,
    steps: int,
    lr: float,
    cost: float,
    per_source: int,
) -> SharedPatch:
    """One patch, pushed to move every measured source's first `per_source` samples off their labels."""
    rows = torch.cat([torch.nonzero(y == s).flatten()[:per_source] for s in sources])
    xb, yb = x[rows], y[rows]
    _, c, h, w = x.shape
    mask_p = torch.full((1, h, w), -2.0, device=x.device, requires_grad=True)  # mask ~0.02 at start, as for pairs
    gen = torch.Generator(device="cpu").manual_seed(0)
    pattern_p = (torch.rand(c, h, w, generator=gen) * 2 - 1).to(x.device).requires_grad_(True)
    opt = torch.optim.Adam([mask_p, pattern_p], lr=lr, betas=(0.5, 0.9))
    for _ in range(steps):
        mask, pattern = (torch.tanh(mask_p) + 1) / 2, (torch.tanh(pattern_p) + 1) / 2
        logits = model(blend(xb, mask, pattern))
        others = logits.scatter(1, yb[:, None], float("-inf"))  # log(1 - p_y), stable where p_y rounds to 1
        away = torch.logsumexp(others, 1) - torch.logsumexp(logits, 1)
        loss = -away.mean() + cost * mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        mask, pattern = (torch.tanh(mask_p) + 1) / 2, (torch.tanh(pattern_p) + 1) / 2
        pred = model(blend(xb, mask, pattern)).argmax(1)
    targets, shares = {}, {}
    for s in sources:
        moved = pred[(yb == s) & (pred != s)]
        if len(moved):
            counts = torch.bincount(moved)
            targets[s] = int(counts.argmax())
            shares[s] = float(counts.max()) / int((yb == s).sum())
    return SharedPatch(
        mask=mask.detach(),
        pattern=pattern.detach(),
        l1=float(mask.sum()),
        moved=float((pred != yb).float().mean()),
        targets=targets,
        shares=shares,
    )


def shared_test(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sources: list[int], pair_l1: np.ndarray, *, settings
) -> tuple[SharedPatch, SharedDecision]:
    """Invert the shared patch with the pairs stage's settings (`ScanSettings`) and decide it against `pair_l1`."""
    patch = invert_shared(
        model,
        x,
        y,
        sources,
        steps=settings.pair_steps,
        lr=settings.lr,
        cost=settings.pair_cost,
        per_source=settings.pair_samples,
    )
    verdict = decide_shared(patch.l1, patch.moved, patch.targets, patch.shares, sources=len(sources), pair_l1=pair_l1)
    return patch, verdict


def decide_shared(
    l1: float,
    moved: float,
    targets: dict[int, int],
    shares: dict[int, float],
    *,
    sources: int,
    pair_l1: np.ndarray,
) -> SharedDecision:
    """Flag the patch as an all-to-all trigger (see the module's docstring); `pair_l1` are the working pair
    patches' L1s of the same scan (the size reference) and `sources` how many sources were measured.

    The distance is the largest of three, so that the margin counts every criterion: the size criterion in
    anomaly-index units (log size over the spread of the pairs' log sizes, as the pairs' own guard), and, as
    conventions in [-1, 1] like spill's, the mapped sources' and the moved share's room to their limits."""
    mapped: list[tuple[int, int]] = []
    used: set[int] = set()
    for s in sorted(shares, key=lambda s: -shares[s]):
        if shares[s] >= SHARED_SHARE and targets[s] not in used:
            used.add(targets[s])
            mapped.append((s, targets[s]))
    needed = max(MIN_SOURCES, -(-sources // 2))
    pair_l1 = np.asarray(pair_l1, dtype=np.float64)
    reference = float(np.median(pair_l1)) if pair_l1.size else float("nan")
    if not np.isfinite(reference) or pair_l1.size < 4:
        return SharedDecision(mapped, needed, reference, float("nan"), float("inf"), float("nan"), float("nan"))
    sigma = spread(pair_l1)
    ratio = max(l1, 1e-12) / reference
    index = float(-np.log(ratio) / sigma)
    threshold = float(-np.log(SHARED_MAX_RATIO) / sigma)
    distance = max(threshold - index, _room(len(mapped), needed, sources), _room(moved, SHARED_MOVED, 1.0))
    return SharedDecision(mapped, needed, reference, ratio, float(distance), index, threshold)


def _room(value: float, limit: float, top: float) -> float:
    """A "more is flagged" criterion as a distance in [-1, 1], as spill's: the share of the room above `limit` (up
    to `top`) that `value` uses (negative), or of the room below it that it lacks (positive)."""
    if value >= limit:
        return -(value - limit) / max(top - limit, 1e-12)
    return (limit - value) / max(limit, 1e-12)
