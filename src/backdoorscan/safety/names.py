"""Names from a model file are data, never source: torch.fx writes a parameter, buffer or submodule name into the
Python code it generates (`getattr(self, "NAME")`), unescaped, so a name such as `w", None) or exec(...) or
getattr(self, "w` would run at the first forward. Every such name must be a plain dotted identifier before a
graph module is built or run; ONNX names, which exporters write freely (`/conv1/Conv`, `onnx::Mul_12`), are
replaced by generated identifiers before onnx2torch sees them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..core.errors import ScanError

# `layer1.0.conv.weight`, `0.weight`: segments of letters, digits and `_` (nn.Sequential names by index).
_DOTTED = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\Z")
MAX_NAME = 512


def is_plain_name(name: object) -> bool:
    """Whether a name is a plain dotted identifier (`features.0.weight`) that cannot leave a string literal."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and _DOTTED.match(name) is not None


def _refuse(kind: str, name: object, path) -> ScanError:
    return ScanError(
        f"refused: the model's {kind} name {str(name)[:80]!r} is not a plain dotted identifier",
        path=path,
        hint="torch would write that name into generated Python code; names from a "
        "model file are refused unless they are plain identifiers",
    )


def check_names(names: Iterable[tuple[str, object]], path=None) -> int:
    """Refuse the first (kind, name) pair whose name is not plain; returns how many were checked."""
    count = 0
    for kind, name in names:
        count += 1
        if not is_plain_name(name):
            raise _refuse(kind, name, path)
    return count


def _graph_targets(module: nn.Module) -> Iterable[tuple[str, object]]:
    for sub in module.modules():
        if isinstance(sub, torch.fx.GraphModule):
            for node in sub.graph.nodes:
                if node.op in ("get_attr", "call_module"):
                    yield f"{node.op} target", node.target


def module_names(module: nn.Module) -> Iterable[tuple[str, object]]:
    """Every submodule, parameter and buffer name of a module, and the attribute targets of its fx graphs."""
    for name, _ in module.named_modules(remove_duplicate=False):
        if name:
            yield "submodule", name
    for name, _ in module.named_parameters(remove_duplicate=False):
        yield "parameter", name
    for name, _ in module.named_buffers(remove_duplicate=False):
        yield "buffer", name
    yield from _graph_targets(module)


def program_names(program) -> Iterable[tuple[str, object]]:
    """Every name an exported program hands to `.module()`: weights, constants, signature targets, graph targets."""
    for name in program.state_dict:
        yield "weight", name
    for name in program.constants:
        yield "constant", name
    for spec in program.graph_signature.input_specs:
        if spec.target is not None:
            yield "input target", spec.target
    for spec in program.graph_signature.output_specs:
        if spec.target is not None:
            yield "output target", spec.target
    yield from module_names(program.graph_module)


def rename_onnx(proto) -> int:
    """Replace every node and value name of an ONNX graph (subgraphs included) by a generated identifier.

    One mapping serves every graph, so a subgraph's reference to an outer value stays linked. The empty name
    (an omitted optional input) is kept. Returns how many distinct names were replaced.
    """
    mapping: dict[str, str] = {"": ""}

    def new(name: str) -> str:
        if name not in mapping:
            mapping[name] = f"v{len(mapping)}"
        return mapping[name]

    def rename_list(items) -> None:
        for i, name in enumerate(list(items)):
            items[i] = new(name)

    counter = [0]

    def walk(graph) -> None:
        graph.name = "g"
        for seq in (graph.input, graph.output, graph.value_info, graph.initializer):
            for item in seq:
                item.name = new(item.name)
        for sparse in graph.sparse_initializer:
            sparse.values.name = new(sparse.values.name)
            sparse.indices.name = new(sparse.indices.name)
        for ann in graph.quantization_annotation:
            ann.tensor_name = new(ann.tensor_name)
        for node in graph.node:
            counter[0] += 1
            node.name = f"n{counter[0]}"
            rename_list(node.input)
            rename_list(node.output)
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)
                if attr.HasField("t"):
                    attr.t.name = new(attr.t.name) if attr.t.name else ""

    walk(proto.graph)
    return len(mapping) - 1
