"""Universal adversarial perturbations (Moosavi-Dezfooli et al., CVPR 2017) in pixel space [0, 1].

`targeted_uaps` is USB's Alg. 1, one targeted UAP per class with the class dimension as a batch dimension:
sample by sample, every class whose v_t does not yet send the sample to t takes a targeted DeepFool step, and
v_t is projected back onto the ball ||v||_p <= delta; a pass over the samples ends with the targeted success
rate per class, and classes at theta or above stop, as do classes whose rate rose less than `stall` over a pass
(from the second pass on: another pass inside the same ball will not reach theta). `untargeted_uap` is the
single L-inf UAP of Xue et al.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.choices import Norm, Solver, check_choice
from .deepfool import deepfool
from .evaluate import fooling_rate, predict, targeted_success
from .project import project

Progress = Callable[[int, int], None]
PGD_BATCH = 32  # samples per signed-gradient step of the "pgd" solver


@dataclass
class TargetedUAPs:
    """One targeted UAP per class and how well each works."""

    v: torch.Tensor  # (K, C, H, W)
    success: torch.Tensor  # (K,) targeted success rate on samples of other classes
    passes: int


def targeted_uaps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor,
    *,
    p: Norm,
    delta: float,
    theta: float,
    max_passes: int,
    overshoot: float,
    max_iter: int,
    stall: float = 0.0,
    v0: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> TargetedUAPs:
    """USB Alg. 1 (Xu, Ersoy, Picek, *Universal Soldier*, arXiv:2302.00747) for every class in `targets` at once.

    | argument | meaning | `ScanSettings` |
    |---|---|---|
    | `x`, `y` | clean samples (N, C, H, W) in [0, 1] and their labels (true or predicted) | `samples` |
    | `targets` | the classes to grow a targeted UAP for (the batch dimension) | |
    | `p`, `delta` | the norm and radius of the ball each UAP is projected onto | `norm`, `delta` |
    | `theta` | targeted success rate at which a class stops | `theta` |
    | `max_passes`, `stall` | passes over x at most; stop a class whose rate rose less than `stall` in a pass | same |
    | `overshoot`, `max_iter` | DeepFool's step scale (1 + overshoot) and iterations per sample | `deepfool_iter` |
    | `v0` | UAPs already grown on other samples (the staged scan's rounds) to continue from | |
    | `progress` | `(done, total)` sample steps | |

    Returns the UAPs (K, C, H, W), their targeted success on x and the passes taken.
    """
    k = len(targets)
    v = torch.zeros(k, *x.shape[1:], device=x.device) if v0 is None else v0.clone()
    done = torch.zeros(k, dtype=torch.bool, device=x.device)
    success = torch.zeros(k, device=x.device)
    passes, last = 0, torch.full((k,), -1.0, device=x.device)
    for passes in range(1, max_passes + 1):
        for i in range(x.shape[0]):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            r = deepfool(model, x[i][None] + v[idx], targets[idx], p=p, overshoot=overshoot, max_iter=max_iter)
            moved = r.flatten(1).abs().amax(1) > 0
            if moved.any():
                sel = idx[moved]
                v[sel] = project(v[sel] + r[moved], delta, p)
            if progress is not None:  # the total grows pass by pass: an ETA for `max_passes` would mostly be wrong
                progress((passes - 1) * x.shape[0] + i + 1, passes * x.shape[0])
        success = targeted_success(model, x, y, v, targets)
        stalled = (success - last < stall) if passes >= 2 else torch.zeros_like(done)
        done = done | (success >= theta) | stalled
        last = success
        if done.all():
            break
    if progress is not None:
        progress(passes * x.shape[0], passes * x.shape[0])
    return TargetedUAPs(v=v, success=success, passes=passes)


@dataclass
class UntargetedUAP:
    """A single untargeted UAP and its fooling rate on the samples it was computed from."""

    v: torch.Tensor  # (C, H, W)
    epsilon: float
    fooling_rate: float
    passes: int


def untargeted_uap(
    model: nn.Module,
    x: torch.Tensor,
    *,
    epsilon: float,
    p: Norm,
    target_rate: float,
    max_passes: int,
    overshoot: float,
    max_iter: int,
    solver: Solver,
    batch: int = PGD_BATCH,
    progress: Progress | None = None,
) -> UntargetedUAP:
    """Xue et al.'s perturbation: one UAP fooling at least `target_rate` of x, with ||v||_p <= epsilon.

    solver "deepfool" is the UAP algorithm the paper cites: sample by sample, a DeepFool step (L2, as in the
    UAP reference code) for each sample not yet fooled, then projection. solver "pgd" ascends a clipped margin
    loss over mini-batches with signed steps of epsilon / 10 (the stochastic UAP of Shafahi et al., 2020).
    The v with the best fooling rate over the passes is returned.

    | argument | meaning | `FilterSettings` |
    |---|---|---|
    | `x` | clean samples (N, C, H, W) in [0, 1] | `samples` |
    | `epsilon`, `p` | radius and norm of the ball v is projected onto (L-inf in the paper) | `epsilon` |
    | `target_rate` | fooling rate at which the search stops | `fooling_rate` |
    | `max_passes` | passes over x at most | `max_passes` |
    | `overshoot`, `max_iter` | DeepFool's step scale and iterations (solver "deepfool") | `deepfool_iter` |
    | `solver`, `batch` | "deepfool" or "pgd"; the pgd mini-batch | `solver` |
    | `progress` | `(done, total)` sample steps | |
    """
    check_choice("solver", solver, Solver)
    labels = predict(model, x)
    v = torch.zeros(1, *x.shape[1:], device=x.device)
    best, best_rate, passes = v.clone(), -1.0, 0
    for passes in range(1, max_passes + 1):
        if solver == "deepfool":
            for i in range(x.shape[0]):
                xi = x[i][None]
                with torch.no_grad():
                    fooled = bool(model((xi + v).clamp(0, 1)).argmax(1) != labels[i])
                if not fooled:
                    r = deepfool(model, xi + v, None, p="l2", overshoot=overshoot, max_iter=max_iter)
                    v = project(v + r, epsilon, p)
        else:
            v = _margin_ascent_pass(model, x, labels, v, epsilon, p, batch)
        rate = fooling_rate(model, x, v[0], labels)
        if rate > best_rate:
            best, best_rate = v.clone(), rate
        if progress is not None:
            progress(passes, max_passes)
        if rate >= target_rate:
            break
    if progress is not None:
        progress(max_passes, max_passes)
    return UntargetedUAP(v=best[0], epsilon=epsilon, fooling_rate=best_rate, passes=passes)


def _margin_ascent_pass(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, v: torch.Tensor, epsilon: float, p: Norm, batch: int
) -> torch.Tensor:
    """One pass of signed-gradient steps lowering the (clipped) margin of each sample's clean label."""
    for xb, yb in zip(x.split(batch), labels.split(batch), strict=True):
        v = v.detach().requires_grad_(True)
        logits = model((xb + v).clamp(0, 1))
        own = logits.gather(1, yb[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(yb, logits.shape[1]).bool(), float("-inf")).amax(1)
        loss = (own - other).clamp(min=-1.0).mean()  # fooled samples stop pulling once past the boundary
        (grad,) = torch.autograd.grad(loss, v)
        step = grad.sign() if p == "linf" else grad / grad.norm().clamp_min(1e-12)
        v = project(v.detach() - epsilon / 10 * step, epsilon, p)
    return v
