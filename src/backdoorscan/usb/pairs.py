"""Source-specific and all-to-all backdoors: for ordered class pairs (s -> t), how small a patch sends the samples
of s (and only those) to t.

USB and Neural Cleanse search one trigger per target that moves *every* class; a trigger that works on one source
class only (label-specific, K-Arm: Shen et al., ICML 2021) or maps each class to another (all-to-all: Gu et al.
2019, Phan et al. 2022) is not small for any target over all classes, so they miss it by design. Here every
candidate pair is one row of a batch: a mask (1, H, W) and a pattern (C, H, W) per pair, blended as Neural
Cleanse does, optimised together on up to `per_source` clean samples of the source with a fixed L1 weight.

| argument | meaning |
|---|---|
| `pairs` | the (source, target) pairs to invert; `candidate_pairs` picks them |
| `steps`, `lr` | Adam steps and learning rate on the tanh-parametrised mask and pattern |
| `first_steps`, `go_on` | staging: every pair runs `first_steps`; per source the `go_on` smallest go on to `steps` |
| `per_source` | clean samples of each source used (its samples are the batch of every pair from it) |
| `cost` | weight of the mask's L1 (in pixels) against the cross-entropy toward the target |

The pair's size for the decision is the inversion's own objective (cross-entropy plus the weighted L1).
A source-specific backdoor shows as one pair whose patch is an outlier small against all pairs; all-to-all as
one outlier pair per source, forming a mapping; a universal backdoor as outlier pairs sharing one target (USB's
own finding). `spill` is the share of the *other* classes' samples the pair's patch also sends to the target: low
for a source-specific trigger, high for a universal one; it is measured for the pairs a report names only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..perturb.triggers import patch_region
from .batching import in_class_groups

PAIRS_ALL_MAX = 10  # up to this many classes every ordered pair is a candidate (90 at 10 classes)
PAIR_BUDGET = 90  # beyond, this many pairs: the closest by the sources' logits, the stage-1 suspects' first
PAIR_ASR = 0.9  # a pair's patch works when it moves this share of its source's samples
PAIRS_REPORTED = 10  # spill is measured for the flagged and mapping pairs and this many of the highest index


@dataclass
class PairTriggers:
    """Reversed pair triggers: one row per (source, target)."""

    pairs: list[tuple[int, int]]
    mask: torch.Tensor  # (P, 1, H, W) in [0, 1]
    pattern: torch.Tensor  # (P, C, H, W) in [0, 1]
    l1: np.ndarray  # (P,) mask L1 in pixels
    asr: np.ndarray  # (P,) share of the source's samples sent to the target
    spill: np.ndarray  # (P,) share of other classes' samples sent to the target; NaN where not measured
    ce: np.ndarray  # (P,) cross-entropy toward the target on the source's samples, with the final patch
    support: np.ndarray | None = None  # (P,) pixels the patch needs (`pair_support`), inf where it does not work;
    # None: not measured (ScanSettings.pair_support_ratio 0)
    reliance: np.ndarray | None = None  # (P,) share of the target's samples that leave it when the patch's region
    # is blanked with the source's look there (`measure_reliance`); NaN (or None: all) where not measured
    stopped: np.ndarray | None = None  # (P,) True where the pair stopped at the first stage (`invert_pairs`): its
    # l1 and ce are then estimates of what it would have reached, and it is a reference, never a finding
    compact: np.ndarray | None = None  # (P,) share of the mask in its best small window (`pair_compactness`)
    window_asr: np.ndarray | None = None  # (P,) the patch confined to that window, inverted again (`window_test`):
    window_ce: np.ndarray | None = None  # its success, cross-entropy and L1 (pixels); NaN (or None: all) where not
    window_l1: np.ndarray | None = None  # measured


def blend(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's blend, x' = (1 - mask) * x + mask * pattern, broadcast and clipped to [0, 1]."""
    return ((1 - mask) * x + mask * pattern).clamp(0, 1)


def candidate_pairs(
    k: int, y: torch.Tensor, logits: Callable[[], torch.Tensor], min_samples: int = 2
) -> list[tuple[int, int]]:
    """Every ordered pair up to PAIRS_ALL_MAX classes; beyond, PAIR_BUDGET pairs, so the stage costs what it costs
    at 10 classes: each source's nearest target (the highest mean logit over the source's samples) before any
    source's second, the closest first. `logits` gives the samples' logits; it is called only beyond
    PAIRS_ALL_MAX classes."""
    counts = torch.bincount(y.cpu(), minlength=k)
    sources = [s for s in range(k) if int(counts[s]) >= min_samples]
    if k <= PAIRS_ALL_MAX:
        return [(s, t) for s in sources for t in range(k) if t != s]
    scores = logits()
    scored: list[tuple[int, float, int, int]] = []  # (round, -closeness, source, target)
    for s in sources:
        mean = scores[y == s].float().mean(0)
        gap = (mean - mean[s]).clone()
        gap[s] = -float("inf")
        order = torch.argsort(gap, descending=True).tolist()
        for rank, t in enumerate(order[:-1]):
            scored.append((rank, -float(gap[t]), s, int(t)))
    scored.sort()
    return [(s, t) for _, _, s, t in scored[:PAIR_BUDGET]]


def _source_batches(y: torch.Tensor, pairs: list[tuple[int, int]], per_source: int) -> torch.Tensor:
    """(P, n) sample indices: the first `per_source` samples of each pair's source, repeated when it has fewer."""
    out = []
    for s, _ in pairs:
        rows = torch.nonzero(y == s).flatten()[:per_source]
        reps = -(-per_source // len(rows))
        out.append(rows.repeat(reps)[:per_source])
    return torch.stack(out)


def invert_pairs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pairs: list[tuple[int, int]],
    *,
    steps: int,
    lr: float,
    per_source: int,
    cost: float,
    group: int,
    batch: int,
    seed: int = 0,
    restarts: int = 1,
    first_restart: int = 0,
    first_steps: int = 0,
    go_on: int = 0,
    support: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PairTriggers:
    """Invert a patch per pair, `group` pairs per batch (the pair dimension is the batch dimension; a GPU out of
    memory halves the group, as for classes), then, with `support`, each working patch's support (`pair_support`,
    `batch` images a forward pass). Each pair's starting pattern is drawn from `seed` and the pair itself, so the
    result does not depend on the group size, which follows the memory at hand. With `restarts` R > 1 each pair
    is inverted from R starting patterns (R times the cost) and keeps the best: the working patch of the smallest
    objective, else the one that moves the most; restart 0 is the single inversion's. `first_restart` shifts the
    draws (a second look at some pairs starts from patterns their first inversion did not use).

    Staged (0 < `first_steps` < `steps`, `go_on` > 0): every pair runs `first_steps`; then, per source (and
    restart), the `go_on` pairs whose objective is smallest against their source's median run on to `steps`
    with their optimiser's state, exactly as they would have without the stop. A stopped pair is a reference for
    its source's median and the spread: its L1 and cross-entropy are scaled by how much those of its source's
    pairs that went on shrank from the first stage to the end (the median ratio), the size it would have
    reached; without that scaling its unfinished size would make every pair that went on look small
    (docs/results.md: plain successive halving flagged most clean models). A stopped pair never flags."""
    rows = list(pairs) * restarts  # restart-major: rows[: len(pairs)] is the first restart
    _, c, h, w = x.shape
    draws = range(first_restart, first_restart + restarts)
    starts = torch.cat([initial_patterns(pairs, (c, h, w), seed, restart=r) for r in draws])
    staged = 0 < first_steps < steps and go_on > 0
    first = first_steps if staged else steps
    sources = {(r, s) for r in range(restarts) for s, _ in pairs}
    going = min(len(rows), go_on * len(sources)) if staged else 0
    whole = len(rows) * first + going * (steps - first)  # pair-steps of the whole inversion
    tick = _PairSteps(progress, whole)
    runs: list[_Run] = in_class_groups(
        lambda sl: _Run.start(model, x, y, rows[sl], starts[sl], lr=lr, per_source=per_source).advance(
            first, cost=cost, progress=tick.part(sl.start * first, sl.stop - sl.start)
        ),
        len(rows),
        group,
    )
    units = [r.unit for r in runs]
    mask, pattern = torch.cat([m for m, _ in units]), torch.cat([p for _, p in units])
    asr, ce = pair_success(model, x, y, rows, mask, pattern)
    l1 = mask.flatten(1).sum(1).cpu().numpy()
    stopped = np.zeros(len(rows), dtype=bool)
    if staged:
        objective = torch.cat([r.objective for r in runs]).cpu().numpy()
        on = _going_on(rows, len(pairs), objective, go_on)
        stopped = ~on
        done, offset = len(rows) * first, 0
        for run in runs:
            mine = [i for i in range(len(run.pairs)) if on[offset + i]]
            if mine:
                went = run.keep(mine).advance(steps - first, cost=cost, progress=tick.part(done, len(mine)))
                at = torch.tensor([offset + i for i in mine], device=mask.device)
                mask[at], pattern[at] = went.unit
                done += len(mine) * (steps - first)
            offset += len(run.pairs)
        keep = np.flatnonzero(on)
        asr_end, ce_end = pair_success(model, x, y, [rows[i] for i in keep], mask[keep], pattern[keep])
        l1_end = mask[keep].flatten(1).sum(1).cpu().numpy()
        l1, ce = _scale_stopped(rows, len(pairs), keep, (l1, l1_end), (ce, ce_end))
        asr[keep], l1[keep], ce[keep] = asr_end, l1_end, ce_end
    if restarts > 1:
        best = _best_restarts(asr, ce + cost * l1, len(pairs))
        mask, pattern, asr, ce, l1, stopped = (v[best] for v in (mask, pattern, asr, ce, l1, stopped))
    return PairTriggers(
        pairs=list(pairs),
        mask=mask,
        pattern=pattern,
        l1=l1,
        asr=asr,
        spill=np.full(len(pairs), np.nan),
        ce=ce,
        support=pair_support(model, x, y, pairs, mask, pattern, works=(asr >= PAIR_ASR) & ~stopped, l1=l1, batch=batch)
        if support
        else None,
        stopped=stopped if staged else None,
    )


def _going_on(rows: list[tuple[int, int]], n_pairs: int, objective: np.ndarray, go_on: int) -> np.ndarray:
    """Per row (restart-major), whether it goes on: the `go_on` rows of each restart and source whose objective is
    smallest against their source's median (log), ties by position."""
    logs = np.log(np.maximum(objective, 1e-12))
    on = np.zeros(len(rows), dtype=bool)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (s, _) in enumerate(rows):
        groups.setdefault((i // n_pairs, s), []).append(i)
    for members in groups.values():
        at = np.array(members)
        order = np.argsort(logs[at] - np.median(logs[at]), kind="stable")
        on[at[order[:go_on]]] = True
    return on


def _scale_stopped(
    rows: list[tuple[int, int]],
    n_pairs: int,
    kept: np.ndarray,
    *sizes: tuple[np.ndarray, np.ndarray],
) -> list[np.ndarray]:
    """Each size (all rows at the first stage, the rows that went on at the end) for every row: a stopped row's
    first-stage value times the median, over its restart and source's rows that went on, of end / first stage."""
    out = []
    position = {int(i): j for j, i in enumerate(kept)}
    for first, end in sizes:
        scaled = first.astype(np.float64).copy()
        ratios: dict[tuple[int, int], list[float]] = {}
        for i, j in position.items():
            ratios.setdefault((i // n_pairs, rows[i][0]), []).append(float(end[j]) / max(float(first[i]), 1e-12))
        for i, (s, _) in enumerate(rows):
            if i not in position and (i // n_pairs, s) in ratios:
                scaled[i] = first[i] * float(np.median(ratios[(i // n_pairs, s)]))
        out.append(scaled)
    return out


def keep_better(found: PairTriggers, rows: list[int], again: PairTriggers, cost: float) -> PairTriggers:
    """`found` with each of its `rows` replaced by the same pair's patch in `again` (inverted from other starting
    patterns) where that one is better by `_best_restarts`' rule, or finished where the other stopped at a staged
    inversion's first stage; a replaced row's spill, reliance and window test are unmeasured again."""
    assert [found.pairs[i] for i in rows] == again.pairs
    if not rows:
        return found
    at = torch.tensor(rows, device=found.mask.device)
    asr = np.stack([found.asr[rows], again.asr])
    objective = np.stack([found.ce[rows] + cost * found.l1[rows], again.ce + cost * again.l1])
    take = _best_restarts(asr.ravel(), objective.ravel(), len(rows)) >= len(rows)  # True: `again`'s row
    was, now = _stopped(found)[rows], _stopped(again)
    take = np.where(was != now, was, take)  # a finished patch before a stopped one's estimate, whichever is smaller
    new = torch.tensor(take, device=found.mask.device)
    mask, pattern = found.mask.clone(), found.pattern.clone()
    mask[at] = torch.where(new[:, None, None, None], again.mask, mask[at])
    pattern[at] = torch.where(new[:, None, None, None], again.pattern, pattern[at])

    def merged(old: np.ndarray, other: np.ndarray) -> np.ndarray:
        out = old.copy()
        out[rows] = np.where(take, other, old[rows])
        return out

    return PairTriggers(
        pairs=list(found.pairs),
        mask=mask,
        pattern=pattern,
        l1=merged(found.l1, again.l1),
        asr=merged(found.asr, again.asr),
        spill=merged(found.spill, np.full(len(rows), np.nan)),
        ce=merged(found.ce, again.ce),
        support=merged(found.support, again.support)
        if found.support is not None and again.support is not None
        else None,
        reliance=None if found.reliance is None else merged(found.reliance, np.full(len(rows), np.nan)),
        window_asr=None if found.window_asr is None else merged(found.window_asr, np.full(len(rows), np.nan)),
        window_ce=None if found.window_ce is None else merged(found.window_ce, np.full(len(rows), np.nan)),
        window_l1=None if found.window_l1 is None else merged(found.window_l1, np.full(len(rows), np.nan)),
        stopped=None if found.stopped is None and again.stopped is None else merged(_stopped(found), _stopped(again)),
    )


def _stopped(found: PairTriggers) -> np.ndarray:
    """Per pair, whether it stopped at the first stage (none where the inversion was not staged)."""
    return np.zeros(len(found.pairs), dtype=bool) if found.stopped is None else found.stopped


def _best_restarts(asr: np.ndarray, objective: np.ndarray, n_pairs: int) -> np.ndarray:
    """Per pair, the row (restart-major) of its best restart: the smallest objective among the patches that work,
    else the one that moves the most of its source (then the smallest objective)."""
    asr, objective = asr.reshape(-1, n_pairs), objective.reshape(-1, n_pairs)  # (R, P)
    works = asr >= PAIR_ASR
    score = np.where(works, objective, np.inf)
    fallback = np.lexsort((objective, -asr), axis=0)[0]  # most moved, then smallest objective
    best = np.where(works.any(0), score.argmin(0), fallback)
    return best * n_pairs + np.arange(n_pairs)


def initial_patterns(
    pairs: list[tuple[int, int]], shape: tuple[int, int, int], seed: int, restart: int = 0
) -> torch.Tensor:
    """(P, C, H, W) uniform [0, 1) starting patterns, each from a generator seeded by `seed`, the restart and its
    own pair."""
    out = torch.empty(len(pairs), *shape)
    base = seed + restart * 1_000_000_007  # restart 0: the single inversion's patterns
    for i, (s, t) in enumerate(pairs):
        gen = torch.Generator(device="cpu").manual_seed((base * 1_000_003 + s * 10_007 + t) % 2**63)
        out[i] = torch.rand(shape, generator=gen)
    return out


class _Run:
    """Some pairs' inversion under way: their tanh-parametrised masks and patterns, Adam's state and their source
    samples, one row per pair. Rows are independent (Adam is elementwise, the loss a sum over pairs), so `keep`
    lets some rows go on exactly as they would have with the others."""

    def __init__(
        self,
        model: nn.Module,
        pairs: list[tuple[int, int]],
        xb: torch.Tensor,
        mask_p: torch.Tensor,
        pattern_p: torch.Tensor,
        opt: torch.optim.Adam,
    ) -> None:
        self.model, self.pairs, self.xb, self.opt = model, pairs, xb, opt
        self.mask_p, self.pattern_p = mask_p, pattern_p
        self.targets = torch.tensor([t for _, t in pairs], device=xb.device).repeat_interleave(xb.shape[1])
        self.objective = torch.full((len(pairs),), float("inf"), device=xb.device)  # the last step's, per pair
        self.window: torch.Tensor | None = None  # (P, 1, H, W) 0/1: where each mask may be non-zero (`window_test`)

    @classmethod
    def start(
        cls,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        pairs: list[tuple[int, int]],
        starts: torch.Tensor,
        *,
        lr: float,
        per_source: int,
    ) -> _Run:
        """A new inversion of `pairs` from the starting patterns `starts`, the mask about 0.02 everywhere."""
        h, w = x.shape[-2:]
        mask_p = torch.full((len(pairs), 1, h, w), -2.0, device=x.device, requires_grad=True)
        pattern_p = (starts * 2 - 1).to(x.device).requires_grad_(True)
        return cls._begin(model, x, y, pairs, mask_p, pattern_p, lr=lr, per_source=per_source)

    @classmethod
    def resume(
        cls,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        pairs: list[tuple[int, int]],
        mask: torch.Tensor,
        pattern: torch.Tensor,
        *,
        lr: float,
        per_source: int,
    ) -> _Run:
        """A new inversion of `pairs` starting from the masks and patterns (in [0, 1]) an earlier one reached."""

        def param(v: torch.Tensor) -> torch.Tensor:
            return torch.atanh(v.detach().clamp(1e-4, 1 - 1e-4) * 2 - 1).to(x.device).requires_grad_(True)

        return cls._begin(model, x, y, pairs, param(mask), param(pattern), lr=lr, per_source=per_source)

    @classmethod
    def _begin(
        cls,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        pairs: list[tuple[int, int]],
        *params: torch.Tensor,
        lr: float,
        per_source: int,
    ) -> _Run:
        """The run of `pairs` from its tanh parameters (mask, pattern): its source samples and Adam."""
        rows = _source_batches(y, pairs, per_source).to(x.device)  # (P, n)
        opt = torch.optim.Adam(list(params), lr=lr, betas=(0.5, 0.9))
        return cls(model, pairs, x[rows], params[0], params[1], opt)

    def advance(
        self,
        steps: int,
        *,
        cost: float,
        progress: Callable[[int, int], None],
        on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> _Run:
        """`steps` more Adam steps on every row; `on_step` sees each step's end (steps done here, the objective per
        pair, mask, pattern)."""
        n_pairs = len(self.pairs)
        for step in range(steps):
            mask = (torch.tanh(self.mask_p) + 1) / 2
            if self.window is not None:
                mask = mask * self.window
            pattern = (torch.tanh(self.pattern_p) + 1) / 2
            stamped = blend(self.xb, mask[:, None], pattern[:, None])
            logits = self.model(stamped.flatten(0, 1))
            ce = F.cross_entropy(logits, self.targets, reduction="none").view(n_pairs, -1).mean(1)
            objective = ce + cost * mask.flatten(1).sum(1)
            self.opt.zero_grad(set_to_none=True)
            objective.sum().backward()
            self.opt.step()
            self.objective = objective.detach()
            progress(step + 1, steps)
            if on_step is not None:
                on_step(step + 1, self.objective, *self.unit)
        return self

    def keep(self, rows: list[int]) -> _Run:
        """The inversion of these rows only, with their parameters and Adam's moments and step count."""
        at = torch.tensor(rows, device=self.xb.device)
        params = [p.detach()[at].clone().requires_grad_(True) for p in (self.mask_p, self.pattern_p)]
        opt = torch.optim.Adam(params, **{k: self.opt.defaults[k] for k in ("lr", "betas")})
        for old, new in zip((self.mask_p, self.pattern_p), params, strict=True):
            state = self.opt.state[old]
            opt.state[new] = {
                "step": state["step"].clone(),
                "exp_avg": state["exp_avg"][at].clone(),
                "exp_avg_sq": state["exp_avg_sq"][at].clone(),
            }
        run = _Run(self.model, [self.pairs[i] for i in rows], self.xb[at], params[0], params[1], opt)
        run.objective = self.objective[at]
        run.window = None if self.window is None else self.window[at]
        return run

    @property
    def unit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks and patterns in [0, 1] (each mask inside its window, when confined)."""
        mask, pattern = _unit(self.mask_p, self.pattern_p)
        return (mask if self.window is None else mask * self.window), pattern


class _PairSteps:
    """Progress of a staged inversion in pair-steps over the whole of it: each part (a group of rows for some
    steps) reports its own steps, shifted to where it starts."""

    def __init__(self, progress: Callable[[int, int], None] | None, whole: int) -> None:
        self.progress, self.whole = progress, whole

    def part(self, start: int, rows: int) -> Callable[[int, int], None]:
        """The callback of `rows` rows whose pair-steps begin after `start` of the whole."""
        return lambda done, _steps: (
            self.progress(start + rows * done, self.whole) if self.progress is not None else None
        )


def _invert(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pairs: list[tuple[int, int]],
    starts: torch.Tensor,
    *,
    steps: int,
    lr: float,
    per_source: int,
    cost: float,
    progress: Callable[[int, int], None],
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on every pair's tanh-parametrised mask and pattern at once for `steps`; returns them in [0, 1].
    `on_step`, when given, sees each step's end (steps done, that step's objective per pair, mask, pattern), so a
    study can keep the patches along the way without running the inversion again (benchmarks/pair_steps.py)."""
    run = _Run.start(model, x, y, pairs, starts, lr=lr, per_source=per_source)
    return run.advance(steps, cost=cost, progress=progress, on_step=on_step).unit


@torch.no_grad()
def _unit(mask_p: torch.Tensor, pattern_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tanh-parametrised mask and pattern in [0, 1]."""
    return (torch.tanh(mask_p) + 1) / 2, (torch.tanh(pattern_p) + 1) / 2


COMPACT_WINDOW = 5 / 28  # the window's side as a share of the image's smaller side (5 px at MNIST's 28, 6 at 32)


@torch.no_grad()
def pair_compactness(mask: torch.Tensor) -> np.ndarray:
    """Per pair, the share of its mask's mass inside the best square window of COMPACT_WINDOW of the image side.

    A planted trigger is a patch the model keys on at one place (TABOR, Guo et al. 2019, penalises scattered
    triggers for that reason); a natural pair's edit is a stroke drawn along the source's shape. Families zoo
    (study of batches 16-18, 13 and the varied clean models): planted pairs 0.38-0.95 (29 of 44 at 0.70 or
    more), the 857 natural pairs nearest to flagging at most 0.63."""
    m = mask.float().flatten(0, -3).unsqueeze(1)  # (P, 1, H, W)
    side = max(3, round(min(m.shape[-2:]) * COMPACT_WINDOW))
    best = (F.avg_pool2d(m, side, stride=1) * side * side).flatten(1).max(1).values
    return (best / m.flatten(1).sum(1).clamp_min(1e-12)).cpu().numpy().astype(np.float64)


def densest_window(mask: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """(P, 1, H, W): ones on each mask's densest `side` x `side` square (default COMPACT_WINDOW of the image side),
    zeros elsewhere."""
    m = mask.float().flatten(0, -3).unsqueeze(1)
    side = side or max(3, round(min(m.shape[-2:]) * COMPACT_WINDOW))
    pooled = F.avg_pool2d(m, side, stride=1)
    at = pooled.flatten(1).argmax(1).tolist()
    out = torch.zeros_like(m)
    for i, a in enumerate(at):
        r, c = divmod(a, pooled.shape[-1])
        out[i, :, r : r + side, c : c + side] = 1
    return out


def window_test(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    found: PairTriggers,
    which: list[int],
    *,
    steps: int,
    lr: float,
    per_source: int,
    cost: float,
    side: int | None = None,
) -> None:
    """Fill `found.window_asr`, `window_ce` and `window_l1` for the pairs in `which`: each patch confined to its
    mask's densest small window (`densest_window`, of `side` pixels if given) and inverted again from where the
    stage left it, with the stage's samples, steps and cost, then measured on all of its source's samples. A
    planted trigger is a few pixels at one place: its inversion may spread faint mass elsewhere, but the window
    alone still sends the source to the target with certainty (families zoo, held-out batch 20: every planted pair
    at cross-entropy 0.004-0.17, 15 of 16 at most 0.10); a natural pair's edit is a stroke along the source's
    shape, which a window cuts (the natural pairs nearest to flagging: 0.14 or more, adversarially trained models'
    9 -> 4 at 0.23-0.34). Other pairs keep NaN."""
    if found.window_asr is None or found.window_ce is None or found.window_l1 is None:
        found.window_asr, found.window_ce, found.window_l1 = (np.full(len(found.pairs), np.nan) for _ in range(3))
    if not which:
        return
    pairs = [found.pairs[i] for i in which]
    mask, pattern = found.mask[which], found.pattern[which]
    window = densest_window(mask, side)
    run = _Run.resume(model, x, y, pairs, mask * window, pattern, lr=lr, per_source=per_source)
    run.window = window
    confined, pattern = run.advance(steps, cost=cost, progress=lambda _d, _s: None).unit
    asr, ce = pair_success(model, x, y, pairs, confined, pattern)
    found.window_asr[which], found.window_ce[which] = asr, ce
    found.window_l1[which] = confined.flatten(1).sum(1).cpu().numpy()


@torch.no_grad()
def pair_success(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pairs: list[tuple[int, int]],
    mask: torch.Tensor,
    pattern: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, on its source's samples only: the share sent to the target and the mean cross-entropy toward it."""
    asr, ce = np.zeros(len(pairs)), np.zeros(len(pairs))
    for i, (s, t) in enumerate(pairs):
        src = x[y == s]
        if not len(src):
            continue
        logits = model(blend(src, mask[i], pattern[i]))
        asr[i] = int((logits.argmax(1) == t).sum()) / len(src)  # exact: 27 of 30 is PAIR_ASR, not 0.8999999
        ce[i] = float(F.cross_entropy(logits, torch.full((len(src),), t, device=x.device)))
    return asr, ce


@torch.no_grad()
def pair_support(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pairs: list[tuple[int, int]],
    mask: torch.Tensor,
    pattern: torch.Tensor,
    *,
    works: np.ndarray,
    l1: np.ndarray,
    batch: int,
) -> np.ndarray:
    """Per working pair, the fewest of its mask's largest pixels (kept at their values, the rest of the mask zeroed)
    that still send `PAIR_ASR` of the source's samples to the target; inf where the patch does not work.

    The L1 of an inverted mask also sums the faint values spread over the image, which the optimiser has no
    reason to zero at a small L1 weight; the support counts only the pixels the patch needs. A planted trigger
    is a few pixels the model keys on (families zoo: 4-10 px, against 12-25 px for its source's median pair),
    a natural pair a stroke it must draw. Binary search per pair, all pairs of a round in shared forward passes,
    starting from 4x the L1 (a pair that needs more is searched above it)."""
    n_pairs, hw = len(pairs), mask.shape[-1] * mask.shape[-2]
    out = np.full(n_pairs, np.inf)
    live = [i for i in range(n_pairs) if works[i]]
    if not live:
        return out
    ranks = torch.empty(n_pairs, hw, dtype=torch.long, device=mask.device)
    order = mask.flatten(1).argsort(1, descending=True)
    ranks.scatter_(1, order, torch.arange(hw, device=mask.device).expand(n_pairs, hw))
    rows = {s: torch.nonzero(y == s).flatten() for s in {pairs[i][0] for i in live}}
    guess = {i: int(min(hw, max(1, np.ceil(4 * l1[i])))) for i in live}
    moved = _moves(model, x, rows, pairs, mask, pattern, ranks, guess, batch)
    lo = {i: 0 if moved[i] else guess[i] for i in live}  # the top lo pixels do not move the source
    hi = {i: guess[i] if moved[i] else hw for i in live}  # the top hi pixels do
    while active := [i for i in live if hi[i] - lo[i] > 1]:
        mid = {i: (lo[i] + hi[i]) // 2 for i in active}
        moved = _moves(model, x, rows, pairs, mask, pattern, ranks, mid, batch)
        for i in active:
            (hi if moved[i] else lo)[i] = mid[i]
    for i in live:
        out[i] = hi[i]
    return out


def _moves(
    model: nn.Module,
    x: torch.Tensor,
    rows: dict[int, torch.Tensor],
    pairs: list[tuple[int, int]],
    mask: torch.Tensor,
    pattern: torch.Tensor,
    ranks: torch.Tensor,
    keep: dict[int, int],
    batch: int,
) -> dict[int, bool]:
    """For each pair i in `keep`: whether its mask cut to its `keep[i]` largest pixels moves PAIR_ASR of its source
    to its target. Pairs are stamped into shared batches of about `batch` images."""
    moved: dict[int, bool] = {}
    todo = list(keep)
    while todo:
        chunk: list[int] = []
        size = 0
        while todo and (not chunk or size + len(rows[pairs[todo[0]][0]]) <= batch):
            chunk.append(todo.pop(0))
            size += len(rows[pairs[chunk[-1]][0]])
        stamped, targets, counts = [], [], []
        for i in chunk:
            s, t = pairs[i]
            cut = mask[i] * (ranks[i] < keep[i]).view_as(mask[i]).to(mask.dtype)
            stamped.append(blend(x[rows[s]], cut, pattern[i]))
            targets.append(torch.full((len(rows[s]),), t, device=x.device))
            counts.append(len(rows[s]))
        hits = (model(torch.cat(stamped)).argmax(1) == torch.cat(targets)).split(counts)
        for i, h, n in zip(chunk, hits, counts, strict=True):
            moved[i] = int(h.sum()) / n >= PAIR_ASR  # counted as pair_success counts
    return moved


@torch.no_grad()
def measure_spill(model: nn.Module, x: torch.Tensor, y: torch.Tensor, found: PairTriggers, which: list[int]) -> None:
    """Fill `found.spill` for the pairs in `which` (the ones a report names): the share of the other classes'
    samples (neither source nor target) the pair's patch sends to its target. Other pairs keep NaN: measuring
    every pair would cost a forward pass over all samples per pair, for a figure no decision uses."""
    for i in which:
        s, t = found.pairs[i]
        other = x[(y != s) & (y != t)]
        if len(other):
            stamped = blend(other, found.mask[i], found.pattern[i])
            found.spill[i] = int((model(stamped).argmax(1) == t).sum()) / len(other)


@torch.no_grad()
def measure_reliance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, found: PairTriggers, which: list[int]) -> None:
    """Fill `found.reliance` for the pairs in `which`: the share of the target's own samples whose prediction leaves
    the target when the pair's patch region (`patch_region`) is filled with the source's mean there. A planted
    patch sits where the target's samples carry nothing of their class (0-0.30 on the families zoo's tuning part);
    a natural pair's patch is the edit that makes a source look like the target (a 9's closed loop opened into a
    4's), so blanking it in the target's own samples undoes the target (0.73-0.93 on adversarially trained
    models). Other pairs keep NaN."""
    if found.reliance is None:
        found.reliance = np.full(len(found.pairs), np.nan)
    for i in which:
        s, t = found.pairs[i]
        own, source = x[y == t], x[y == s]
        if len(own) and len(source):
            area = patch_region(found.mask[i : i + 1])[0]
            blanked = own * (1 - area) + source.mean(0) * area
            found.reliance[i] = int((model(blanked).argmax(1) != t).sum()) / len(own)
