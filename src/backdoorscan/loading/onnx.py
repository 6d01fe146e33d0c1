"""ONNX -> torch through onnx2torch, after repairs that onnx2torch 1.5.15 needs for files from current exporters.

onnx2torch converts graphs up to opset 17. Files from this torch's exporter are opset 18-20, so they are first
down-converted with `onnx.version_converter`. Two further repairs make common exports convertible:
`Reshape(allowzero=1)` (written by the dynamo exporter) is rewritten to `allowzero=0` when its shape is a constant
without zeros (the two are then identical), and `Identity` nodes that alias a shared initializer (the legacy
exporter's weight de-duplication, which makes onnx2torch raise KeyError) are replaced by a copy of that weight.
What cannot be repaired is reported with the operator's name.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..errors import ScanError

ONNX2TORCH_MAX_OPSET = 17


def _const_values(graph) -> dict:
    """Name -> numpy value of every initializer and Constant node output."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _fix_reshape_allowzero(graph, notes: list[str]) -> None:
    values = _const_values(graph)
    fixed = 0
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        for attr in node.attribute:
            if attr.name == "allowzero" and attr.i == 1:
                shape = values.get(node.input[1])
                if shape is None or (shape == 0).any():
                    raise ScanError(
                        "the ONNX graph uses Reshape(allowzero=1) with a computed or zero-sized shape, "
                        "which onnx2torch cannot convert",
                        hint="re-export with torch.onnx.export(..., dynamo=False), or save a .pt2 "
                        "with torch.export.save",
                    )
                attr.i = 0
                fixed += 1
    if fixed:
        notes.append(f"rewrote {fixed} Reshape(allowzero=1) with constant shapes to allowzero=0")


def _fix_shared_initializer_identity(graph, notes: list[str]) -> None:
    import onnx

    inits = {init.name: init for init in graph.initializer}
    keep, copied = [], 0
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            clone = onnx.TensorProto()
            clone.CopyFrom(inits[node.input[0]])
            clone.name = node.output[0]
            graph.initializer.append(clone)
            inits[clone.name] = clone
            copied += 1
        else:
            keep.append(node)
    if copied:
        del graph.node[:]
        graph.node.extend(keep)
        notes.append(f"replaced {copied} Identity node(s) aliasing shared weights by copies")


def input_shape(model_proto) -> tuple[int | None, ...] | None:
    """The declared shape of the first graph input (None for a symbolic dimension)."""
    inits = {init.name for init in model_proto.graph.initializer}
    for inp in model_proto.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return None


def load_onnx(path: Path, notes: list[str]) -> tuple[nn.Module, tuple[int | None, ...] | None]:
    """Parse, repair and convert an ONNX file; returns the torch module and the declared input shape."""
    import onnx
    from onnx import version_converter

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf and checker errors have many types
        raise ScanError(f"not a valid ONNX model ({exc.__class__.__name__}: {str(exc)[:120]})", path=path,
                        hint="check that the download is complete") from exc
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > ONNX2TORCH_MAX_OPSET:
        try:
            proto = version_converter.convert_version(proto, ONNX2TORCH_MAX_OPSET)
        except Exception as exc:
            raise ScanError(f"cannot down-convert ONNX opset {opset} to {ONNX2TORCH_MAX_OPSET} "
                            f"({str(exc)[:120]})", path=path,
                            hint="re-export with torch.onnx.export(..., opset_version=17, dynamo=False)") from exc
        notes.append(f"ONNX opset {opset} down-converted to {ONNX2TORCH_MAX_OPSET} for onnx2torch")
    _fix_reshape_allowzero(proto.graph, notes)
    _fix_shared_initializer_identity(proto.graph, notes)
    from onnx2torch import convert

    try:
        module = convert(proto)
    except NotImplementedError as exc:
        raise ScanError(f"onnx2torch cannot convert this graph: {str(exc)[:160]}", path=path,
                        hint="export with torch.onnx.export(..., dynamo=False) or save a .pt2 instead") from exc
    except KeyError as exc:
        raise ScanError(f"onnx2torch failed on a graph edge {exc}", path=path,
                        hint="export with torch.onnx.export(..., dynamo=False) or save a .pt2 instead") from exc
    return module, input_shape(proto)
