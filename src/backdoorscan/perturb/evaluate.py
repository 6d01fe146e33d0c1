"""How a model answers perturbed inputs: predictions in batches, targeted success rates per class, fooling rate.

Shared by the searches (Alg. 1, the refinement, the families), the evidence checks and the dataset screen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Labels of x, in batches, on x's device."""
    return torch.cat([model(chunk).argmax(1) for chunk in x.split(batch)])


@torch.no_grad()
def success_rates(
    model: nn.Module,
    y: torch.Tensor,
    targets: torch.Tensor,
    perturbed: Callable[[slice], torch.Tensor],
    n: int,
    batch: int = 2048,
) -> torch.Tensor:
    """Per target t: share of the n samples not of class t whose perturbed copy the model sends to t.

    `perturbed(sl)` returns the samples perturbed for the classes targets[sl], shaped (len(sl), n, C, H, W);
    classes are taken in chunks so that about `batch` images go through the model at once.
    """
    rates = torch.zeros(len(targets), device=y.device)
    per = max(1, batch // max(1, n))
    for start in range(0, len(targets), per):
        sl = slice(start, start + per)
        ts = targets[sl]
        pred = predict(model, perturbed(sl).flatten(0, 1), batch).view(len(ts), -1)
        others = y[None] != ts[:, None]
        rates[sl] = ((pred == ts[:, None]) & others).sum(1) / others.sum(1).clamp_min(1)
    return rates


def targeted_success(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Per target t: share of the samples not of class t that f(clip(x + v_t)) sends to t."""
    return success_rates(model, y, targets, lambda sl: (x[None] + v[sl, None]).clamp(0, 1), x.shape[0])


@torch.no_grad()
def fooling_rate(model: nn.Module, x: torch.Tensor, v: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """Share of samples whose predicted label changes when v is added."""
    before = predict(model, x) if labels is None else labels
    after = predict(model, (x + v).clamp(0, 1))
    return float((before != after).float().mean())
