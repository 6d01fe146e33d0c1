"""The model wrapper: the scan works on [0, 1] pixels at one size; resizing and mean/std live inside the model.

Keeping normalisation and resizing out of the perturbation space makes triggers and their L1 norms comparable
across models, whatever normalisation each model was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ScanError

PIXEL_LEVELS = 255  # deployed images are 8-bit: every input a model meets in use lies on the k/255 grid


@dataclass(frozen=True)
class InputSpec:
    """What the wrapped model takes: channels and size of [0, 1] images, and the model's own preprocessing."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    model_size: tuple[int, int] | None = None  # the size the model itself needs, when it differs
    grid: int | None = PIXEL_LEVELS  # inputs are rounded to k/grid (deployed 8-bit images); None: not rounded

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class PixelModel(nn.Module):
    """Maps [0, 1] images (B, C, H, W) to logits: resize to the model's size, round to the 8-bit grid, normalise,
    run the model.

    The rounding has a straight-through gradient: searches optimise as before, while the model only ever sees
    inputs a deployed pipeline could give it (a model that behaves differently off the grid cannot show the
    scanner a clean twin; `evidence.check_grid` measures whether it tries).
    """

    def __init__(self, model: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        c = spec.channels
        mean = torch.tensor(spec.mean if spec.mean is not None else [0.0] * c).view(1, -1, 1, 1)
        std = torch.tensor(spec.std if spec.std is not None else [1.0] * c).view(1, -1, 1, 1)
        self.normalise = spec.mean is not None or spec.std is not None
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor, on_grid: bool = True) -> torch.Tensor:
        if self.spec.model_size is not None and tuple(x.shape[-2:]) != self.spec.model_size:
            x = F.interpolate(x, size=self.spec.model_size, mode="bilinear", align_corners=False)
        if on_grid and self.spec.grid:
            levels = float(self.spec.grid)
            x = x + (torch.round(x * levels) / levels - x).detach()  # straight-through: identity gradient
        if self.normalise:
            x = (x - self.get_buffer("mean")) / self.get_buffer("std")
        return self.model(x)  # one logits tensor; anything else is caught by probe_outputs before a scan


def _per_channel(values: Sequence[float] | None, channels: int, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ScanError(
            f"--{name} has {len(values)} values but the model takes {channels} channels",
            hint=f"give one value or {channels}",
        )
    if name == "std" and any(v <= 0 for v in values):
        raise ScanError("--std values must be positive")
    return values


def first_conv_channels(model: nn.Module) -> int | None:
    """in_channels of the first Conv2d, the usual way to tell a grayscale model from an RGB one."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    for name, tensor in model.state_dict().items():  # TorchScript / exported graphs: first 4-D weight
        if name.endswith("weight") and tensor.ndim == 4:
            return int(tensor.shape[1])
    return None


def make_spec(
    model: nn.Module,
    declared: tuple[int | None, ...] | None,
    *,
    input_size: tuple[int, int] | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    data_size: tuple[int, int] | None = None,
) -> InputSpec:
    """Settle channels and size: the user's flags first, then what the file declares, then the data's own size."""
    declared_c = declared[1] if declared is not None and len(declared) == 4 else None
    declared_hw = tuple(declared[2:]) if declared is not None and len(declared) == 4 else None
    if declared_hw is not None and None in declared_hw:
        declared_hw = None
    c = channels or declared_c or first_conv_channels(model)
    if c is None:
        raise ScanError("cannot tell how many channels the model takes", hint="pass --channels 1 or 3")
    if channels and declared_c and channels != declared_c:
        raise ScanError(f"--channels {channels} disagrees with the model file, which takes {declared_c}")
    size = input_size or declared_hw or data_size
    if size is None:
        raise ScanError("cannot tell the model's input size", hint="pass --input-size HxW, e.g. 32x32")
    model_size = None
    if declared_hw is not None and tuple(declared_hw) != tuple(size):
        model_size = (int(declared_hw[0] or 0), int(declared_hw[1] or 0))
    return InputSpec(
        channels=int(c or 0),
        height=int(size[0] or 0),
        width=int(size[1] or 0),
        mean=_per_channel(mean, c, "mean"),
        std=_per_channel(std, c, "std"),
        model_size=model_size,
    )


@torch.no_grad()
def probe_outputs(
    model: nn.Module, spec: InputSpec, device: torch.device, num_classes: int | None = None
) -> tuple[int, str | None]:
    """Run a probe batch; returns the number of classes and, when the output is not one logits tensor, why.

    Non-finite, non-2-D or one-class outputs and a --num-classes mismatch are errors (exit 2); a tuple, list or
    dict of outputs is a reason for an inconclusive verdict: which member holds the logits is a guess.
    """
    probe = torch.rand(2, *spec.shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        out = model(probe)
    except Exception as exc:
        raise ScanError(
            f"the model fails on (2, {spec.channels}, {spec.height}, {spec.width}) inputs: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}",
            hint="check --input-size and --channels",
        ) from exc
    if not isinstance(out, torch.Tensor):
        members = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else []
        widths = [int(t.shape[-1]) for t in members if isinstance(t, torch.Tensor) and t.ndim == 2]
        kind = type(out).__name__
        return (widths[-1] if widths else 0), (
            f"the model returns a {kind} of {len(members)} outputs, not one "
            "logits tensor: which one holds the logits would be a guess"
        )
    if out.ndim != 2:
        raise ScanError(f"the model's output has shape {tuple(out.shape)}; a classifier gives (batch, classes)")
    if not torch.isfinite(out).all():
        raise ScanError("the model's output is not finite (NaN or inf)", hint="the weights may be corrupt")
    k = int(out.shape[1])
    if num_classes is not None and num_classes != k:
        raise ScanError(
            f"--num-classes {num_classes} disagrees with the model, which outputs {k} classes",
            hint=f"use --num-classes {k} or leave it out",
        )
    if k < 2:
        raise ScanError("the model outputs fewer than 2 classes")
    return k, None
