"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016), batched, targeted or untargeted, for L2 or L-inf.

| argument  | meaning                                                                   |
|-----------|---------------------------------------------------------------------------|
| model     | maps [0, 1] images (B, C, H, W) to logits                                 |
| x         | the points to move, (B, C, H, W); kept inside [0, 1] while stepping        |
| target    | (B,) target classes (targeted: reach t) or None (untargeted: leave f(x)) |
| p         | "l2" (step w/||w||_2^2) or "linf" (step sign(w)/||w||_1)                  |
| overshoot | the usual 0.02: the step is scaled by 1 + overshoot to cross the boundary |
| max_iter  | linearisation steps at most                                               |
| candidates| untargeted only: how many top classes compete as the nearest boundary     |

Returns r with the same shape as x: a minimal perturbation such that f(clip(x + r)) is the target (or not the
original class); r is zero where x already satisfies that, and the last iterate where max_iter ran out.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.choices import Norm


def _step(f: torch.Tensor, w: torch.Tensor, p: Norm) -> torch.Tensor:
    """Minimal step that moves the linearised margin f >= 0 across zero along gradient w."""
    flat = w.flatten(1)
    if p == "l2":
        denom = flat.pow(2).sum(1).clamp_min(1e-12)
        return ((f.abs() + 1e-4) / denom).view(-1, *([1] * (w.ndim - 1))) * w
    denom = flat.abs().sum(1).clamp_min(1e-12)
    return ((f.abs() + 1e-4) / denom).view(-1, *([1] * (w.ndim - 1))) * w.sign()


def _distance(f: torch.Tensor, w: torch.Tensor, p: Norm) -> torch.Tensor:
    flat = w.flatten(1)
    dual = flat.norm(dim=1) if p == "l2" else flat.abs().sum(1)
    return f.abs() / dual.clamp_min(1e-12)


def _feasible(w: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """Drop gradient components that point out of [0, 1] where the pixel is already at the bound.

    Clipping would undo them anyway; without this, DeepFool stalls on images with saturated pixels (the black
    background of MNIST) because half of each linearised step is clipped away.
    """
    blocked = ((xa <= 0) & (w < 0)) | ((xa >= 1) & (w > 0))
    return w.masked_fill(blocked, 0.0)


def _nearest_boundary_step(
    model: nn.Module, xa: torch.Tensor, orig: torch.Tensor, cands: torch.Tensor, p: Norm
) -> torch.Tensor:
    """Untargeted step: towards the candidate class whose linearised boundary is nearest.

    All candidates' gradients come from one forward and backward pass over the batch repeated per candidate.
    """
    b, kc = cands.shape
    rep = xa.repeat_interleave(kc, dim=0).requires_grad_(True)
    logits = model(rep)
    o = orig.repeat_interleave(kc)
    c = cands.flatten()
    margin = logits.gather(1, c[:, None]).squeeze(1) - logits.gather(1, o[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad(margin.sum(), rep)
    grad = _feasible(grad, rep.detach())
    margin = margin.detach()
    dist = torch.where(c != o, _distance(margin, grad, p), torch.full_like(margin, float("inf"))).view(b, kc)
    best = dist.argmin(1) + torch.arange(b, device=xa.device) * kc
    return _step(margin[best], grad[best], p)


def deepfool(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    *,
    p: Norm,
    overshoot: float,
    max_iter: int,
    candidates: int = 10,
) -> torch.Tensor:
    """Batched DeepFool; see the module docstring for the arguments."""
    x = x.detach()
    r_tot = torch.zeros_like(x)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.no_grad():
        logits0 = model(x.clamp(0, 1))
    orig = logits0.argmax(1)
    if target is None:
        k = min(candidates, logits0.shape[1])
        others = logits0.topk(k, dim=1).indices  # nearest boundaries are among the top classes
    for it in range(max_iter + 1):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xa = (x[idx] + (1 + overshoot) * r_tot[idx]).clamp(0, 1).requires_grad_(True)
        logits = model(xa)
        pred = logits.argmax(1)
        reached = pred == target[idx] if target is not None else pred != orig[idx]
        if it == max_iter or reached.all():
            active[idx[reached]] = False
            break
        if target is not None:
            t = target[idx]
            margin = logits.gather(1, t[:, None]).squeeze(1) - logits.gather(1, pred[:, None]).squeeze(1)
            (grad,) = torch.autograd.grad(margin.sum(), xa)
            step = _step(margin.detach(), _feasible(grad, xa.detach()), p)
        else:
            step = _nearest_boundary_step(model, xa.detach(), orig[idx], others[idx], p)
        step = torch.where(reached.view(-1, *([1] * (x.ndim - 1))), torch.zeros_like(step), step)
        r_tot[idx] = r_tot[idx] + step.detach()
        active[idx[reached]] = False
    return (1 + overshoot) * r_tot
