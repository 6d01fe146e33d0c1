"""Allow only computation in a model's graph: every operator is checked before the first forward.

A TorchScript or `torch.export` graph names its operators; some of them read or write files (`aten::from_file`,
`aten::save`), print, or touch raw storage. The rule is an allowlist built from torch's own operator schemas:
an `aten` operator is allowed when every argument and result is a tensor, number, shape, dtype, device or a
container of those (no strings: file names arrive as strings, no storages, objects or streams); a short, written
list admits the `aten` operators whose strings are modes or equations (`gelu(approximate=...)`, `einsum`, `pad`,
string and dict helpers of scripted code). `prim` operators are a written list of control flow and containers.
Everything else (other namespaces, Python ops, custom classes, unknown operators) is refused, naming the operator.
"""

from __future__ import annotations

import functools
import operator
import re

import torch
import torch.nn as nn

from ..core.errors import ScanError

# aten operators that take strings only as modes, equations or scripted-code string values.
STRING_MODE_OPS = frozenset(
    {
        "Delete",
        "Float",
        "Int",
        "warn",
        "__contains__",
        "__getitem__",
        "__interpolate",
        "__upsample",
        "_assert_async",
        "_assert_scalar",
        "_convolution_mode",
        "_functional_assert_async",
        "_functional_assert_scalar",
        "add",
        "any",
        "bin",
        "capitalize",
        "center",
        "chr",
        "clear",
        "conv1d",
        "conv2d",
        "conv3d",
        "copy",
        "count",
        "device",
        "dict",
        "div",
        "div_",
        "divide",
        "divide_",
        "einsum",
        "endswith",
        "eq",
        "expandtabs",
        "fft_fft",
        "fft_fft2",
        "fft_fftn",
        "fft_ifft",
        "fft_ifft2",
        "fft_ifftn",
        "fft_irfft",
        "fft_irfft2",
        "fft_irfftn",
        "fft_rfft",
        "fft_rfft2",
        "fft_rfftn",
        "find",
        "format",
        "ge",
        "gelu",
        "gelu_",
        "get",
        "gt",
        "hex",
        "index",
        "index_reduce",
        "index_reduce_",
        "isalnum",
        "isalpha",
        "isdecimal",
        "isdigit",
        "isidentifier",
        "islower",
        "isnumeric",
        "isprintable",
        "isspace",
        "istitle",
        "isupper",
        "items",
        "join",
        "keys",
        "le",
        "len",
        "linalg_matrix_norm",
        "linalg_norm",
        "list",
        "ljust",
        "lower",
        "lstrip",
        "lt",
        "meshgrid",
        "ne",
        "oct",
        "ord",
        "pad",
        "partition",
        "percentFormat",
        "pop",
        "popitem",
        "remove",
        "replace",
        "rfind",
        "rindex",
        "rjust",
        "rpartition",
        "rsplit",
        "rstrip",
        "scatter",
        "scatter_",
        "scatter_reduce",
        "scatter_reduce_",
        "searchsorted",
        "setdefault",
        "slice",
        "sort",
        "sorted",
        "split",
        "splitlines",
        "startswith",
        "str",
        "strip",
        "swapcase",
        "title",
        "update",
        "upper",
        "values",
        "zfill",
    }
)
# aten operators refused whatever their types: raw storage, I/O, printing. (`aten::warn` of scripted torchvision
# models is allowed: it raises a Python warning, which the CLI silences unless --debug.)
DENIED_ATEN = frozenset(
    {
        "from_file",
        "save",
        "_print",
        "set_",
        "owner_name",
        "_get_cpu_capability",
        "_unsafe_index_put",
        "_nested_tensor_from_tensor_list",
    }
)
# Words a permitted schema type may be built from.
PURE_TYPE_WORDS = frozenset(
    {
        "Tensor",
        "Scalar",
        "int",
        "float",
        "bool",
        "complex",
        "SymInt",
        "SymFloat",
        "SymBool",
        "Device",
        "ScalarType",
        "Layout",
        "MemoryFormat",
        "Generator",
        "Dimname",
        "number",
        "NoneType",
        "Optional",
        "List",
        "Tuple",
        "Dict",
        "Union",
        "t",
        "t1",
        "t2",
        "tVal",
        "tKey",
        "str",
        "Any",
        "AnyEnumType",
        "QScheme",
    }
)
PRIM_OPS = frozenset(
    {
        "Constant",
        "ListConstruct",
        "ListUnpack",
        "TupleConstruct",
        "TupleUnpack",
        "TupleIndex",
        "TupleSlice",
        "DictConstruct",
        "DictIndex",
        "GetAttr",
        "SetAttr",
        "If",
        "Loop",
        "RaiseException",
        "Uninitialized",
        "unchecked_cast",
        "NumToTensor",
        "ImplicitTensorToNum",
        "device",
        "dtype",
        "layout",
        "is_cuda",
        "is_cpu",
        "is_mps",
        "is_xpu",
        "is_meta",
        "is_sparse",
        "is_quantized",
        "is_nested",
        "data",
        "min",
        "max",
        "abs",
        "isinstance",
        "requires_grad",
        "id",
        "rangelist",
        "AutogradZero",
        "StringIndex",
        "shape",
        "name",
        "grad",
        "TypeCheck",
        "RequiresGradCheck",
        "EnumName",
        "EnumValue",
        "type",
        "is_mkldnn",
        "is_vulkan",
        "unchecked_unwrap_optional",
        "AutogradAdd",
        "ConstantChunk",
        "MMTreeReduce",
        "BroadcastSizes",
        "ChunkSizes",
        "SumToSize",
        "Return",
        "ListIndex",
        "ModuleContainerIndex",
    }
)
SYMBOLIC_FUNCTIONS = frozenset(
    {
        operator.getitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.truediv,
        operator.mod,
        operator.neg,
        operator.pow,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.and_,
        operator.or_,
        operator.not_,
        operator.pos,
        operator.abs,
    }
)
HIGHER_ORDER_OPS = frozenset({"cond", "while_loop", "wrap_with_set_grad_enabled", "wrap_with_autocast"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _schema_is_pure(schema, name: str) -> bool:
    for item in (*schema.arguments, *schema.returns):
        words = set(_WORD.findall(str(item.type)))
        if not words <= PURE_TYPE_WORDS or ("str" in words and name not in STRING_MODE_OPS):
            return False
    return True


@functools.lru_cache(maxsize=1)
def allowed_aten() -> frozenset[str]:
    """Names of the aten operators a scanned graph may call (computed once from torch's schemas)."""
    by_name: dict[str, list] = {}
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("aten::"):
            by_name.setdefault(schema.name[len("aten::") :], []).append(schema)
    return frozenset(
        name
        for name, schemas in by_name.items()
        if name not in DENIED_ATEN and all(_schema_is_pure(s, name) for s in schemas)
    )


@functools.lru_cache(maxsize=8192)
def schema_allowed(schema: str) -> bool:
    """Whether one operator overload (its schema text) is pure computation: the overload a graph actually calls is
    judged, so another overload of the same name (torch versions add named-dimension ones) changes nothing."""
    try:
        parsed = torch._C.parse_schema(schema)
    except RuntimeError:
        return False
    if not parsed.name.startswith("aten::"):
        return False
    name = parsed.name[len("aten::") :]
    return name not in DENIED_ATEN and _schema_is_pure(parsed, name)


def operator_allowed(kind: str) -> bool:
    """Whether a qualified operator name (`aten::conv2d`, `prim::If`) is pure computation."""
    namespace, _, name = kind.partition("::")
    if namespace == "aten":
        return name in allowed_aten()
    if namespace == "prim":
        return name in PRIM_OPS
    return False


def _refuse(kind: str, where: str, path) -> ScanError:
    return ScanError(
        f"refused: the model's graph calls {kind!r} ({where[:100]}), which is not a pure tensor operator",
        path=path,
        hint="only computation is run from a model file: no file, process, network or Python operators",
    )


def _blocks(block):
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _blocks(inner)


def _method_graphs(module: torch.jit.ScriptModule):
    """(where, inlined graph) for every method of every submodule: forward, exported methods and the rest."""
    for sub_name, sub in module.named_modules():
        c = sub._c
        for method in c._method_names():
            graph = c._get_method(method).graph.copy()
            torch._C._jit_pass_inline(graph)  # calls to other methods and functions become their bodies
            yield f"{sub_name or 'model'}.{method}", graph


def check_torchscript_graph(module: torch.jit.ScriptModule, path=None) -> int:
    """Every node of every method of every submodule (inlined, nested blocks included); modules with scripted
    hooks are refused (a hook is a separate function the forward graph does not show). Returns the node count.
    """
    try:
        subs = list(module.named_modules())
    except (RuntimeError, AttributeError) as exc:
        raise ScanError("the TorchScript archive's modules cannot be inspected", path=path) from exc
    for sub_name, sub in subs:
        hooks = [*sub._c._get_forward_pre_hooks(), *sub._c._get_forward_hooks()]
        if hooks:
            raise ScanError(
                f"refused: TorchScript module {sub_name or 'model'!r} has {len(hooks)} scripted forward "
                "hook(s), functions that run beside forward",
                path=path,
                hint="export the model without hooks, or save a .pt2 with torch.export.save",
            )
    count = 0
    try:
        graphs = list(_method_graphs(module))
    except (RuntimeError, AttributeError) as exc:
        raise ScanError("the TorchScript archive has a method that cannot be inspected", path=path) from exc
    if not any(where.endswith(".forward") for where, _ in graphs):
        raise ScanError("the TorchScript archive has no forward method that can be inspected", path=path)
    for where, graph in graphs:
        for node in _blocks(graph):
            kind = node.kind()
            count += 1
            if not _node_allowed(node, kind):
                raise _refuse(kind, f"{where}: {str(node).strip().splitlines()[0]}", path)
    return count


def _node_allowed(node, kind: str) -> bool:
    """A TorchScript node: an aten call by the overload it matched, anything else by its kind."""
    if kind.startswith("aten::"):
        try:
            schema = node.schema()
        except RuntimeError:
            schema = "(no schema)"
        if schema != "(no schema)":
            return schema_allowed(schema)
    return operator_allowed(kind)


def _target_name(target) -> str:
    name = getattr(target, "__name__", None) or type(target).__name__
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def check_fx_node(node: torch.fx.Node, path=None) -> None:
    """One node of an exported program: aten overloads by the allowlist, a few symbolic-shape functions."""
    if node.op in ("placeholder", "output", "get_attr"):
        return
    if node.op != "call_function":
        raise _refuse(f"{node.op} {node.target}", node.name, path)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace == "aten" and schema_allowed(str(target._schema)):
            return
        raise _refuse(target._schema.name, node.name, path)
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() in HIGHER_ORDER_OPS:
            return
        raise _refuse(f"higher_order::{target.name()}", node.name, path)
    if callable(target) and target in SYMBOLIC_FUNCTIONS:
        return
    if target in (
        torch.sym_int,
        torch.sym_float,
        torch.sym_max,
        torch.sym_min,
        torch.sym_not,
        torch.sym_ite,
        torch.sym_sqrt,
    ):
        return
    raise _refuse(_target_name(target) if not isinstance(target, str) else target, node.name, path)


def check_exported_program(program: torch.export.ExportedProgram, path=None) -> int:
    """Every node of every graph in an exported program (control-flow subgraphs included); returns the count."""
    if program.constants:
        for name, value in program.constants.items():
            if not isinstance(value, torch.Tensor):
                raise ScanError(
                    f"refused: the program holds a non-tensor constant {name[:80]!r}",
                    path=path,
                    hint="opaque and script objects in an exported program are not scanned",
                )
    count = 0
    for graph_module in program.graph_module.modules():
        if isinstance(graph_module, torch.fx.GraphModule):
            for node in graph_module.graph.nodes:
                check_fx_node(node, path)
                count += 1
    return count


def check_onnx_module(module: nn.Module, path=None) -> int:
    """An onnx2torch GraphModule: only onnx2torch and torch.nn modules; functions and tensor methods by the same
    allowlist as exported programs; returns the number of nodes checked."""
    if not isinstance(module, torch.fx.GraphModule):
        raise ScanError("the ONNX conversion did not give a graph module", path=path)
    count = 0
    for node in module.graph.nodes:
        count += 1
        if node.op == "call_module":
            sub = module.get_submodule(node.target)
            if not type(sub).__module__.startswith(("onnx2torch.", "torch.nn.")):
                raise _refuse(f"module {type(sub).__name__}", node.name, path)
        elif node.op == "call_method":
            if str(node.target) not in allowed_aten():
                raise _refuse(f"method {node.target}", node.name, path)
        else:
            check_fx_node(node, path)
    return count


ONNX_DOMAINS = ("", "ai.onnx")


def check_onnx_proto(proto, path=None) -> None:
    """Refuse custom operator domains and local functions anywhere in an ONNX graph (subgraphs included)."""
    if len(proto.functions):
        raise ScanError(
            f"refused: the ONNX model defines {len(proto.functions)} local function(s) "
            f"({proto.functions[0].domain}::{proto.functions[0].name})",
            path=path,
            hint="only standard ONNX operators are converted",
        )

    def walk(graph):
        for node in graph.node:
            if node.domain not in ONNX_DOMAINS:
                raise ScanError(
                    f"refused: ONNX node {node.name[:60]!r} uses operator {node.op_type[:60]!r} from the "
                    f"custom domain {node.domain[:60]!r}",
                    path=path,
                    hint="only the standard ai.onnx domain is converted",
                )
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(proto.graph)
