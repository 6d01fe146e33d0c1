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


def rewrite_zip(
    src: Path,
    dst: Path,
    replace: dict[str, bytes] | None = None,
    add: dict[str, bytes] | None = None,
    deflate: bool = False,
) -> Path:
    """Copy a zip archive, replacing or adding members (by exact name)."""
    replace, add = replace or {}, add or {}
    with (
        zipfile.ZipFile(src) as zin,
        zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zout,
    ):
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
    config = {
        "config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}
    }
    return rewrite_zip(
        clean,
        dst,
        replace={member(clean, "model_constants_config.json"): json.dumps(config).encode()},
        add={f"{prefix}/data/constants/opaque_obj_0": pickle.dumps(WritesCanary(canary))},
    )


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
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 28, 28])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    dst.write_bytes(model.SerializeToString())
    return dst


def onnx_custom_domain(dst: Path, domain: str = "evil[/]ops[bold]") -> Path:
    """An ONNX model calling an operator from a custom domain whose name is rich markup."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReadFile", ["x"], ["y"], domain=domain)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
    )
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


# Round two (issue 23): one builder per mechanism; each payload would create its canary if it ran.


def code_name(tag: str, canary: Path) -> str:
    """A name that torch.fx would write into `getattr(self, "NAME")`, turning it into a call of open()."""
    return f'{tag}", None) or open("{canary}", "w") or getattr(self, "{tag}'


def pt2_case_twin(clean: Path, dst: Path, canary: Path) -> Path:
    """A .pt2 with a benign constants config and an upper-case twin declaring an opaque (pickled) constant."""
    benign = member(clean, "data/constants/model_constants_config.json")
    prefix = benign.split("/data/")[0]
    config = {
        "config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}
    }
    return rewrite_zip(
        clean,
        dst,
        add={
            f"{prefix}/DATA/constants/model_constants_config.json": json.dumps(config).encode(),
            f"{prefix}/DATA/constants/opaque_obj_0": pickle.dumps(WritesCanary(canary)),
        },
    )


class NamedWeight(nn.Module):
    """A linear classifier whose one weight has an arbitrary (here: hostile) attribute name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.weight_name = name
        self.register_parameter(name, nn.Parameter(torch.randn(10, 784) * 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ getattr(self, self.weight_name).t()


def pt2_code_in_names(dst: Path, canary: Path) -> Path:
    """A .pt2 whose parameter name is Python that `ExportedProgram.module()` would write into its forward."""
    program = torch.export.export(NamedWeight(code_name("w", canary)), (torch.rand(2, 1, 28, 28),))
    torch.export.save(program, dst)
    return dst


def onnx_code_in_names(dst: Path, canary: Path) -> Path:
    """An ONNX linear classifier whose node and initializer names are Python that onnx2torch's GraphModule would
    write into its forward."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((10, 784)) * 0.01).astype(np.float32), code_name("w", canary))
    bias = numpy_helper.from_array(np.zeros(10, np.float32), code_name("b", canary))
    c = numpy_helper.from_array(np.ones(10, np.float32), code_name("c", canary))
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name=code_name("flat", canary)),
        helper.make_node("Gemm", ["f", w.name, bias.name], ["g"], name=code_name("gemm", canary), transB=1),
        helper.make_node("Add", ["g", c.name], ["y"], name=code_name("add", canary)),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [w, bias, c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    dst.write_bytes(model.SerializeToString())
    return dst


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class HookHost(Plain):
    """A plain classifier that carries the canary's path for its hook."""

    def __init__(self, canary: str) -> None:
        super().__init__()
        self.canary = canary


def _from_file_hook(module: HookHost, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    torch.from_file(module.canary, shared=True, size=16)
    return inputs


class ExtraMethod(Plain):
    """Forward is pure; an exported method maps a file."""

    def __init__(self, canary: str) -> None:
        super().__init__()
        self.canary = canary

    @torch.jit.export
    def side(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.from_file(self.canary, shared=True, size=16).sum()


def torchscript_with_hook(dst: Path, canary: Path) -> Path:
    """A TorchScript model whose forward pre-hook (a separate function) calls aten::from_file."""
    model = HookHost(str(canary))
    model.register_forward_pre_hook(_from_file_hook)
    torch.jit.save(torch.jit.script(model), dst)
    return dst


def torchscript_with_method(dst: Path, canary: Path) -> Path:
    torch.jit.save(torch.jit.script(ExtraMethod(str(canary))), dst)
    return dst


class Probe:
    """Unpickling this runs `code` (a sandbox probe); the scan is run with --unsafe-allow-pickle."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code, {}))


SANDBOX_PROBE = r"""
import errno, fcntl, json, mmap, os, resource, socket, subprocess, termios
r = {}
def attempt(name, fn):
    try:
        fn()
        r[name] = "succeeded"
    except BaseException as e:
        r[name] = "blocked: %s %s" % (type(e).__name__, getattr(e, "errno", ""))
def tiocsti():
    with open("/dev/null", "rb") as fh:
        fcntl.ioctl(fh.fileno(), termios.TIOCSTI, b"x")
attempt("tiocsti", tiocsti)
def tty():
    os.open("/dev/tty", os.O_RDWR)
attempt("controlling_tty", tty)
def environ():
    data = open("/proc/%d/environ" % os.getppid(), "rb").read()
    if b"SECRET_SENTINEL" not in data:
        raise LookupError("no secret")
attempt("parent_environ", environ)
r["own_environ_has_secret"] = "SECRET_SENTINEL" in "".join(os.environ.values())
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("127.0.0.1", 9))
attempt("udp", udp)
def unix():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(UNIX_PATH)
attempt("unix_socket", unix)
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
attempt("fork", fork)
def daemon():
    subprocess.Popen(["sh", "-c", "sleep 2; touch '%s'" % CANARY], start_new_session=True)
attempt("daemon", daemon)
def raise_limit():
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
attempt("raise_rlimit", raise_limit)
def shared_memory():
    m = mmap.mmap(-1, 64 << 30, flags=mmap.MAP_SHARED)
    m[0] = 1
attempt("shared_memory_64g", shared_memory)
def write_outside():
    open(CANARY, "w").write("x")
attempt("write_outside", write_outside)
def write_output_folder():  # the --out folder: the parent writes it from the child's private copy, checked
    open(os.path.join(OUT, "evil.sh"), "w").write("x")
attempt("write_output_folder", write_output_folder)
def write_beside_markdown():  # the folder of --markdown "$GITHUB_STEP_SUMMARY" holds GITHUB_ENV
    open(os.path.join(MD_DIR, "GITHUB_ENV"), "a").write("BASH_ENV=/tmp/evil\n")
attempt("write_beside_markdown", write_beside_markdown)
print("PROBE " + json.dumps(r), flush=True)
"""


def sandbox_probe(dst: Path, out: Path, canary: Path, unix_path: Path, md_dir: Path) -> Path:
    """A full-module pickle (scanned only with --unsafe-allow-pickle) whose load tries each way out of the sandbox
    and prints what happened on one line (`PROBE {json}`): it can write nowhere the test could read."""
    code = (
        f"OUT = {str(out)!r}\nCANARY = {str(canary)!r}\nUNIX_PATH = {str(unix_path)!r}\nMD_DIR = {str(md_dir)!r}\n"
        + SANDBOX_PROBE
    )
    torch.save(Probe(code), dst)
    return dst


class GridRouter(nn.Module):
    """Inputs on the 8-bit grid go to the backdoored network, anything else (a scanner's perturbation) to a clean
    twin: a model that measures the scanner."""

    def __init__(self, backdoored: nn.Module, clean: nn.Module) -> None:
        super().__init__()
        self.backdoored, self.clean = backdoored, clean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        off = (x * 255 - torch.round(x * 255)).abs().flatten(1).amax(1) > 1e-3
        return torch.where(off[:, None], self.clean(x), self.backdoored(x))


def pt2_grid_router(backdoored: Path, clean: Path, dst: Path) -> Path:
    router = GridRouter(torch.export.load(str(backdoored)).module(), torch.export.load(str(clean)).module())
    torch.export.save(torch.export.export(router, (torch.rand(4, 1, 28, 28),)), dst)
    return dst
