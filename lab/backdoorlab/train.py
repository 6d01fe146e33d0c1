"""Train a classifier, optionally on poisoned data, and measure clean accuracy and attack success rate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import Attack, poison


@dataclass
class TrainResult:
    """A trained model with its clean accuracy and, when backdoored, its attack success rate."""

    model: nn.Module
    accuracy: float
    asr: float | None
    attack: Attack | None
    poisoned_rows: np.ndarray | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack | None = None, batch: int = 1000
) -> tuple[float, float | None]:
    """Clean accuracy on (x, y) and ASR: share of triggered non-target samples classified as the target."""
    model.eval()
    pred = torch.cat([model(c).argmax(1) for c in x.split(batch)])
    acc = float((pred == y).float().mean())
    if attack is None:
        return acc, None
    if hasattr(attack, "expected"):  # the families of backdoorlab.families: per-source expectations
        from .families import attack_success

        return acc, attack_success(model, attack, x, y)
    keep = y != attack.target
    xt = attack.apply(x[keep])
    pred_t = torch.cat([model(c).argmax(1) for c in xt.split(batch)])
    return acc, float((pred_t == attack.target).float().mean())


def train_classifier(
    arch: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    attack: Attack | None = None,
    poison_rate: float = 0.1,
    epochs: int = 6,
    lr: float = 0.05,
    batch: int = 128,
    seed: int = 0,
    optimiser: str = "sgd",
    schedule: str = "onecycle",
    augment: str = "none",
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train on x in [0, 1] (N, C, H, W), poisoned with `attack` when given. Deterministic for a given seed.

    optimiser "sgd" (momentum 0.9, weight decay 5e-4) or "adam"; schedule "onecycle", "cosine" or "step" (x0.1 at
    two thirds); augment "none", "crop" (4-pixel shifts) or "crop+flip" (and horizontal flips). Poisoning comes
    before augmentation, as in a poisoned dataset.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = None
    if attack is not None and hasattr(attack, "poison"):  # source-specific, all-to-all, WaNet (families.py)
        x, y = attack.poison(x, y, poison_rate, rng)
    elif attack is not None:
        x, y, rows = poison(x, y, attack, poison_rate, rng)
    device = torch.device(device)
    model = arch().to(device)
    if optimiser == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, 2 * steps // 3), gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(batch):
            xb, yb = _augment(x[idx], augment, g).to(device), y[idx].to(device)
            if augment.startswith("pgd"):  # adversarial training (Madry et al.): a clean model inversion may flag
                xb = _pgd(model, xb, yb, float(augment.split(":")[1]) if ":" in augment else 0.1)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    acc, asr = evaluate(model, x_test.to(device), y_test.to(device), attack)
    return TrainResult(model=model.cpu(), accuracy=acc, asr=asr, attack=attack, poisoned_rows=rows)


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 3) -> torch.Tensor:
    """An L-inf PGD adversarial batch (random start, `steps` steps of eps/2), the model left in training mode."""
    delta = (torch.rand_like(x) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + eps / 2 * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def _augment(x: torch.Tensor, how: str, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 4 pixels (zero padding) and, with "flip", horizontal flips, per image."""
    if how == "none" or how.startswith("pgd"):
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    if "flip" in how:
        flip = torch.rand(n, generator=g) < 0.5
        out[flip] = out[flip].flip(-1)
    return out
