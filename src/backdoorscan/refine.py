"""USB Alg. 2: refine each targeted UAP into a small trigger x mask, all classes in one batch.

Loss per class t: CE(f(x'), t) - SSIM(x, x') + ||mask||_1, Adam (lr 0.1, betas (0.5, 0.9)), batches taken from
the samples in order. Where the UAP failed (success < theta) the paper's fallback is used:
w0 * CE - SSIM + ||trigger||_1. Two ways to stamp x':

* "paper": x' = x * mask + trigger * mask, as Alg. 2 writes it; trigger = v and mask = 1 at the start, so the first
  x' is x + v. The size of the reversed trigger is ||trigger * mask||_1.
* "blend": x' = (1 - mask) * x + mask * pattern, the Neural Cleanse blend that the authors' code uses; it starts
  from mask = |v| and pattern = 1 where v > 0, else 0, which approximates x + v. The size is ||mask||_1.

After every step the mask is clamped to [0, 1] and the trigger to [-1, 1] ("paper") or [0, 1] ("blend").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .perturb.uap import success_rates
from .ssim import ssim

FORMS = ("paper", "blend")


def stamp(x: torch.Tensor, trigger: torch.Tensor, mask: torch.Tensor, form: str) -> torch.Tensor:
    """x (B, C, H, W) with each class's trigger applied -> (K, B, C, H, W), clipped to [0, 1]."""
    if form == "paper":
        out = (x[None] + trigger[:, None]) * mask[:, None]
    else:
        out = (1 - mask[:, None]) * x[None] + (mask * trigger)[:, None]
    return out.clamp(0, 1)


def trigger_size(trigger: torch.Tensor, mask: torch.Tensor, form: str) -> torch.Tensor:
    """L1 size per class: ||trigger * mask||_1 (paper) or ||mask||_1 (blend)."""
    size = trigger * mask if form == "paper" else mask
    return size.abs().flatten(1).sum(1)


def stamped_success(model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor,
                    trigger: torch.Tensor, mask: torch.Tensor, form: str) -> torch.Tensor:
    """Per class t: share of samples not of class t that the stamped trigger sends to t."""
    return success_rates(model, y, targets, lambda sl: stamp(x, trigger[sl], mask[sl], form), x.shape[0])


@dataclass
class Refined:
    """Reversed triggers, one per class."""

    trigger: torch.Tensor  # (K, C, H, W)
    mask: torch.Tensor  # (K, C, H, W)
    l1: torch.Tensor  # (K,)
    asr: torch.Tensor  # (K,)
    form: str

    @property
    def perturbation(self) -> torch.Tensor:
        """What is added to (paper) or blended into (blend) an image: trigger * mask."""
        return self.trigger * self.mask


def initial(v: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Trigger and mask from the UAP so that the first stamped input is x + v (exactly or nearly)."""
    if form == "paper":
        return v.clone(), torch.ones_like(v)
    return (v > 0).float(), v.abs().clamp(0, 1)


def refine(model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, v: torch.Tensor,
           failed: torch.Tensor, *, form: str = "paper", steps: int = 500, lr: float = 0.1, batch: int = 32,
           betas: tuple[float, float] = (0.5, 0.9), w0: float = 10.0,
           progress: Callable[[int, int], None] | None = None) -> Refined:
    """Alg. 2 for every class in `targets` at once, from the UAPs v (K, C, H, W)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; use one of {FORMS}")
    trigger, mask = initial(v, form)
    trigger.requires_grad_(True)
    mask.requires_grad_(True)
    optimiser = torch.optim.Adam([trigger, mask], lr=lr, betas=betas)
    k, n = len(targets), x.shape[0]
    ce_weight = torch.where(failed, torch.full_like(v[:, 0, 0, 0], w0), torch.ones_like(v[:, 0, 0, 0]))
    lo = -1.0 if form == "paper" else 0.0
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch, device=x.device) % n
        xb = x[idx]
        stamped = stamp(xb, trigger, mask, form)  # (K, B, C, H, W)
        logits = model(stamped.flatten(0, 1))
        ce = F.cross_entropy(logits, targets.repeat_interleave(len(idx)), reduction="none").view(k, -1).mean(1)
        sim = ssim(xb.repeat(k, 1, 1, 1), stamped.flatten(0, 1)).view(k, -1).mean(1)
        size = torch.where(failed, trigger.abs().flatten(1).mean(1), mask.abs().flatten(1).mean(1))
        loss = (ce_weight * ce - sim + size).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
            trigger.clamp_(lo, 1)
        if progress is not None:
            progress(step + 1, steps)
    trigger, mask = trigger.detach(), mask.detach()
    asr = stamped_success(model, x, y, targets, trigger, mask, form)
    return Refined(trigger=trigger, mask=mask, l1=trigger_size(trigger, mask, form), asr=asr, form=form)
