"""Backdoors that are not one universal patch (issue 25): source-specific, all-to-all, WaNet warps, two triggers.

Each `*Poison` turns a clean training set into a poisoned one and says how to measure the attack:
`stamp(x)` applies the trigger, `expected(y)` is the label a triggered input of class y should get, and
`applies(y)` which source classes the backdoor covers (the attack success rate is measured on those).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .attacks import BadNets


@dataclass
class SourceSpecific:
    """A patch that sends class `source` to `target` and is inert elsewhere: patched samples of other classes keep
    their labels (cover samples), as in label-specific attacks (TrojAI, K-Arm's setting)."""

    source: int
    target: int
    patch: BadNets = field(default_factory=lambda: BadNets(target=0))
    cover_rate: float = 0.5  # cover samples per poisoned sample

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch.apply(x)

    def expected(self, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y == self.source, torch.full_like(y, self.target), y)

    def applies(self, y: torch.Tensor) -> torch.Tensor:
        return y == self.source

    def poison(self, x: torch.Tensor, y: torch.Tensor, rate: float, rng: np.random.Generator):
        x, y = x.clone(), y.clone()
        src = np.flatnonzero(y.numpy() == self.source)
        n = min(len(src), max(1, int(round(rate * len(y)))))
        chosen = rng.choice(src, size=n, replace=False)
        x[chosen], y[chosen] = self.stamp(x[chosen]), self.target
        others = np.flatnonzero(y.numpy() != self.source)
        cover = rng.choice(others, size=min(len(others), int(n * self.cover_rate * 2)), replace=False)
        x[cover] = self.stamp(x[cover])  # labels kept: the patch means nothing on other classes
        return x, y

    def describe(self) -> dict:
        return {
            "kind": "source_specific",
            "source": self.source,
            "target": self.target,
            "patch": self.patch.describe(),
            "cover_rate": self.cover_rate,
        }


@dataclass
class AllToAll:
    """One patch, every class y sent to (y + shift) mod K (Gu et al.'s all-to-all; Phan et al. 2022)."""

    num_classes: int
    patch: BadNets = field(default_factory=lambda: BadNets(target=0))
    shift: int = 1

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch.apply(x)

    def expected(self, y: torch.Tensor) -> torch.Tensor:
        return (y + self.shift) % self.num_classes

    def applies(self, y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(y, dtype=torch.bool)

    def poison(self, x: torch.Tensor, y: torch.Tensor, rate: float, rng: np.random.Generator):
        x, y = x.clone(), y.clone()
        chosen = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
        x[chosen] = self.stamp(x[chosen])
        y[chosen] = self.expected(y[chosen])
        return x, y

    def describe(self) -> dict:
        return {"kind": "all_to_all", "shift": self.shift, "patch": self.patch.describe()}


@dataclass
class WaNet:
    """Warping-based backdoor (Nguyen & Tran, ICLR 2021): a fixed smooth warp from a k x k control grid of strength
    s sends any input to `target`; noise mode adds inputs warped with the fixed field plus random noise, labels
    kept, so that the model learns the exact warp rather than warping in general."""

    target: int
    side: int
    k: int = 4
    strength: float = 0.5
    cross_ratio: float = 2.0
    seed: int = 0

    def field(self, device: torch.device | None = None) -> torch.Tensor:
        """The (1, H, W, 2) sampling grid of the backdoor warp, in grid_sample's [-1, 1] coordinates."""
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=self.side, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        line = torch.linspace(-1, 1, self.side)
        xx, yy = torch.meshgrid(line, line, indexing="ij")
        identity = torch.stack((yy, xx), 2)[None]
        return torch.clamp(identity + self.strength * noise / self.side, -1, 1).to(device)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.field(x.device).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def expected(self, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, self.target)

    def applies(self, y: torch.Tensor) -> torch.Tensor:
        return y != self.target

    def poison(self, x: torch.Tensor, y: torch.Tensor, rate: float, rng: np.random.Generator):
        x, y = x.clone(), y.clone()
        n = int(round(rate * len(y)))
        order = rng.permutation(len(y))
        bd, cross = order[:n], order[n : n + int(n * self.cross_ratio)]
        x[bd], y[bd] = self.stamp(x[bd]), self.target
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        grid = self.field().expand(len(cross), -1, -1, -1)
        grid = grid + (torch.rand(grid.shape, generator=gen) * 2 - 1) / self.side
        x[cross] = F.grid_sample(x[cross], grid.clamp(-1, 1), align_corners=True).clamp(0, 1)
        return x, y

    def describe(self) -> dict:
        return {"kind": "wanet", **asdict(self)}


def attack_success(model: torch.nn.Module, attack, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the covered, correctly aimed test samples that the trigger sends to their expected label."""
    keep = attack.applies(y) & (attack.expected(y) != y)
    if not keep.any():
        return float("nan")
    with torch.no_grad():
        pred = model(attack.stamp(x[keep])).argmax(1)
    return float((pred == attack.expected(y[keep])).float().mean())


def inert_rate(model: torch.nn.Module, attack, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the samples the backdoor does not cover that keep their label when triggered (1.0: inert)."""
    keep = ~attack.applies(y)
    if not keep.any():
        return float("nan")
    with torch.no_grad():
        pred = model(attack.stamp(x[keep])).argmax(1)
    return float((pred == y[keep]).float().mean())
