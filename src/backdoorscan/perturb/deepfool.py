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


def _step(f: torch.Tensor, w: torch.Tensor, p: str) -> torch.Tensor:
    """Minimal step that moves the linearised margin f >= 0 across zero along gradient w."""
    flat = w.flatten(1)
    if p == "l2":
        denom = flat.pow(2).sum(1).clamp_min(1e-12)
        return ((f.abs() + 1e-4) / denom).view(-1, *([1] * (w.ndim - 1))) * w
    denom = flat.abs().sum(1).clamp_min(1e-12)
    return ((f.abs() + 1e-4) / denom).view(-1, *([1] * (w.ndim - 1))) * w.sign()


def _distance(f: torch.Tensor, w: torch.Tensor, p: str) -> torch.Tensor:
    flat = w.flatten(1)
    dual = flat.norm(dim=1) if p == "l2" else flat.abs().sum(1)
    return f.abs() / dual.clamp_min(1e-12)


def deepfool(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, *, p: str = "l2",
             overshoot: float = 0.02, max_iter: int = 50, candidates: int = 10) -> torch.Tensor:
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
            step = _step(margin.detach(), grad, p)
        else:
            o = orig[idx]
            z_o = logits.gather(1, o[:, None]).squeeze(1)
            best, step = None, torch.zeros_like(xa)
            for j in range(others.shape[1]):
                cand = others[idx, j]
                valid = cand != o
                margin = logits.gather(1, cand[:, None]).squeeze(1) - z_o
                (grad,) = torch.autograd.grad(margin.sum(), xa, retain_graph=j < others.shape[1] - 1)
                dist = torch.where(valid, _distance(margin.detach(), grad, p), torch.full_like(margin, float("inf")))
                better = dist < best if best is not None else valid
                best = dist if best is None else torch.minimum(best, dist)
                step = torch.where(better.view(-1, *([1] * (x.ndim - 1))), _step(margin.detach(), grad, p), step)
        step = torch.where(reached.view(-1, *([1] * (x.ndim - 1))), torch.zeros_like(step), step)
        r_tot[idx] = r_tot[idx] + step.detach()
        active[idx[reached]] = False
    return (1 + overshoot) * r_tot
