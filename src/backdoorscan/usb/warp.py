"""Warping backdoors (WaNet: Nguyen & Tran, ICLR 2021): per target class, the smallest smooth universal warp that
sends other classes' samples to it.

A WaNet trigger is no patch: it moves pixels by a fraction of a pixel along a smooth field drawn from a k x k
control grid, and noise-mode training makes the model ignore any other small warp. A patch inversion (USB, Neural
Cleanse) cannot express it. Here, per target (the class dimension is a batch dimension), a control grid of
`grid` x `grid` displacements is upsampled (bicubic) to a field over the image and applied with `grid_sample`, in
pixel space like every other perturbation of the scan; the loss is the cross-entropy toward the target plus
`cost` times the field's mean squared displacement (in pixels). A backdoor target needs an outlier-small warp.

| argument | meaning |
|---|---|
| `targets` | the classes to invert a warp for |
| `steps`, `lr` | Adam steps and learning rate on the control grids |
| `per_class` | samples of other classes each target's warp is fitted on |
| `cost` | weight of the mean squared displacement (pixels^2) |
| `grid` | control points per side (WaNet's k; 4 in the paper) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .batching import in_class_groups, slice_progress


@dataclass
class Warps:
    """Reversed warps, one per target: the control grids, the mean displacement in pixels, the success rate."""

    targets: list[int]
    control: torch.Tensor  # (T, 2, grid, grid) displacements in grid_sample's [-1, 1] units
    displacement: np.ndarray  # (T,) mean |displacement| over the image, in pixels
    asr: np.ndarray  # (T,) share of other classes' samples the warp sends to the target

    def fields(self, size: tuple[int, int]) -> torch.Tensor:
        """(T, 2, H, W) displacement fields in pixels (x then y), for images of the warps."""
        return pixel_fields(self.control, size)


def upsample(control: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Control grids (T, 2, k, k) -> smooth fields (T, 2, H, W), bicubic as WaNet draws its own."""
    return F.interpolate(control, size=size, mode="bicubic", align_corners=True)


def apply_warp(x: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """x (T, n, C, H, W) or (n, C, H, W) warped by each target's field -> (T, n, C, H, W), clipped to [0, 1]."""
    t = control.shape[0]
    if x.dim() == 4:
        x = x[None].expand(t, *x.shape)
    _, n, c, h, w = x.shape
    flow = upsample(control, (h, w)).permute(0, 2, 3, 1)  # (T, H, W, 2)
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device), indexing="ij"
    )
    grid = torch.stack((xs, ys), -1)[None] + flow  # grid_sample wants (x, y)
    grid = grid[:, None].expand(t, n, h, w, 2).reshape(t * n, h, w, 2)
    out = F.grid_sample(x.reshape(t * n, c, h, w), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(t, n, c, h, w).clamp(0, 1)


def pixel_fields(control: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The fields of control grids (T, 2, k, k) in pixels: (T, 2, H, W), x then y."""
    h, w = size
    flow = upsample(control, size)
    scale = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=control.device).view(1, 2, 1, 1)
    return flow * scale


def _other_rows(y: torch.Tensor, targets: list[int], n: int) -> torch.Tensor:
    """(T, n) indices of samples not of each target, spread over the sample order."""
    rows = []
    for t in targets:
        other = torch.nonzero(y != t).flatten()
        step = max(1, len(other) // n)
        pick = other[::step][:n]
        rows.append(pick.repeat(-(-n // len(pick)))[:n])
    return torch.stack(rows)


def invert_warps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: list[int],
    *,
    steps: int,
    lr: float,
    per_class: int,
    cost: float,
    grid: int,
    group: int,
    progress: Callable[[int, int], None] | None = None,
) -> Warps:
    """A warp per target, `group` targets per batch (a GPU out of memory halves the group, as for classes)."""
    control = torch.cat(
        in_class_groups(
            lambda sl: _invert(
                model,
                x,
                y,
                targets[sl],
                steps=steps,
                lr=lr,
                per_class=per_class,
                cost=cost,
                grid=grid,
                progress=slice_progress(progress, sl, len(targets)),
            ),
            len(targets),
            group,
        )
    )
    with torch.no_grad():
        displacement = pixel_fields(control, (x.shape[-2], x.shape[-1])).norm(dim=1).flatten(1).mean(1)
    return Warps(
        targets=list(targets),
        control=control,
        displacement=displacement.cpu().numpy(),
        asr=warp_success(model, x, y, targets, control),
    )


def _invert(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: list[int],
    *,
    steps: int,
    lr: float,
    per_class: int,
    cost: float,
    grid: int,
    progress: Callable[[int, int], None],
) -> torch.Tensor:
    """The control grids (T, 2, grid, grid) of one group of targets."""
    rows = _other_rows(y, targets, per_class).to(x.device)
    wanted = torch.tensor(targets, device=x.device).repeat_interleave(per_class)
    control = torch.zeros(len(targets), 2, grid, grid, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([control], lr=lr)
    xb = x[rows]
    for step in range(steps):
        warped = apply_warp(xb, control)
        ce = F.cross_entropy(model(warped.flatten(0, 1)), wanted, reduction="none").view(len(targets), -1).mean(1)
        size = pixel_fields(control, (x.shape[-2], x.shape[-1])).pow(2).flatten(1).mean(1)
        loss = (ce + cost * size).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(step + 1, steps)
    return control.detach()


@torch.no_grad()
def warp_success(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: list[int], control: torch.Tensor
) -> np.ndarray:
    """Per target: the share of samples of other classes that its warp sends to it."""
    out = np.zeros(len(targets))
    for i, t in enumerate(targets):
        warped = apply_warp(x, control[i : i + 1])[0]
        other = y != t
        out[i] = float((model(warped[other]).argmax(1) == t).float().mean()) if other.any() else 0.0
    return out
