"""`ModelSource`: the model to scan and everything needed to load it and feed it [0, 1] pixels, in one object.

Both pipelines (and any future option) take this one typed object instead of a spread of keywords; what a user
does not give is read from the file or the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint file or hub folder (or a module already in memory) and how to load and feed it; what is
    given here overrides what a hub folder declares."""

    checkpoint: Path | nn.Module
    arch: str | None = None  # for weights-only files: torchvision name, path/to/file.py:fn or package.module:fn
    num_classes: int | None = None  # checked against the model's output
    input_size: tuple[int, int] | None = None  # (H, W) of the [0, 1] images the model takes
    channels: int | None = None  # 1 or 3; read from the model when possible
    mean: tuple[float, ...] | None = None  # the model's own normalisation, applied inside the wrapper
    std: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None  # class names (--labels), before the model's own and the data's
    unsafe_allow_pickle: bool = False  # a pickle can run any code: only for files the user trusts

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint, str | PathLike):  # else a module in memory (torch is not imported for this)
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    @property
    def path(self) -> Path | None:
        """The checkpoint file, or None for a module given in memory."""
        return self.checkpoint if isinstance(self.checkpoint, Path) else None

    @staticmethod
    def of(model: str | Path | nn.Module | ModelSource) -> ModelSource:
        """A `ModelSource` from a path or a module with nothing else given, or the source itself."""
        if isinstance(model, ModelSource):
            return model
        return ModelSource(checkpoint=model)  # a path becomes a Path (`__post_init__`), a module stays one
