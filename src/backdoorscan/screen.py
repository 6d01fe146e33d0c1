"""Xue et al.'s rule: an input whose prediction survives the untargeted UAP carries a trigger.

Also the UAP file (`--save-uap` / `--uap`): a safetensors file with the perturbation and, in its metadata, the
sha256 of the model it belongs to, so that a deployment computes the UAP once and screens each new input with
two forward passes, and never screens with another model's UAP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ScanError

UAP_SCHEMA = "backdoorscan.uap/1"


@torch.no_grad()
def uap_rule(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions without and with the UAP; an image is flagged where they agree."""
    before = model(x).argmax(1)
    after = model((x + v).clamp(0, 1)).argmax(1)
    return before, after


@dataclass
class UapFile:
    """A stored untargeted UAP and what it was made for."""

    v: torch.Tensor  # (C, H, W)
    epsilon: float
    fooling_rate: float
    model_sha256: str | None
    survival: torch.Tensor | None = None  # per class: share of clean samples whose prediction survives v


def save_uap(path: Path, uap: UapFile) -> None:
    """Write the UAP as safetensors with its model's sha256 in the metadata."""
    from safetensors.torch import save_file

    meta = {"schema": UAP_SCHEMA, "epsilon": repr(uap.epsilon), "fooling_rate": repr(uap.fooling_rate),
            "model_sha256": uap.model_sha256 or ""}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tensors = {"uap": uap.v.detach().cpu().contiguous()}
    if uap.survival is not None:
        tensors["survival"] = uap.survival.detach().cpu().float().contiguous()
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_uap(path: Path, model_sha256: str | None, shape: tuple[int, int, int]) -> UapFile:
    """Read a UAP file; refuse one made for another model or another input shape."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ScanError("UAP file not found", path=path, hint="create it with --save-uap")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            v = fh.get_tensor("uap")
            survival = fh.get_tensor("survival") if "survival" in fh.keys() else None  # noqa: SIM118
    except Exception as exc:
        raise ScanError(f"not a UAP file ({str(exc)[:80]})", path=path, hint="create it with --save-uap") from exc
    if meta.get("schema") != UAP_SCHEMA:
        raise ScanError("not a backdoorscan UAP file", path=path, hint="create it with --save-uap")
    stored = meta.get("model_sha256") or None
    if stored and model_sha256 and stored != model_sha256:
        raise ScanError(f"this UAP was computed for another model (sha256 {stored[:12]}..., this model "
                        f"{model_sha256[:12]}...)", path=path, hint="compute a new one with --save-uap")
    if tuple(v.shape) != tuple(shape):
        raise ScanError(f"the UAP has shape {tuple(v.shape)} but the model takes {tuple(shape)}", path=path)
    return UapFile(v=v.float(), epsilon=float(meta.get("epsilon", "nan")),
                   fooling_rate=float(meta.get("fooling_rate", "nan")), model_sha256=stored, survival=survival)
