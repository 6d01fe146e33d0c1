"""STRIP (Gao et al., ACSAC 2019): blend the input with clean images; a trigger keeps the predictions certain.

Each input is superimposed (averaged) with `blends` clean images; its score is the mean Shannon entropy of the
model's softmax over those blends. A trigger-carrying input keeps predicting the target, so its entropy is low.
The threshold is the `frr` quantile of the clean samples' own entropies (each blended with the other clean
images), i.e. the chosen false rejection rate on clean data.
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def strip_entropy(
    model: nn.Module, x: torch.Tensor, clean: torch.Tensor, blends: int = 32, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mean prediction entropy of each image of x over `blends` superimpositions with clean images."""
    pick = torch.randint(0, clean.shape[0], (x.shape[0], blends), generator=generator).to(clean.device)
    mixed = (0.5 * x[:, None] + 0.5 * clean[pick]).flatten(0, 1)
    probs = torch.softmax(model(mixed), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return entropy.view(x.shape[0], blends).mean(1)


def strip_threshold(
    model: nn.Module, clean: torch.Tensor, frr: float = 0.1, blends: int = 32, generator: torch.Generator | None = None
) -> float:
    """Entropy below which an input is flagged, so that `frr` of the clean samples would be flagged."""
    scores = torch.cat([strip_entropy(model, chunk, clean, blends, generator) for chunk in clean.split(64)])
    return float(torch.quantile(scores.double().cpu(), frr))
