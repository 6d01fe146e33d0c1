"""USB Alg. 2: refine each targeted UAP into a small trigger x mask, all classes in one batch.

Loss per class t: CE(f(x'), t) - SSIM(x, x') + ||mask||_1, Adam (lr 0.1, betas (0.5, 0.9)), batches taken from
the samples in order. Where the UAP failed (success < theta) the paper's fallback is used:
w0 * CE - SSIM + ||trigger||_1. The two stamping forms are in `perturb/triggers.py`; "paper" starts from trigger = v and
mask = 1, so the first x' is x + v; "blend" starts from mask = |v| and pattern = 1 where v > 0, else 0, which
approximates x + v.

After every step the mask is clamped to [0, 1] and the trigger to [-1, 1] ("paper") or [0, 1] ("blend").

The size term: "fixed" is Eq. (1) with the mask's mean L1 (weight 1); "adaptive" is the authors' code: the sum
L1 under Neural Cleanse's per-class weight schedule (`cost.CostSchedule`), keeping the smallest trigger that
moved 99 % of an epoch's samples. A fixed weight leaves diffuse low mask values over the whole image, which add up
and hide how small the working part of a larger patch trigger is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.choices import Form, MaskCost, check_choice
from ..perturb.cost import CostSchedule
from ..perturb.triggers import Refined, stamp, stamped_success, trigger_size
from .ssim import ssim


def initial(v: torch.Tensor, form: Form) -> tuple[torch.Tensor, torch.Tensor]:
    """Trigger and mask from the UAP so that the first stamped input is x + v (exactly or nearly)."""
    if form == "paper":
        return v.clone(), torch.ones_like(v)
    return (v > 0).float(), v.abs().clamp(0, 1)


def refine(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor,
    v: torch.Tensor,
    failed: torch.Tensor,
    *,
    form: Form,
    steps: int,
    lr: float,
    batch: int,
    betas: tuple[float, float],
    w0: float,
    mask_cost: MaskCost,
    init_cost: float,
    progress: Callable[[int, int], None] | None = None,
) -> Refined:
    """USB Alg. 2 for every class in `targets` at once: each UAP becomes a small trigger x mask by minimising
    CE(f(stamp(x)), t) - SSIM(x, stamp(x)) + cost * L1(mask), with Adam.

    | argument | meaning | `ScanSettings` |
    |---|---|---|
    | `x`, `y` | clean samples in [0, 1] and their labels | `samples` |
    | `targets`, `v` | the classes (batch dimension) and their Alg. 1 UAPs (K, C, H, W), the starting triggers | |
    | `failed` | classes whose UAP missed theta: their cross-entropy is weighted by `w0` | `theta`, `w0` |
    | `form` | "blend" (Neural Cleanse's, the authors' code) or "paper" ((x + trigger) * mask) | `form` |
    | `steps`, `lr`, `betas`, `batch` | Adam's schedule: steps of one mini-batch each | same |
    | `mask_cost`, `init_cost` | the L1 weight: fixed, or Neural Cleanse's adaptive schedule from `init_cost` | same |
    | `progress` | `(done, total)` steps | |

    Returns per class the trigger, mask, L1 size and attack success rate on x (`perturb/triggers.Refined`).
    """
    check_choice("form", form, Form)
    check_choice("mask cost", mask_cost, MaskCost)
    trigger, mask = initial(v, form)
    trigger.requires_grad_(True)
    mask.requires_grad_(True)
    optimiser = torch.optim.Adam([trigger, mask], lr=lr, betas=betas)
    k, n = len(targets), x.shape[0]
    ce_weight = torch.where(failed, torch.full_like(v[:, 0, 0, 0], w0), torch.ones_like(v[:, 0, 0, 0]))
    lo = -1.0 if form == "paper" else 0.0
    schedule = (
        None if mask_cost == "fixed" else CostSchedule.start(k, init=init_cost, epoch=n // batch, device=x.device)
    )
    if schedule is not None:  # the smallest working trigger so far (the schedule says which are better)
        kept_trigger, kept_mask = trigger.detach().clone(), mask.detach().clone()
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch, device=x.device) % n
        xb = x[idx]
        stamped = stamp(xb, trigger, mask, form)  # (K, B, C, H, W)
        logits = model(stamped.flatten(0, 1))
        wanted = targets.repeat_interleave(len(idx))
        ce = F.cross_entropy(logits, wanted, reduction="none").view(k, -1).mean(1)
        sim = ssim(xb.repeat(k, 1, 1, 1), stamped.flatten(0, 1)).view(k, -1).mean(1)
        if schedule is None:  # Eq. (1): the mean, weight 1
            size = torch.where(failed, trigger.abs().flatten(1).mean(1), mask.abs().flatten(1).mean(1))
        else:
            size = schedule.cost * torch.where(failed, trigger.abs().flatten(1).sum(1), mask.abs().flatten(1).sum(1))
        loss = (ce_weight * ce - sim + size).sum()
        if schedule is not None:  # judge the trigger just used, before this step changes it
            with torch.no_grad():
                better = schedule.step((logits.argmax(1) == wanted).view(k, -1), trigger_size(trigger, mask, form))
                kept_trigger[better], kept_mask[better] = trigger[better], mask[better]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
            trigger.clamp_(lo, 1)
        if progress is not None:
            progress(step + 1, steps)
    trigger, mask = trigger.detach(), mask.detach()
    if schedule is not None:  # the smallest trigger that worked; the last one where none did
        never = schedule.never
        kept_trigger[never], kept_mask[never] = trigger[never], mask[never]
        trigger, mask = kept_trigger, kept_mask
    asr = stamped_success(model, x, y, targets, trigger, mask, form)
    return Refined(trigger=trigger, mask=mask, l1=trigger_size(trigger, mask, form), asr=asr, form=form)
