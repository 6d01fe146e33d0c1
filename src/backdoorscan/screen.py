"""Xue et al.'s rule: an input whose prediction survives the untargeted UAP carries a trigger.

An untargeted UAP has dominant labels: clean images the model already gives such a label survive it, trigger or
not (on our zoos one to three classes hold nearly all the clean survivors, often the backdoor's target). An image
predicted as an ordinary class is flagged when its prediction survives the UAP (the paper's rule). An image
predicted as a dominant class must also either survive that class's own UAP (computed from its clean samples, at
the same radius) or survive the UAP by a margin that few of the class's clean samples reach (`Screen`). Clean
images of the class fail both; a trigger, which the model obeys by a wide margin, passes at least one.

Also the UAP file (`--save-uap` / `--uap`): a safetensors file with the perturbation, the per-class thresholds and,
in its metadata, the sha256 of the model it belongs to, so that a deployment computes the UAP once and screens
each new input with two forward passes, and never screens with another model's UAP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ScanError

UAP_SCHEMA = "backdoorscan.uap/2"  # /1 (a single UAP, no thresholds) is not read


@dataclass
class Screen:
    """The UAP and, per dominant class, its own UAP and the survival margin that counts as a trigger."""

    v: torch.Tensor  # (C, H, W)
    thresholds: torch.Tensor  # (K,): margin above which a dominant class's image counts as surviving; 0 otherwise
    class_v: dict[int, torch.Tensor] = field(default_factory=dict)  # dominant class -> its own UAP (C, H, W)

    def to(self, device: torch.device | str) -> Screen:
        """The same screen on another device."""
        return Screen(self.v.to(device), self.thresholds.to(device),
                      {c: u.to(device) for c, u in self.class_v.items()})

    @property
    def dominant(self) -> list[int]:
        """The classes screened with their own UAP and margin."""
        return sorted(self.class_v)


@torch.no_grad()
def survival_margins(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Prediction without the UAP, prediction with it, and the predicted class's logit margin over the best other
    class with it (positive: the prediction survives)."""
    before = model(x).argmax(1)
    logits = model((x + v).clamp(0, 1))
    own = logits.gather(1, before[:, None]).squeeze(1)
    other = logits.scatter(1, before[:, None], float("-inf")).amax(1)
    return before, logits.argmax(1), own - other


@torch.no_grad()
def uap_rule(model: nn.Module, x: torch.Tensor, screen: Screen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions without and with the UAP, and which images are flagged (see the module docstring)."""
    before, after, margin = survival_margins(model, x, screen.v)
    flagged = after == before
    for c, u in screen.class_v.items():
        own = flagged & (before == c)
        if own.any():
            kept = model((x[own] + u).clamp(0, 1)).argmax(1) == c
            flagged[own] = kept | (margin[own] > screen.thresholds[c])
    return before, after, flagged


@dataclass
class UapFile:
    """A stored screen (UAP and per-class thresholds) and what it was made for."""

    screen: Screen
    epsilon: float
    fooling_rate: float
    model_sha256: str | None
    survival: torch.Tensor | None = None  # per class: share of clean samples the screen flags


def save_uap(path: Path, uap: UapFile) -> None:
    """Write the UAP as safetensors with its model's sha256 in the metadata."""
    from safetensors.torch import save_file

    meta = {"schema": UAP_SCHEMA, "epsilon": repr(uap.epsilon), "fooling_rate": repr(uap.fooling_rate),
            "model_sha256": uap.model_sha256 or ""}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tensors = {"uap": uap.screen.v.detach().cpu().contiguous(),
               "thresholds": uap.screen.thresholds.detach().cpu().float().contiguous()}
    if uap.screen.class_v:
        classes = sorted(uap.screen.class_v)
        tensors["class_uaps"] = torch.stack([uap.screen.class_v[c].detach().cpu() for c in classes]).contiguous()
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
        raise ScanError("not a backdoorscan UAP file of this version", path=path,
                        hint="create it (again) with --save-uap")
    stored = meta.get("model_sha256") or None
    if stored and model_sha256 and stored != model_sha256:
        raise ScanError(f"this UAP was computed for another model (sha256 {stored[:12]}..., this model "
                        f"{model_sha256[:12]}...)", path=path, hint="compute a new one with --save-uap")
    if tuple(v.shape) != tuple(shape):
        raise ScanError(f"the UAP has shape {tuple(v.shape)} but the model takes {tuple(shape)}", path=path)
    if thresholds is None or thresholds.ndim != 1 or not bool(torch.isfinite(thresholds).all()):
        raise ScanError("the UAP file has no valid per-class thresholds", path=path,
                        hint="create it again with --save-uap")
    per_class: dict[int, torch.Tensor] = {}
    if (class_v is None) != (classes is None):
        raise ScanError("the UAP file has class UAPs without their classes, or the reverse", path=path)
    if class_v is not None and classes is not None:
        if class_v.ndim != 4 or tuple(class_v.shape[1:]) != tuple(shape) or tuple(classes.shape) != (len(class_v),):
            raise ScanError(f"the class UAPs have shape {tuple(class_v.shape)} for classes "
                            f"{tuple(classes.shape)}; the model takes {tuple(shape)}", path=path)
        if any(not 0 <= int(c) < len(thresholds) for c in classes.tolist()):
            raise ScanError("the UAP file has class UAPs for classes it has no threshold for", path=path)
        per_class = {int(c): u.float() for c, u in zip(classes.tolist(), class_v, strict=True)}
    return UapFile(screen=Screen(v.float(), thresholds.float(), per_class), epsilon=float(meta.get("epsilon", "nan")),
                   fooling_rate=float(meta.get("fooling_rate", "nan")), model_sha256=stored, survival=survival)
