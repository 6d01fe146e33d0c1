"""The staged scan: a cheap stage 1 over every class picks which classes the full Alg. 1 + Alg. 2 refines.

Stage 1 is Alg. 1 itself on a reduced budget: one pass of the targeted UAPs over a few samples, in rounds of
successive halving (K-Arm, Shen et al. 2021, spends its optimisation on promising labels in the same spirit):
every class's UAP sees `ROUNDS[0]` samples, the tenth with the smallest UAPs (at least `KEEP_PER_SUSPECT` x the
suspects) continues to `ROUNDS[-1]`. A backdoor target needs a small UAP, so it ranks first.

Stage 2 refines the `suspects` classes with the smallest stage-1 UAPs, and `references` more classes at evenly
spaced ranks of the rest (a systematic sample with a seeded random start), so that the MAD has a population: the
refined classes form a stratified sample of all K, each suspect counting once and each reference for
(K - suspects) / references classes in the median and the MAD (`decide.weighted_median`). With K at most
suspects + references every class is refined and the scan is the paper's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..core.settings import ScanSettings
from ..perturb import norm_of, targeted_uaps
from .batching import in_class_groups

ROUNDS = (4, 32)  # samples each surviving class's stage-1 UAP has seen after each round
KEEP_SHARE = 10  # 1 / KEEP_SHARE of the classes go on to the next round ...
KEEP_PER_SUSPECT = 4  # ... and at least this many per suspect


@dataclass
class Staging:
    """Which classes stage 2 refines, why, and how much each counts in the median and MAD."""

    mode: str  # "all" (every class refined) or "staged"
    refined: list[int]  # class indices, in the order stage 2 reports them
    roles: list[str]  # per refined class: "all", "suspect" or "reference"
    weights: list[float]  # per refined class: how many classes it stands for in the median and MAD
    num_classes: int
    stage1_norms: list[float] | None = None  # (K,) stage-1 UAP norm per class
    stage1_samples: list[int] | None = None  # (K,) samples each class's stage-1 UAP saw
    order: list[int] | None = None  # stage-1 ranking, most suspect first
    why: str = ""

    def rank(self, cls: int) -> int | None:
        """A class's stage-1 rank (0: most suspect), None when there was no stage 1."""
        return None if self.order is None else self.order.index(cls)

    def to_dict(self) -> dict:
        """The report's `staging` object."""
        out: dict[str, object] = {
            "mode": self.mode,
            "why": self.why,
            "refined": self.refined,
            "roles": self.roles,
            "weights": [round(w, 4) for w in self.weights],
        }
        if self.order is not None:
            out["stage1"] = {
                "rounds": list(ROUNDS),
                "order": self.order,
                "uap_norms": [round(v, 4) for v in self.stage1_norms or []],
                "samples": self.stage1_samples,
            }
        return out


def choose_classes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    settings: ScanSettings,
    group: int,
    progress: Callable[[int, int], None] | None = None,
) -> Staging:
    """Stage 1 (when the settings and K call for it) and the classes stage 2 refines."""
    if settings.refine == "all":
        return _everything(k, "--refine all: the paper's full scan")
    if k <= settings.suspects + settings.references:
        return _everything(
            k, f"{k} classes <= {settings.suspects} suspects + {settings.references} references: every class refined"
        )
    norms, seen = stage_one(model, x, y, k, settings, group, progress)
    order = ranking(norms, seen)
    refined, roles, weights = select(order, settings.suspects, settings.references, settings.seed)
    weight = weights[-1]
    return Staging(
        mode="staged",
        refined=refined,
        roles=roles,
        weights=weights,
        num_classes=k,
        stage1_norms=[float(v) for v in norms],
        stage1_samples=[int(s) for s in seen],
        order=order,
        why=f"stage 1 ranked all {k} classes by a targeted UAP on {ROUNDS[-1]} samples at most; refined "
        f"the {settings.suspects} smallest as suspects and {settings.references} references at evenly "
        f"spaced ranks, each standing for {weight:.1f} classes in the median and MAD",
    )


def ranking(norms: np.ndarray, seen: np.ndarray) -> list[int]:
    """Stage-1 order, most suspect first: classes that went furthest, then by their UAP norm."""
    return sorted(range(len(norms)), key=lambda c: (-int(seen[c]), float(norms[c]), c))


def select(order: list[int], suspects: int, references: int, seed: int) -> tuple[list[int], list[str], list[float]]:
    """The classes stage 2 refines from the stage-1 ranking: the first `suspects`, then `references` at evenly
    spaced ranks of the rest from a seeded random start; with their roles and their weights in the median and MAD."""
    top, rest = order[:suspects], order[suspects:]
    start = np.random.default_rng(seed).random()
    step = len(rest) / references
    chosen = [rest[int((j + start) * step)] for j in range(references)]
    weight = len(rest) / references
    return (
        top + chosen,
        ["suspect"] * len(top) + ["reference"] * len(chosen),
        [1.0] * len(top) + [weight] * len(chosen),
    )


def stage_one(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    settings: ScanSettings,
    group: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1: per class, the norm of its targeted UAP after one Alg. 1 pass, and how many samples it saw."""
    gen = torch.Generator().manual_seed(settings.seed)
    pick = torch.randperm(x.shape[0], generator=gen)[: ROUNDS[-1]].to(x.device)
    v = torch.zeros(k, *x.shape[1:], device=x.device)
    norms = np.full(k, np.inf)
    seen = np.zeros(k, dtype=int)
    alive = torch.arange(k, device=x.device)
    total = _work(k, settings.suspects)
    counter, start = [0], 0
    for r, stop in enumerate(ROUNDS):
        idx = pick[start:stop]
        if len(idx) == 0:
            break
        xs, ys = x[idx], y[idx]

        def run(sl: slice, xs: torch.Tensor = xs, ys: torch.Tensor = ys, alive: torch.Tensor = alive):
            size, base = (sl.stop - sl.start) * len(xs), counter[0]
            ticks = (
                None
                if progress is None
                # per sample, so that the ETA comes early on big models
                else (lambda done, of: progress(base + size * done // max(of, 1), total))
            )
            u = targeted_uaps(
                model,
                xs,
                ys,
                alive[sl],
                p=settings.norm,
                delta=settings.delta,
                theta=1.0,
                max_passes=1,
                overshoot=settings.overshoot,
                max_iter=settings.deepfool_iter,
                v0=v[alive[sl]],
                progress=ticks,
            )
            counter[0] += size
            if progress is not None:
                progress(counter[0], total)
            return u

        parts = in_class_groups(run, len(alive), group)
        v[alive] = torch.cat([u.v for u in parts])
        ids = alive.cpu().numpy()
        norms[ids] = norm_of(v[alive], settings.norm).cpu().numpy()
        seen[ids] = start + len(idx)
        if r + 1 < len(ROUNDS):
            keep = _survivors(len(alive), settings.suspects)
            if keep < len(alive):
                alive = alive[torch.as_tensor(np.argsort(norms[ids], kind="stable")[:keep], device=x.device)]
        start = stop
    if progress is not None:
        progress(total, total)
    return norms, seen


def _work(k: int, suspects: int) -> int:
    """Class x sample DeepFool runs stage 1 does (its progress total)."""
    total, alive, start = 0, k, 0
    for r, stop in enumerate(ROUNDS):
        total += alive * (stop - start)
        if r + 1 < len(ROUNDS):
            alive = _survivors(alive, suspects)
        start = stop
    return total


def _survivors(alive: int, suspects: int) -> int:
    """How many of `alive` classes go on to the next stage-1 round: a tenth, at least 4 per suspect, at most all."""
    return min(alive, max(-(-alive // KEEP_SHARE), KEEP_PER_SUSPECT * suspects))


def _everything(k: int, why: str) -> Staging:
    return Staging(mode="all", refined=list(range(k)), roles=["all"] * k, weights=[1.0] * k, num_classes=k, why=why)
