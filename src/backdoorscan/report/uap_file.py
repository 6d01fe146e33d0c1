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
from .tensor_file import Field, read_tensors

UAP_SCHEMA = "backdoorscan.uap/2"  # /1 (a single UAP, no thresholds) is not read
MAX_CLASS_UAPS = 100_000  # classes a UAP file may have thresholds (and class UAPs) for
FIELDS = {
    "uap": Field("float", 3),
    "thresholds": Field("float", 1),
    "survival": Field("float", 1, optional=True),
    "class_uaps": Field("float", 4, optional=True),
    "class_uap_classes": Field("int", 1, optional=True),
}


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
    path = Path(path)
    hint = "create it with --save-uap"
    # the UAP, at most MAX_CLASS_UAPS class UAPs of the same shape, and per-class figures for as many classes
    volume = shape[0] * shape[1] * shape[2]
    bound = (MAX_CLASS_UAPS + 1) * volume + 3 * MAX_CLASS_UAPS
    meta, tensors = read_tensors(path, FIELDS, max_elements=bound, what="UAP file", hint=hint)
    v, thresholds = tensors["uap"], tensors["thresholds"]
    survival, class_v, classes = (tensors.get(k) for k in ("survival", "class_uaps", "class_uap_classes"))
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
    if not 1 <= len(thresholds) <= MAX_CLASS_UAPS or (survival is not None and survival.shape != thresholds.shape):
        raise ScanError(
            "the UAP file has no valid per-class thresholds", path=path, hint="create it again with --save-uap"
        )
    per_class: dict[int, torch.Tensor] = {}
    if (class_v is None) != (classes is None):
        raise ScanError("the UAP file has class UAPs without their classes, or the reverse", path=path)
    if class_v is not None and classes is not None:
        if tuple(class_v.shape[1:]) != tuple(shape) or tuple(classes.shape) != (len(class_v),):
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
        epsilon=_figure(meta.get("epsilon")),
        fooling_rate=_figure(meta.get("fooling_rate")),
        model_sha256=stored,
        survival=None if survival is None else survival.float(),
    )


def _figure(text: str | None) -> float:
    """A figure from the metadata, for reports only: NaN where it is absent or not a number."""
    try:
        return float(text or "nan")
    except ValueError:
        return float("nan")
