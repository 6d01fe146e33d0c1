"""Backdoor attacks by data poisoning: BadNets patches and blended triggers, on uint8-free [0, 1] tensors."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class Attack:
    """A trigger and its target class; `apply` stamps it on (N, C, H, W) images in [0, 1]."""

    target: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": type(self).__name__.lower(), **asdict(self)}


@dataclass
class BadNets(Attack):
    """A size x size patch at (row, col) (Gu et al., 2019): one colour ("solid"), a fixed random pattern
    ("random") or a checkerboard of the colour and its complement ("checkerboard")."""

    size: int = 3
    row: int = 0
    col: int = 0
    color: tuple[float, ...] = (1.0,)
    pattern: str = "solid"
    seed: int = 0

    def patch(self, channels: int, device: torch.device | None = None) -> torch.Tensor:
        """The (C, size, size) patch in [0, 1]."""
        color = torch.tensor(self.color).view(-1, 1, 1).expand(channels, self.size, self.size)
        if self.pattern == "random":
            g = torch.Generator().manual_seed(self.seed)
            return torch.rand(channels, self.size, self.size, generator=g).to(device)
        if self.pattern == "checkerboard":
            board = (torch.arange(self.size)[:, None] + torch.arange(self.size)[None]) % 2 == 0
            return torch.where(board, color, 1 - color).to(device)
        if self.pattern != "solid":
            raise ValueError(f"unknown pattern {self.pattern!r}")
        return color.to(device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, :, self.row : self.row + self.size, self.col : self.col + self.size] = self.patch(x.shape[1], x.device)
        return out


@dataclass
class Blend(Attack):
    """A random full-image pattern blended with weight alpha (Chen et al., 2017)."""

    alpha: float = 0.15
    seed: int = 0
    shape: tuple[int, int, int] = (1, 28, 28)

    def pattern(self, device: torch.device | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(self.shape, generator=g).to(device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.pattern(x.device)[None]


POSITIONS = ("random", "corner", "centre")


def make_attack(
    kind: str,
    shape: tuple[int, int, int],
    num_classes: int,
    rng: np.random.Generator,
    size: int = 3,
    alpha: float = 0.15,
    position: str = "random",
    pattern: str = "solid",
) -> Attack:
    """A random attack as in the USB paper: random target, position and colour (BadNets) or pattern (blend).

    `position` "corner" puts the patch in one of the four corners (one pixel in), "centre" in the middle.
    """
    c, h, w = shape
    target = int(rng.integers(num_classes))
    if kind == "badnets":
        color = (
            tuple(float(v) for v in rng.uniform(0.5, 1.0, c))
            if c == 1
            else tuple(float(v) for v in rng.integers(0, 2, c) * 0.8 + rng.uniform(0.0, 0.2, c))
        )
        if position == "corner":
            row, col = int(rng.choice([1, h - size - 1])), int(rng.choice([1, w - size - 1]))
        elif position == "centre":
            row, col = (h - size) // 2, (w - size) // 2
        else:
            row, col = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        return BadNets(
            target=target, size=size, row=row, col=col, color=color, pattern=pattern, seed=int(rng.integers(2**31))
        )
    if kind == "blend":
        return Blend(target=target, alpha=alpha, seed=int(rng.integers(2**31)), shape=shape)
    raise ValueError(f"unknown attack {kind!r}")


def poison(
    x: torch.Tensor, y: torch.Tensor, attack: Attack, rate: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Stamp the trigger on `rate` of the samples not already of the target class and relabel them."""
    candidates = np.flatnonzero(y.numpy() != attack.target)
    chosen = rng.choice(candidates, size=int(round(rate * len(y))), replace=False)
    x, y = x.clone(), y.clone()
    x[chosen] = attack.apply(x[chosen])
    y[chosen] = attack.target
    return x, y, chosen
