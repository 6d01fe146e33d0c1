"""The UAP file (`--save-uap` / `--uap`): the screen's UAP rule as safetensors, with the sha256 of the model it
belongs to in its metadata, so that a deployment computes the UAP once and screens each new input with two
forward passes, and never screens with another model's UAP. Read with safetensors (no pickle), every tensor's
shape checked against the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ScanError

UAP_SCHEMA = "backdoorscan.uap/2"  # /1 (a single UAP, no thresholds) is not read


@dataclass
class UapFile:
    """A stored UAP rule (the UAP, per-class thresholds and class UAPs) and what it was made for."""

    v: torch.Tensor  # (C, H, W): the untargeted UAP
    thresholds: torch.Tensor  # (K,): per class, the survival margin that counts as a trigger
    class_v: dict[int, torch.Tensor]  # dominant class -> its own UAP
    epsilon: float
    fooling_rate: float
    model_sha256: str | None
    survival: torch.Tensor | None = None  # per class: share of clean samples the screen flags


def save_uap(path: Path, uap: UapFile) -> None:
    """Write the UAP as safetensors with its model's sha256 in the metadata."""
    from safetensors.torch import save_file

    meta = {
        "schema": UAP_SCHEMA,
        "epsilon": repr(uap.epsilon),
        "fooling_rate": repr(uap.fooling_rate),
        "model_sha256": uap.model_sha256 or "",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tensors = {
        "uap": uap.v.detach().cpu().contiguous(),
        "thresholds": uap.thresholds.detach().cpu().float().contiguous(),
    }
    if uap.class_v:
        classes = sorted(uap.class_v)
        tensors["class_uaps"] = torch.stack([uap.class_v[c].detach().cpu() for c in classes]).contiguous()
        tensors["class_uap_classes"] = torch.tensor(classes, dtype=torch.int64)
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
            keys = set(fh.keys())
            v = fh.get_tensor("uap")
            survival = fh.get_tensor("survival") if "survival" in keys else None
            thresholds = fh.get_tensor("thresholds") if "thresholds" in keys else None
            class_v = fh.get_tensor("class_uaps") if "class_uaps" in keys else None
            classes = fh.get_tensor("class_uap_classes") if "class_uap_classes" in keys else None
    except Exception as exc:
        raise ScanError(f"not a UAP file ({str(exc)[:80]})", path=path, hint="create it with --save-uap") from exc
    if meta.get("schema") != UAP_SCHEMA:
        raise ScanError(
            "not a backdoorscan UAP file of this version", path=path, hint="create it (again) with --save-uap"
        )
    stored = meta.get("model_sha256") or None
    if stored and model_sha256 and stored != model_sha256:
        raise ScanError(
            f"this UAP was computed for another model (sha256 {stored[:12]}..., this model {model_sha256[:12]}...)",
            path=path,
            hint="compute a new one with --save-uap",
        )
    if tuple(v.shape) != tuple(shape):
        raise ScanError(f"the UAP has shape {tuple(v.shape)} but the model takes {tuple(shape)}", path=path)
    if thresholds is None or thresholds.ndim != 1 or not bool(torch.isfinite(thresholds).all()):
        raise ScanError(
            "the UAP file has no valid per-class thresholds", path=path, hint="create it again with --save-uap"
        )
    per_class: dict[int, torch.Tensor] = {}
    if (class_v is None) != (classes is None):
        raise ScanError("the UAP file has class UAPs without their classes, or the reverse", path=path)
    if class_v is not None and classes is not None:
        if class_v.ndim != 4 or tuple(class_v.shape[1:]) != tuple(shape) or tuple(classes.shape) != (len(class_v),):
            raise ScanError(
                f"the class UAPs have shape {tuple(class_v.shape)} for classes "
                f"{tuple(classes.shape)}; the model takes {tuple(shape)}",
                path=path,
            )
        if any(not 0 <= int(c) < len(thresholds) for c in classes.tolist()):
            raise ScanError("the UAP file has class UAPs for classes it has no threshold for", path=path)
        per_class = {int(c): u.float() for c, u in zip(classes.tolist(), class_v, strict=True)}
    return UapFile(
        v=v.float(),
        thresholds=thresholds.float(),
        class_v=per_class,
        epsilon=float(meta.get("epsilon", "nan")),
        fooling_rate=float(meta.get("fooling_rate", "nan")),
        model_sha256=stored,
        survival=survival,
    )
