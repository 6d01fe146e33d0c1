"""Neural Cleanse's per-class L1 weight schedule, also in the USB authors' refinement code.

Per class, the weight of the trigger's L1 starts at `init`; after every epoch (a pass over the samples) the
trigger's success rate over that epoch decides: `patience` epochs in a row at or above `goal` multiply the weight
by `up`, as many below divide it by `up ** 1.5`. The smallest trigger that reached `goal` over an epoch is kept.
The weight thus climbs until the trigger is as small as it can be while it still works, which a fixed weight
does not do: the diffuse low mask values it leaves add up over the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CostSchedule:
    """The running state of the schedule for K classes (see the module docstring)."""

    cost: torch.Tensor  # (K,) the current L1 weights
    best: torch.Tensor  # (K,) the smallest size that reached the goal so far (inf: none yet)
    epoch: int  # steps per epoch
    goal: float = 0.99
    patience: int = 5
    up: float = 1.5

    def __post_init__(self) -> None:
        zeros = torch.zeros_like(self.cost)
        self._up, self._down, self._hits, self._seen, self._steps = zeros, zeros.clone(), zeros.clone(), 0, 0

    @classmethod
    def start(cls, k: int, *, init: float, epoch: int, device: torch.device, **rule: Any) -> CostSchedule:
        """A schedule for `k` classes at weight `init`, deciding every `epoch` steps (`rule`: goal, patience, up)."""
        return cls(
            cost=torch.full((k,), init, device=device),
            best=torch.full((k,), float("inf"), device=device),
            epoch=max(1, epoch),
            **rule,
        )

    @torch.no_grad()
    def step(self, hits: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """Count one step's hits (K, B) on the target; at an epoch's end adjust the weights. Returns the classes
        whose current trigger (of `size`, (K,)) is the new smallest that works: the caller keeps those."""
        self._hits = self._hits + hits.float().sum(1)
        self._seen += hits.shape[1]
        self._steps += 1
        if self._steps % self.epoch:
            return torch.zeros_like(self.best, dtype=torch.bool)
        good = self._hits / self._seen >= self.goal
        better = good & (size < self.best)
        self.best = torch.where(better, size, self.best)
        self._up = torch.where(good, self._up + 1, torch.zeros_like(self._up))
        self._down = torch.where(good, torch.zeros_like(self._down), self._down + 1)
        self.cost = torch.where(self._up >= self.patience, self.cost * self.up, self.cost)
        self.cost = torch.where(self._down >= self.patience, self.cost / self.up**1.5, self.cost)
        self._up = torch.where(self._up >= self.patience, torch.zeros_like(self._up), self._up)
        self._down = torch.where(self._down >= self.patience, torch.zeros_like(self._down), self._down)
        self._hits, self._seen = torch.zeros_like(self._hits), 0
        return better

    @property
    def never(self) -> torch.Tensor:
        """Classes whose trigger never reached the goal over an epoch."""
        return torch.isinf(self.best)
