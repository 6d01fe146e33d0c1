"""The erasure rule (`filter --method erase --triggers`): screen inputs with the triggers a model scan reversed.

An input predicted as a patch trigger's target is re-predicted with the patch erased: its region (where the reversed
mask sits: `perturb.triggers.patch_region`) filled with what clean samples of the trigger's source look like there,
FILL_DRAWS of them in turn (of every other class for a universal trigger). An input whose prediction then leaves the
target under most of them carried the trigger. Neural Cleanse (Wang et al., S&P 2019, Sec. VI-A) screens inputs with
the reversed trigger through the neurons it activates; erasing and re-predicting needs no layer access and covers
what Xue et al.'s UAP rule cannot: triggers that only work on one source's content (source-specific, all-to-all),
which a universal perturbation does not dominate (`docs/results.md`). A reversed patch can sit a pixel or two off
the planted one, so each patch's region is grown as far as the trigger's target's own clean samples allow (up to
`FilterSettings.erase_grow` pixels, while erasing it moves at most GROW_ALLOWANCE of them off the target beyond what
the base region does): the growth costs little on clean inputs and covers more of a planted patch (not always more
of its effect: docs/results.md). It can only screen for what the scan found, and not warps: the warp the scan
reverses is one that moves clean inputs to the target, not the planted one, and reversing it leaves a WaNet input's
prediction where it was (measured on the bundled WaNet model: none of its warped digits moved; `docs/results.md`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..perturb.evaluate import predict
from ..perturb.triggers import REGION_GROW, patch_region
from ..report.trigger_file import TriggerFile

# The share of a target's own clean samples a grown region may move off the target beyond the base region (0.17.0;
# 0.14.0-0.16.0: none). Reversed patches sit a pixel or two off the planted one: on held-out batch 22 the base region
# covered 0.38-0.67 of the planted patch and a region grown by 2-3 px all of it, but growth stopped at one more
# clean sample moved. 0.1 keeps the screen's false rejections on the target's class within the budget (10 %).
GROW_ALLOWANCE = 0.1
# Real clean samples the region is filled from, one erasure each; an input is flagged when most of them move it off
# the target (0.20.0; until 0.19.0 one fill, the source's mean). A reversed mask can be larger than the planted patch
# and cover the digit's stroke: the mean of a class's strokes there is a flat blur that made 67 % of held-out batch
# 21's clean 5s the target 3 (`source_specific_209`); real 5s restore a 5. Odd, so that most is a strict majority.
FILL_DRAWS = 9


@dataclass
class EraseRule:
    """The patch triggers as erasures: per patch, the area erased, what fills it, and its target."""

    areas: torch.Tensor  # (N, 1, H, W) in {0, 1}
    fills: torch.Tensor  # (N, D, C, H, W): D clean samples each region is filled from in turn
    targets: torch.Tensor  # (N,)
    grow: list[int]  # (N,) pixels each region was grown by

    def to(self, device: torch.device | str) -> EraseRule:
        return EraseRule(self.areas.to(device), self.fills.to(device), self.targets.to(device), self.grow)


def erase_rule(
    model: nn.Module, found: TriggerFile, clean_x: torch.Tensor, clean_pred: torch.Tensor, grow: int = REGION_GROW
) -> EraseRule:
    """The rule for a scan's patch triggers, its fills taken from clean samples (by the model's predictions) and
    each region grown as far as its target's clean samples allow, up to `grow` pixels (`_widest`)."""
    x, pred = clean_x.cpu(), clean_pred.cpu()
    fills = []
    for target, source in zip(found.targets, found.sources, strict=True):
        own = pred == source if source >= 0 else pred != target
        if not bool(own.any()):  # a source the clean samples lack: any class but the target's
            own = pred != target
        fills.append(_draws(x[own] if bool(own.any()) else x))
    shape = tuple(clean_x.shape[1:])
    fill = torch.stack(fills) if fills else torch.zeros(0, FILL_DRAWS, *shape)
    grown = [
        _widest(model, found.regions[i : i + 1], fill[i], t, clean_x[clean_pred == t], grow)
        for i, t in enumerate(found.targets)
    ]
    areas = [patch_region(found.regions[i : i + 1], g) for i, g in enumerate(grown)]
    return EraseRule(
        areas=torch.cat(areas).float() if areas else torch.zeros(0, 1, *shape[1:]),
        fills=fill,
        targets=torch.tensor(found.targets, dtype=torch.long),
        grow=grown,
    )


def _draws(pool: torch.Tensor) -> torch.Tensor:
    """FILL_DRAWS samples spread evenly over `pool` (in its order: reproducible, no random state; repeated where
    the pool is smaller)."""
    return pool[torch.linspace(0, len(pool) - 1, FILL_DRAWS).round().long()]


@torch.no_grad()
def _moved(
    model: nn.Module, x: torch.Tensor, area: torch.Tensor, fills: torch.Tensor, target: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input of x: whether most erasures (its `area` filled from each of `fills` in turn) move it off `target`,
    and one such erasure's prediction (the target's where none does)."""
    preds = torch.stack([predict(model, x * (1 - area) + fill * area) for fill in fills])  # (D, B)
    off = preds != target
    moved = off.sum(0) * 2 > len(fills)
    first = off.float().argmax(0)  # the first erasure that moved it (0 where none did)
    return moved, preds.gather(0, first[None]).squeeze(0)


@torch.no_grad()
def _widest(
    model: nn.Module, region: torch.Tensor, fill: torch.Tensor, target: int, own: torch.Tensor, most: int
) -> int:
    """How far one patch's region can grow (REGION_GROW to `most` pixels) while erasing it from the
    target's own clean samples moves at most GROW_ALLOWANCE of them off the target beyond what the base region
    moves; the base growth where no clean sample is predicted as the target (nothing to measure the cost on)."""
    if not len(own):
        return REGION_GROW
    fill = fill.to(own.device)

    def moved(grow: int) -> int:
        area = patch_region(region, grow).to(own.device)[0]
        return int(_moved(model, own, area, fill, target)[0].sum())

    limit, best = moved(REGION_GROW) + int(GROW_ALLOWANCE * len(own)), REGION_GROW
    for grow in range(REGION_GROW + 1, most + 1):
        if moved(grow) > limit:
            break
        best = grow
    return best


@torch.no_grad()
def erase_flags(model: nn.Module, x: torch.Tensor, rule: EraseRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input: its prediction, its prediction once the first patch that moves it is erased (else the same), and
    whether one did (flagged: most of that patch's erasures moved it off the patch's target)."""
    before = predict(model, x)
    after = before.clone()
    flagged = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for i in range(len(rule.targets)):
        rows = ((before == rule.targets[i]) & ~flagged).nonzero().flatten()
        if len(rows):
            moved, now = _moved(model, x[rows], rule.areas[i], rule.fills[i], rule.targets[i])
            after[rows[moved]] = now[moved]
            flagged[rows[moved]] = True
    return before, after, flagged
