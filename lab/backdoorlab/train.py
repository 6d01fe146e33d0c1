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
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack | None = None,
             batch: int = 1000) -> tuple[float, float | None]:
    """Clean accuracy on (x, y) and ASR: share of triggered non-target samples classified as the target."""
    model.eval()
    pred = torch.cat([model(c).argmax(1) for c in x.split(batch)])
    acc = float((pred == y).float().mean())
    if attack is None:
        return acc, None
    keep = y != attack.target
    xt = attack.apply(x[keep])
    pred_t = torch.cat([model(c).argmax(1) for c in xt.split(batch)])
    return acc, float((pred_t == attack.target).float().mean())


def train_classifier(arch: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                     y_test: torch.Tensor, *, attack: Attack | None = None, poison_rate: float = 0.1,
                     epochs: int = 6, lr: float = 0.05, batch: int = 128, seed: int = 0,
                     device: str | torch.device = "cpu") -> TrainResult:
    """SGD with momentum and a cosine schedule; x in [0, 1] (N, C, H, W). Deterministic for a given seed."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = None
    if attack is not None:
        x, y, rows = poison(x, y, attack, poison_rate, rng)
    device = torch.device(device)
    model = arch().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(batch):
            xb, yb = x[idx].to(device), y[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    acc, asr = evaluate(model, x_test.to(device), y_test.to(device), attack)
    return TrainResult(model=model.cpu(), accuracy=acc, asr=asr, attack=attack, poisoned_rows=rows)
