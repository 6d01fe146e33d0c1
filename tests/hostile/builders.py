"""Builders of hostile model files, made at test time (no payload is committed).

Each payload, if it ever ran, would create its canary file; the tests assert the canary never appears.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


class WritesCanary:
    """Unpickling this creates the canary file (builtins.open in write mode)."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None,
                deflate: bool = False) -> Path:
    """Copy a zip archive, replacing or adding members (by exact name)."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(
            dst, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, replace.get(info.filename, zin.read(info)))
        for name, data in add.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zout.compression
            zout.writestr(info, data)
    return dst


def member(path: Path, suffix: str) -> str:
    """The one member whose name ends with `suffix`."""
    with zipfile.ZipFile(path) as zf:
        return next(n for n in zf.namelist() if n.endswith(suffix))


def torch_save_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def pt2_pickled_sample_inputs(clean: Path, dst: Path, canary: Path, raw: bool = False) -> Path:
    """A .pt2 whose sample inputs are a pickle that writes the canary (torch falls back to weights_only=False)."""
    payload = pickle.dumps((WritesCanary(canary),)) if raw else torch_save_bytes((WritesCanary(canary),))
    return rewrite_zip(clean, dst, replace={member(clean, "data/sample_inputs/model.pt"): payload})


def pt2_opaque_constant(clean: Path, dst: Path, canary: Path) -> Path:
    """A .pt2 declaring an opaque constant, which torch reads with plain pickle.loads."""
    prefix = member(clean, "archive_format").rsplit("/", 1)[0]
    config = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                  "tensor_meta": None}}}
    return rewrite_zip(clean, dst, replace={member(clean, "model_constants_config.json"): json.dumps(config).encode()},
                       add={f"{prefix}/data/constants/opaque_obj_0": pickle.dumps(WritesCanary(canary))})


def pt2_with_member(clean: Path, dst: Path, name: str, data: bytes = b"\x7fELF") -> Path:
    """A .pt2 with one extra member (an AOTInductor library, a '../' name)."""
    return rewrite_zip(clean, dst, add={name: data})


def pt2_shape_expression(small: nn.Module, dst: Path, canary: Path) -> Path:
    """A dynamic-batch .pt2 whose symbolic shape expression is Python that would write the canary."""
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(small, (torch.rand(4, 1, 28, 28),), dynamic_shapes=({0: batch},))
    tmp = dst.with_suffix(".orig.pt2")
    torch.export.save(program, tmp)
    name = member(tmp, "models/model.json")
    with zipfile.ZipFile(tmp) as zf:
        text = zf.read(name).decode()
    code = f"__import__('builtins').open('{canary}', 'w') and Symbol('s31')"
    evil = text.replace('"expr_str": "Symbol(', f'"expr_str": "{code} + 0*Symbol(', 1)
    assert evil != text, "no symbolic expression to replace"
    return rewrite_zip(tmp, dst, replace={name: evil.encode()})


class FromFileForward(nn.Module):
    """A model whose forward maps a file with aten::from_file (shared=True creates it)."""

    def __init__(self, canary: str) -> None:
        super().__init__()
        self.canary = canary
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leak = torch.from_file(self.canary, shared=True, size=16)
        return self.fc(x.flatten(1)) + leak.sum() * 0


class NeverReturns(nn.Module):
    """A model whose forward loops forever."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        i = 0
        while i >= 0:
            i = i + 1
        return y


class Rounded(nn.Module):
    """An exported model behind round(x*255)/255: outputs are right, input gradients are zero."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 255) / 255)


class TupleOut(nn.Module):
    """A model returning (features, logits)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        logits = self.inner(x)
        return logits.softmax(1) * 0 + 1, logits


def deflated_bomb_pth(dst: Path, megabytes: int = 64) -> Path:
    """A weights-only state_dict whose one tensor of zeros deflates ~1000x."""
    plain = dst.with_suffix(".plain.pt")
    torch.save({"w": torch.zeros(megabytes << 18)}, plain)  # float32: 4 bytes each
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    plain.unlink()
    return dst


def onnx_lying_external_data(dst: Path, length: int = 4 << 30) -> Path:
    """An ONNX model whose weight claims `length` bytes of a tiny external file."""
    from onnx import TensorProto, helper

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[length // 4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    (dst.parent / "w.bin").write_bytes(b"\0" * 64)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 28, 28])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    dst.write_bytes(model.SerializeToString())
    return dst


def onnx_custom_domain(dst: Path, domain: str = "evil[/]ops[bold]") -> Path:
    """An ONNX model calling an operator from a custom domain whose name is rich markup."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("ReadFile", ["x"], ["y"], domain=domain)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    model.ir_version = 8
    dst.write_bytes(model.SerializeToString())
    return dst


def relabelled_npz(src: Path, dst: Path, label: int) -> Path:
    """The bundled digits with every tenth label set beyond the model's classes."""
    data = np.load(src)
    y = data["y"].copy()
    y[::10] = label
    np.savez(dst, x=data["x"], y=y)
    return dst
