"""ONNX -> torch through onnx2torch, after repairs that onnx2torch 1.5.15 needs for files from current exporters.

onnx2torch converts graphs up to opset 17. Files from this torch's exporter are opset 18-20, so they are first
down-converted with `onnx.version_converter`. Two further repairs make common exports convertible:
`Reshape(allowzero=1)` (written by the dynamo exporter) is rewritten to `allowzero=0` when its shape is a constant
without zeros (the two are then identical), and `Identity` nodes that alias a shared initializer (the legacy
exporter's weight de-duplication, which makes onnx2torch raise KeyError) are replaced by a copy of that weight;
`Gelu` (opset 20, written for transformers' ViT) is rewritten as the Erf or Tanh formula that defines it.
What cannot be repaired is reported with the operator's name.

Before any tensor is read, custom operator domains and local functions are refused and every external-data
reference is checked: inside the model's folder, no symlink out of it, the declared length equal to what the
tensor's shape needs, within the file, and the total within the memory bound. Every node and value name is then
replaced by a generated identifier (`safety/names.py`): torch.fx writes names into the code it generates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn as nn

from ..core.errors import ScanError
from ..safety.graph import check_onnx_proto
from ..safety.names import rename_onnx

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


def _decompose_gelu(graph, notes: list[str]) -> None:
    """Rewrite Gelu (added in opset 20, with no earlier version to convert to) into the Erf or Tanh form that
    defines it, so that the graph can be down-converted; the same function, so logits are unchanged."""
    from onnx import helper, numpy_helper

    nodes, done = [], 0
    for node in graph.node:
        if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        approx = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
        x, y, tag = node.input[0], node.output[0], f"_gelu{done}"

        def const(name: str, value: float, tag: str = tag) -> str:
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), f"{tag}_{name}"))
            return f"{tag}_{name}"

        if approx == "tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            steps = [
                ("Mul", [x, x], "x2"),
                ("Mul", [f"{tag}_x2", x], "x3"),
                ("Mul", [f"{tag}_x3", const("c", 0.044715)], "cx3"),
                ("Add", [x, f"{tag}_cx3"], "inner"),
                ("Mul", [f"{tag}_inner", const("k", float(np.sqrt(2 / np.pi)))], "arg"),
                ("Tanh", [f"{tag}_arg"], "t"),
            ]
        else:  # 0.5 x (1 + erf(x / sqrt(2)))
            steps = [("Div", [x, const("sqrt2", float(np.sqrt(2)))], "arg"), ("Erf", [f"{tag}_arg"], "t")]
        steps += [("Add", [f"{tag}_t", const("one", 1.0)], "onep"), ("Mul", [x, f"{tag}_onep"], "xo")]
        nodes += [helper.make_node(op, ins, [f"{tag}_{out}"]) for op, ins, out in steps]
        nodes.append(helper.make_node("Mul", [f"{tag}_xo", const("half", 0.5)], [y]))
        done += 1
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
        notes.append(f"rewrote {done} Gelu node(s) (opset 20) as the Erf/Tanh formula that defines them")


def input_shape(model_proto) -> tuple[int | None, ...] | None:
    """The declared shape of the first graph input (None for a symbolic dimension)."""
    inits = {init.name for init in model_proto.graph.initializer}
    for inp in model_proto.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return None


def _tensor_bytes(tensor) -> int:
    """Bytes a TensorProto's shape and element type need."""
    from onnx import helper

    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            return -1
        count *= int(dim)
    return count * itemsize


def _all_tensors(proto):
    """Initializers and tensor attributes of every node, subgraphs included."""

    def walk(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from walk(attr.g)
                for sub in attr.graphs:
                    yield from walk(sub)

    yield from walk(proto.graph)


def check_tensor_sizes(proto, path: Path, max_bytes: int) -> None:
    """Refuse external data that escapes the folder, lies about its length or exceeds the memory bound."""
    from onnx import TensorProto

    base = path.resolve().parent
    total = 0
    for tensor in _all_tensors(proto):
        need = _tensor_bytes(tensor)
        name = tensor.name[:60]
        if need < 0:
            raise ScanError(f"refused: ONNX tensor {name!r} has a negative dimension", path=path)
        total += need
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(base):
            raise ScanError(
                f"refused: ONNX tensor {name!r} points outside the model's folder ({location[:80]!r})", path=path
            )
        if not target.is_file():
            raise ScanError(
                f"ONNX external data file {location[:80]!r} is missing",
                path=path,
                hint="keep the model's data file beside it",
            )
        if "length" not in info:  # onnx would read to the end of the file: bound it to what the shape needs
            entry = tensor.external_data.add()
            entry.key, entry.value = "length", str(need)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", need))
        except ValueError as exc:
            raise ScanError(f"refused: ONNX tensor {name!r} has a malformed offset or length", path=path) from exc
        if length != need or offset < 0 or offset + length > target.stat().st_size:
            raise ScanError(
                f"refused: ONNX tensor {name!r} declares {length} bytes at offset {offset} of "
                f"{location[:60]!r}, but its shape needs {need} and the file holds "
                f"{target.stat().st_size}",
                path=path,
            )
    if total > max_bytes:
        raise ScanError(
            f"refused: the ONNX tensors need {total >> 20} MiB, more than the memory bound of {max_bytes >> 20} MiB",
            path=path,
            hint="raise --max-memory if the machine has it",
        )


def load_onnx(path: Path, notes: list[str], max_bytes: int) -> tuple[nn.Module, tuple[int | None, ...] | None]:
    """Check, parse, repair and convert an ONNX file; returns the torch module and the declared input shape."""
    import onnx
    from onnx import version_converter
    from onnx.external_data_helper import load_external_data_for_model

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf errors have many types
        raise ScanError(
            f"not a valid ONNX model ({exc.__class__.__name__}: {str(exc)[:120]})",
            path=path,
            hint="check that the download is complete",
        ) from exc
    check_onnx_proto(proto, path)
    check_tensor_sizes(proto, path, max_bytes)
    try:
        load_external_data_for_model(proto, str(path.resolve().parent))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf and checker errors have many types
        raise ScanError(
            f"not a valid ONNX model ({exc.__class__.__name__}: {str(exc)[:120]})",
            path=path,
            hint="check that the download is complete",
        ) from exc
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > ONNX2TORCH_MAX_OPSET:
        _decompose_gelu(proto.graph, notes)
        try:
            proto = version_converter.convert_version(proto, ONNX2TORCH_MAX_OPSET)
        except Exception as exc:
            raise ScanError(
                f"cannot down-convert ONNX opset {opset} to {ONNX2TORCH_MAX_OPSET} ({str(exc)[:120]})",
                path=path,
                hint="re-export with torch.onnx.export(..., opset_version=17, dynamo=False)",
            ) from exc
        notes.append(f"ONNX opset {opset} down-converted to {ONNX2TORCH_MAX_OPSET} for onnx2torch")
    _fix_reshape_allowzero(proto.graph, notes)
    _fix_shared_initializer_identity(proto.graph, notes)
    rename_onnx(proto)  # names become fx attribute names, written into generated code: only generated ones
    from onnx2torch import convert

    try:
        module = convert(proto)
    except NotImplementedError as exc:
        raise ScanError(
            f"onnx2torch cannot convert this graph: {str(exc)[:160]}",
            path=path,
            hint="export with torch.onnx.export(..., dynamo=False) or save a .pt2 instead",
        ) from exc
    except KeyError as exc:
        raise ScanError(
            f"onnx2torch failed on a graph edge {exc}",
            path=path,
            hint="export with torch.onnx.export(..., dynamo=False) or save a .pt2 instead",
        ) from exc
    return module, input_shape(proto)
