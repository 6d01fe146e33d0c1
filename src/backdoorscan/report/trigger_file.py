"""The triggers file (`triggers.safetensors` in a model scan's `--out`): every trigger the scan flagged, for the
dataset screen's erasure rule (`filter --method erase --triggers`). Safetensors (no pickle) with the sha256 of
the model it was reversed on, so a screen never erases another model's triggers; every tensor's shape, every
class and every family name checked on reading, since the file may come from anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ScanError
from .tensor_file import Field, read_tensors

TRIGGERS_SCHEMA = "backdoorscan.triggers/1"
FAMILIES = ("universal", "source-specific", "all-to-all", "shared")  # where a patch came from (shared: alltoall.py)
MAX_TRIGGERS = 4096  # patches or warps in one file: a 1,000-class scan names far fewer


@dataclass
class TriggerFile:
    """Reversed triggers and the model they belong to. A patch is a region (where the trigger sits, in [0, 1]),
    its target and, for a pair, its source (-1: any class); a warp is a control grid (`usb.warp`) and its target."""

    regions: torch.Tensor  # (N, 1, H, W) in [0, 1]
    targets: list[int]  # (N,)
    sources: list[int]  # (N,) -1 where the trigger is not tied to one source
    families: list[str]  # (N,) one of FAMILIES
    warps: torch.Tensor  # (W, 2, g, g) control grids in grid_sample units
    warp_targets: list[int]  # (W,)
    model_sha256: str | None

    def describe(self) -> list[dict]:
        """One line per trigger for reports: family, target and source."""
        patches = [
            {"family": f, "target": t, "source": None if s < 0 else s}
            for f, t, s in zip(self.families, self.targets, self.sources, strict=True)
        ]
        return patches + [{"family": "warp", "target": t, "source": None} for t in self.warp_targets]


def save_triggers(path: Path, found: TriggerFile) -> None:
    """Write the triggers as safetensors, families and model sha256 in the metadata."""
    from safetensors.torch import save_file

    meta = {
        "schema": TRIGGERS_SCHEMA,
        "model_sha256": found.model_sha256 or "",
        "families": json.dumps(found.families),
    }
    tensors = {
        "regions": found.regions.detach().cpu().float().contiguous(),
        "targets": torch.tensor(found.targets, dtype=torch.int64),
        "sources": torch.tensor(found.sources, dtype=torch.int64),
        "warps": found.warps.detach().cpu().float().contiguous(),
        "warp_targets": torch.tensor(found.warp_targets, dtype=torch.int64),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


FIELDS = {
    "regions": Field("float", 4),
    "targets": Field("int", 1),
    "sources": Field("int", 1),
    "warps": Field("float", 4),
    "warp_targets": Field("int", 1),
}


def load_triggers(path: Path, model_sha256: str | None, size: tuple[int, int], num_classes: int) -> TriggerFile:
    """Read a triggers file; refuse one made for another model, another input size, other classes, or none."""
    path = Path(path)
    hint = "write it with `backdoorscan model ... --out DIR` (DIR/triggers.safetensors)"
    # at most MAX_TRIGGERS regions of the model's size and as many warp grids no finer than its pixels
    bound = MAX_TRIGGERS * (size[0] * size[1] + 2 * max(size) ** 2 + 3)
    meta, tensors = read_tensors(path, FIELDS, max_elements=bound, what="triggers file", hint=hint)
    if meta.get("schema") != TRIGGERS_SCHEMA:
        raise ScanError("not a backdoorscan triggers file of this version", path=path, hint=hint)
    stored = meta.get("model_sha256") or None
    if stored and model_sha256 and stored != model_sha256:
        raise ScanError(
            f"these triggers were reversed on another model (sha256 {stored[:12]}..., this model "
            f"{model_sha256[:12]}...)",
            path=path,
            hint="scan this model and use its triggers",
        )
    try:
        families = json.loads(meta.get("families", ""))
    except ValueError:
        families = None
    regions, targets, sources = tensors["regions"], tensors["targets"], tensors["sources"]
    warps, warp_targets = tensors["warps"], tensors["warp_targets"]
    n, w = len(targets), len(warp_targets)
    if not (isinstance(families, list) and len(families) == n and all(f in FAMILIES for f in families)):
        raise ScanError(f"the triggers file's families are not {n} of {', '.join(FAMILIES)}", path=path)
    if (
        tuple(regions.shape) != (n, 1, *size)
        or tuple(sources.shape) != (n,)
        or warps.shape[0] != w
        or warps.shape[1] != 2
        or warps.shape[2] != warps.shape[3]
        or (w > 0 and not 2 <= warps.shape[2] <= max(size))
    ):
        raise ScanError(
            f"the triggers file's tensors do not fit a model taking {size[0]}x{size[1]} images "
            f"(regions {tuple(regions.shape)}, warps {tuple(warps.shape)})",
            path=path,
        )
    if n + w == 0 or n + w > MAX_TRIGGERS:
        raise ScanError(f"the triggers file holds {n + w} triggers (1 to {MAX_TRIGGERS})", path=path, hint=hint)
    classes = targets.tolist() + warp_targets.tolist()
    if any(not 0 <= c < num_classes for c in classes) or any(not -1 <= s < num_classes for s in sources.tolist()):
        raise ScanError(f"the triggers file names classes outside the model's {num_classes}", path=path)
    return TriggerFile(
        regions=regions.float().clamp(0, 1),
        targets=targets.tolist(),
        sources=sources.tolist(),
        families=families,
        warps=warps.float(),
        warp_targets=warp_targets.tolist(),
        model_sha256=stored,
    )
