"""Images a person can look at: reversed triggers made visible, masks, stamped samples, one grid of all classes."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

MIN_SIDE = 112  # small inputs (28x28) are enlarged with nearest-neighbour so single pixels stay visible


def visible_perturbation(trigger: torch.Tensor, mask: torch.Tensor, form: str) -> torch.Tensor:
    """What the reversed trigger adds, scaled to [0, 1]: the masked pattern (blend) or 0.5 +- v (paper)."""
    v = trigger * mask
    if form == "blend":
        return v.clamp(0, 1)
    peak = v.abs().max().clamp_min(1e-8)
    return (0.5 + 0.5 * v / peak).clamp(0, 1)


def to_image(x: torch.Tensor, min_side: int = MIN_SIDE) -> Image.Image:
    """(C, H, W) in [0, 1] -> a PIL image, enlarged by an integer factor to at least `min_side` pixels."""
    x = x.detach().cpu().float().clamp(0, 1)
    if x.shape[0] not in (1, 3):
        x = x.mean(0, keepdim=True)
    arr = (x * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    factor = max(1, -(-min_side // max(image.size)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def trigger_grid(tiles: list[torch.Tensor], labels: list[str], flagged: list[bool], columns: int = 10) -> Image.Image:
    """One image of all classes' reversed triggers, captioned, flagged ones framed in red."""
    images = [to_image(t).convert("RGB") for t in tiles]
    w, h = images[0].size
    pad, caption = 6, 14
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (w + 2 * pad), rows * (h + 2 * pad + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label, flag) in enumerate(zip(images, labels, flagged, strict=True)):
        x0 = (i % cols) * (w + 2 * pad)
        y0 = (i // cols) * (h + 2 * pad + caption)
        if flag:
            draw.rectangle([x0, y0, x0 + w + 2 * pad - 1, y0 + h + 2 * pad - 1], fill=(220, 30, 30))
        grid.paste(image, (x0 + pad, y0 + pad))
        draw.text((x0 + pad, y0 + h + 2 * pad), label, fill=(220, 30, 30) if flag else (0, 0, 0))
    return grid
