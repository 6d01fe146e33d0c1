"""Hub-style model folders built offline: a transformers ViT and a timm ResNet, saved the way their libraries
save them (`save_pretrained`, timm's `save_for_hf`), for the tests and the formats table."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class Normalised(nn.Module):
    """Train a model that expects normalised inputs on [0, 1] pixels: (x - mean) / std in front of it."""

    def __init__(self, model: nn.Module, mean: float, std: float, hf: bool = False) -> None:
        super().__init__()
        self.model, self.mean, self.std, self.hf = model, mean, std, hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.model(pixel_values=x).logits if self.hf else self.model(x)


def tiny_vit(num_classes: int = 10, channels: int = 1, side: int = 28, names: tuple[str, ...] = DIGIT_NAMES):
    """A 2-layer ViT image classifier (patch 7, width 48) with id2label from `names`."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=side,
        patch_size=7,
        num_channels=channels,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        num_labels=num_classes,
        id2label={i: n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
    )
    return ViTForImageClassification(config)


def save_vit_folder(model: nn.Module, out: Path, side: int = 28, mean: float = 0.5, std: float = 0.5) -> Path:
    """`save_pretrained` of the model and of a ViTImageProcessor declaring the size, mean and std it was trained
    with (bilinear resample)."""
    from transformers import ViTImageProcessor

    model.save_pretrained(out)
    channels = model.config.num_channels
    ViTImageProcessor(
        size={"height": side, "width": side}, image_mean=[mean] * channels, image_std=[std] * channels, resample=2
    ).save_pretrained(out)
    return out


def tiny_timm(num_classes: int = 10, channels: int = 1):
    """timm's `test_resnet` (0.37 M parameters)."""
    import timm

    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes, in_chans=channels)


def save_timm_folder(
    model: nn.Module,
    out: Path,
    side: int = 28,
    mean: float = 0.5,
    std: float = 0.5,
    names: tuple[str, ...] | None = DIGIT_NAMES,
) -> Path:
    """timm's `save_for_hf` with safetensors, its pretrained_cfg set to the size, mean and std used in training."""
    from timm.models._hub import save_for_hf

    channels = _in_chans(model)
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "input_size": (channels, side, side),
        "mean": (mean,) * channels,
        "std": (std,) * channels,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    save_for_hf(model, str(out), model_config={"label_names": list(names)} if names else None, safe_serialization=True)
    return out


def _in_chans(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return 3
