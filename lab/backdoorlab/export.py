"""Save a model the way users receive them: .pt2, ONNX, TorchScript, safetensors, state_dict."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

EXPORT_FORMATS = ("pt2", "onnx", "torchscript", "safetensors", "state_dict")


def save_model(model: nn.Module, path: str | Path, fmt: str, example: torch.Tensor) -> Path:
    """Write `model` in format `fmt`; .pt2 and ONNX get a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    # A batch of one would be specialised to a constant by torch.export; clone so that a view does not drag
    # its whole base tensor into the file's sample inputs.
    example = example[:2].expand(2, *example.shape[1:]).clone()
    if fmt == "pt2":
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
    elif fmt == "onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.trace(model, example), str(path))
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    elif fmt == "state_dict":
        torch.save(model.state_dict(), path)
    else:
        raise ValueError(f"unknown format {fmt!r}; use one of {EXPORT_FORMATS}")
    return path
