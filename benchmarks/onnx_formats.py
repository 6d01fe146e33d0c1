"""Which ONNX files from today's exporters backdoorscan converts, and how close the converted logits are.

    .venv/bin/python benchmarks/onnx_formats.py [--models vit-tiny,vit-b16,...] [--threads 2]

For each architecture (random weights: conversion does not depend on training) and each exporter (torch's dynamo
exporter, which writes opset 20, and the legacy TorchScript exporter at opset 17), the model is exported, loaded
through backdoorscan's ONNX path (checks, repairs, onnx2torch) and run on the same random [0, 1] batch as
onnxruntime; the table gives the notes (repairs), the max abs logit difference, or the reason for a refusal.
Results: bench-out/onnx_formats.json and a Markdown table for docs/formats.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common import ROOT

OUT = ROOT / "bench-out" / "onnx_formats.json"


class Logits(nn.Module):
    """A transformers classifier as pixel values in, logits out (what an exporter needs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _hf_vit(side: int, patch: int, width: int, layers: int, heads: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return Logits(
        ViTForImageClassification(
            ViTConfig(
                image_size=side,
                patch_size=patch,
                hidden_size=width,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=4 * width,
                num_labels=10,
            )
        )
    )


def _hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return Logits(
        ResNetForImageClassification(
            ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_labels=10)
        )
    )


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=10)

    return build


MODELS: dict[str, tuple[str, Callable[[], nn.Module], int]] = {  # name: (description, factory, input side)
    "vit-tiny": ("transformers ViT, 2 layers, width 48, 28 px, patch 7", lambda: _hf_vit(28, 7, 48, 2, 4), 28),
    "vit-b16": ("transformers ViT-B/16 (12 layers, width 768), 224 px", lambda: _hf_vit(224, 16, 768, 12, 12), 224),
    "hf-resnet": ("transformers ResNet (4 stages, width 32-256), 64 px", _hf_resnet, 64),
    "timm-resnet18": ("timm resnet18, 224 px", _timm("resnet18"), 224),
    "timm-vit-tiny": ("timm vit_tiny_patch16_224", _timm("vit_tiny_patch16_224"), 224),
    "timm-convnext-atto": ("timm convnext_atto, 224 px", _timm("convnext_atto"), 224),
    "timm-efficientnet-b0": ("timm efficientnet_b0, 224 px", _timm("efficientnet_b0"), 224),
    "tv-mobilenet-v3": ("torchvision mobilenet_v3_small, 224 px", _torchvision("mobilenet_v3_small"), 224),
}
EXPORTERS = {
    "dynamo": "torch.onnx.export(dynamo=True), opset 20",
    "legacy": "torch.onnx.export(dynamo=False), opset 17",
}


def export(model: nn.Module, x: torch.Tensor, path: Path, exporter: str) -> None:
    """The model to ONNX with a dynamic batch, the way each exporter is usually called."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                input_names=["pixel_values"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["pixel_values"],
                output_names=["logits"],
                dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            )


def row(name: str, exporter: str) -> dict:
    """Export, convert through backdoorscan, compare with onnxruntime."""
    import onnxruntime as ort

    from backdoorscan.core.errors import ScanError
    from backdoorscan.loading import load_model

    description, factory, side = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    out = {"model": name, "description": description, "exporter": EXPORTERS[exporter]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        try:
            export(model, x, path, exporter)
        except Exception as exc:
            return {**out, "converts": False, "reason": f"export failed: {type(exc).__name__}: {str(exc)[:160]}"}
        import onnx

        out["opset"] = max(
            o.version
            for o in onnx.load(str(path), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        )
        t = time.perf_counter()
        try:
            loaded = load_model(path, device="cpu")
        except ScanError as exc:
            return {**out, "converts": False, "reason": exc.message[:200]}
        out["load_s"] = round(time.perf_counter() - t, 2)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            got = loaded.module(x).numpy()
        out.update(
            converts=True,
            max_abs_diff=float(np.abs(got - ref).max()),
            logit_scale=float(np.abs(ref).max()),
            argmax_agree=float((got.argmax(1) == ref.argmax(1)).mean()),
            notes=[n for n in loaded.notes if "checked" not in n],
        )
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| architecture | exporter | opset | converts | max abs logit diff vs onnxruntime | repairs / reason |",
        "|---|---|---:|:---:|---:|---|",
    ]
    for r in rows:
        diff = f"{r['max_abs_diff']:.1e} (logits up to {r['logit_scale']:.1f})" if r.get("converts") else "-"
        why = "; ".join(r.get("notes") or []) or "none" if r.get("converts") else r.get("reason", "")
        lines.append(
            f"| {r['description']} | {r['exporter']} | {r.get('opset', '-')} | "
            f"{'yes' if r.get('converts') else '**no**'} | {diff} | {why} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--exporters", default="dynamo,legacy")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = json.loads(OUT.read_text())["rows"] if OUT.exists() else []
    done = {(r["model"], r["exporter"]) for r in rows}
    for name in args.models.split(","):
        for exporter in args.exporters.split(","):
            if (name, EXPORTERS[exporter]) in done:
                continue
            rows.append(row(name, exporter))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            OUT.parent.mkdir(exist_ok=True)
            OUT.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
