"""Neural Cleanse (Wang et al., S&P 2019): per-class mask + pattern, CE + lambda * ||m||_1, adaptive lambda.

Batched over classes like USB. x' = (1 - m) * x + m * p with m = tanh(.)/2 + 1/2 of shape (K, 1, H, W) and
p = tanh(.)/2 + 1/2; Adam (lr 0.1, betas (0.5, 0.9)); lambda starts at 1e-3 and, per class, is multiplied by 1.5
after `patience` epochs at ASR >= 0.99 and divided by 1.5 ** 1.5 after `patience` epochs below it
(`cost.CostSchedule`). The smallest mask that reached ASR >= 0.99 is kept. Its size is ||m||_1, decided with the
same one-sided MAD rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..perturb.cost import CostSchedule
from ..perturb.triggers import Refined, stamped_success


def neural_cleanse(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch: int,
    init_cost: float,
    progress: Callable[[int, int], None] | None = None,
) -> Refined:
    """Reverse a trigger for every class in `targets` at once; steps, lr, batch and init_cost are `ScanSettings`'."""
    k, n = len(targets), x.shape[0]
    c, h, w = x.shape[1:]
    mask_raw = torch.zeros(k, 1, h, w, device=x.device, requires_grad=True)
    pattern_raw = torch.zeros(k, c, h, w, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
    schedule = CostSchedule.start(k, init=init_cost, epoch=n // batch, device=x.device)
    best_mask = torch.ones(k, 1, h, w, device=x.device)
    best_pattern = torch.zeros(k, c, h, w, device=x.device)
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch, device=x.device) % n
        xb = x[idx]
        mask = torch.tanh(mask_raw) / 2 + 0.5
        pattern = torch.tanh(pattern_raw) / 2 + 0.5
        stamped = ((1 - mask[:, None]) * xb[None] + (mask * pattern)[:, None]).flatten(0, 1)
        logits = model(stamped)
        tgt = targets.repeat_interleave(len(idx))
        ce = F.cross_entropy(logits, tgt, reduction="none").view(k, -1).mean(1)
        l1 = mask.flatten(1).sum(1)
        loss = (ce + schedule.cost * l1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        better = schedule.step((logits.argmax(1) == tgt).view(k, -1), l1.detach())
        with torch.no_grad():
            best_mask[better] = mask[better]
            best_pattern[better] = pattern[better]
        if progress is not None:
            progress(step + 1, steps)
    never = schedule.never  # no mask ever reached the goal: keep the last one
    with torch.no_grad():
        last_mask = torch.tanh(mask_raw) / 2 + 0.5
        best_mask[never] = last_mask[never]
        best_pattern[never] = (torch.tanh(pattern_raw) / 2 + 0.5)[never]
    mask_full = best_mask.expand(-1, c, -1, -1).contiguous()
    asr = stamped_success(model, x, y, targets, best_pattern, mask_full, "blend")
    return Refined(trigger=best_pattern, mask=mask_full, l1=best_mask.flatten(1).sum(1), asr=asr, form="blend")
