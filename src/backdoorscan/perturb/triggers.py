"""Reversed triggers, shared by USB's refinement and the Neural Cleanse baseline: how a trigger is stamped on an
image, how big it is, and how often it sends clean samples to its class.

Two forms:

* "paper": x' = (x + trigger) * mask, as USB's Alg. 2 writes it; the size is ||trigger * mask||_1.
* "blend": x' = (1 - mask) * x + mask * pattern, Neural Cleanse's blend (and the USB authors' code); the size is
  ||mask||_1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.choices import Form, check_choice
from .evaluate import success_rates

REGION_LEVEL = 0.3  # a reversed patch's region: its mask above this share of its peak,
REGION_GROW = 1  # grown by this many pixels, so that a patch reversed a pixel off still covers the planted one


def patch_region(mask: torch.Tensor, grow: int = REGION_GROW) -> torch.Tensor:
    """Where reversed patches sit: (N, C, H, W) masks -> (N, 1, H, W) in {0, 1}, each mask (its channels' mean)
    above REGION_LEVEL of its peak, grown by `grow` pixels. What the erasure screen fills (grown further where
    clean samples allow it: `screen.erase`) and the pairs stage's reliance test blanks."""
    m = mask.float().abs().mean(1, keepdim=True)
    area = (m >= REGION_LEVEL * m.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)).float()
    if not len(area):
        return area
    return F.max_pool2d(area, 2 * grow + 1, stride=1, padding=grow) if grow > 0 else area


def stamp(x: torch.Tensor, trigger: torch.Tensor, mask: torch.Tensor, form: Form) -> torch.Tensor:
    """x (B, C, H, W) with each class's trigger applied -> (K, B, C, H, W), clipped to [0, 1]."""
    check_choice("form", form, Form)
    if form == "paper":
        out = (x[None] + trigger[:, None]) * mask[:, None]
    else:
        out = (1 - mask[:, None]) * x[None] + (mask * trigger)[:, None]
    return out.clamp(0, 1)


def trigger_size(trigger: torch.Tensor, mask: torch.Tensor, form: Form) -> torch.Tensor:
    """L1 size per class: ||trigger * mask||_1 (paper) or ||mask||_1 (blend)."""
    size = trigger * mask if form == "paper" else mask
    return size.abs().flatten(1).sum(1)


def stamped_success(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor,
    trigger: torch.Tensor,
    mask: torch.Tensor,
    form: Form,
) -> torch.Tensor:
    """Per class t: share of samples not of class t that the stamped trigger sends to t."""
    return success_rates(model, y, targets, lambda sl: stamp(x, trigger[sl], mask[sl], form), x.shape[0])


@dataclass
class Refined:
    """Reversed triggers, one per class, with their sizes and attack success rates."""

    trigger: torch.Tensor  # (K, C, H, W)
    mask: torch.Tensor  # (K, C, H, W)
    l1: torch.Tensor  # (K,)
    asr: torch.Tensor  # (K,)
    form: Form

    @staticmethod
    def concat(parts: list[Refined]) -> Refined:
        """One result from the results of class groups, in order."""
        return Refined(
            trigger=torch.cat([p.trigger for p in parts]),
            mask=torch.cat([p.mask for p in parts]),
            l1=torch.cat([p.l1 for p in parts]),
            asr=torch.cat([p.asr for p in parts]),
            form=parts[0].form,
        )
