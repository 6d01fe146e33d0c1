"""Load a classifier as the user downloaded it: detect the format from the bytes, never run a pickle by default.

Formats: torch.export programs (.pt2), TorchScript archives, ONNX (via onnx2torch), safetensors and plain
state_dict files with `--arch`, and, only behind `unsafe_allow_pickle=True`, fully pickled modules.

Every file is treated as hostile: archives are inspected before a torch loader opens them (`safety.archive`),
torch's unpickler is forced to weights-only for the whole load, and the loaded graph is checked operator by
operator (`safety.graph`) before the first forward.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..core.device import DEFAULT_DEVICE, resolve_device
from ..core.digest import sha256_file
from ..core.errors import ScanError, missing_hint
from ..safety.archive import check_archive
from ..safety.graph import check_exported_program, check_onnx_module, check_torchscript_graph
from ..safety.limits import Limits
from ..safety.names import check_names, module_names, program_names
from .hub import HubFolder
from .labels import clean_label
from .onnx import load_onnx

PICKLE_HINT = (
    "a pickle can run any code when loaded; if you trust its author, rerun with --unsafe-allow-pickle, "
    "or convert it where it was made: torch.save(model.state_dict(), 'weights.pt') and pass --arch, "
    "or torch.export.save(torch.export.export(model, (example,)), 'model.pt2')"
)


@dataclass
class LoadedModel:
    """A classifier in inference form, plus what was loaded and how."""

    module: nn.Module
    path: Path
    format: str
    sha256: str
    input_shape: tuple[int | None, ...] | None = None  # (N, C, H, W) as declared by the file, if any
    notes: list[str] = field(default_factory=list)
    hub: HubFolder | None = None  # what a hub folder declared (architecture, classes, preprocessing, labels)

    @property
    def description(self) -> str:
        text = f"{self.format} {self.path.name}" if self.hub else f"{self.format} file {self.path.name}"
        return text + ("; " + "; ".join(self.notes) if self.notes else "")


def detect_format(path: Path) -> str:
    """Name the format from the file's content, not its extension."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ScanError("damaged zip archive", path=path, hint="download the file again") from exc
        if any(n.endswith("/archive_format") or n.endswith("/models/model.json") for n in names):
            return "torch.export"
        if any("/code/__torch__" in n for n in names) or any(n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "pickle"  # a torch.save archive: a state_dict or a whole module, told apart on load
        raise ScanError("zip archive that is neither a torch.save, TorchScript nor torch.export file", path=path)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < size and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    if head[:1] == b"\x08":
        return "onnx"
    raise ScanError(
        "unknown model format",
        path=path,
        hint="backdoorscan reads .pt2 (torch.export), TorchScript, ONNX, safetensors and state_dict files",
    )


def pickle_imports(path: Path) -> list[str]:
    """What a pickle would import, read without executing it (torch.save archives and raw pickles)."""
    from ..safety.pickles import PickleFormatError, pickle_globals

    found: set[str] = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    if name.endswith(".pkl"):
                        found |= pickle_globals(zf.read(name))
        else:
            found = pickle_globals(path.read_bytes())
    except (PickleFormatError, zipfile.BadZipFile, OSError):
        pass
    return sorted(found)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept common checkpoint wrappers: {'state_dict': ...}, {'model': ...}, DataParallel 'module.' prefixes."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ScanError(
            "the file holds no state_dict of tensors",
            path=path,
            hint="save it with torch.save(model.state_dict(), PATH)",
        )
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """The output width of the classifier head, if there is a 2-D weight.

    The head is a linear weight whose output width feeds no other linear layer; among several, the last in
    natural key order ("9" before "11"). Key order alone is not enough: safetensors stores keys sorted as
    strings, where "11.weight" comes before "9.weight".
    """
    linear = sorted(
        ((k, v) for k, v in state.items() if k.endswith("weight") and v.ndim == 2), key=lambda kv: _natural(kv[0])
    )
    inputs = {int(v.shape[1]) for _, v in linear}
    heads = [v for _, v in linear if int(v.shape[0]) not in inputs] or [v for _, v in linear]
    return int(heads[-1].shape[0]) if heads else None


def _natural(key: str) -> list[tuple[int, int | str]]:
    """Sort key treating runs of digits as numbers: 'layer.9' < 'layer.11'."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", key) if part]


def resolve_arch(spec: str, num_classes: int | None, in_chans: int | None = None) -> nn.Module:
    """Build an untrained module from `resnet18`, `timm:NAME`, `path/to/file.py:function` or
    `package.module:function`; `in_chans` (the weights' input channels) reaches timm's factory."""
    if spec.startswith("timm:"):
        from .hub import timm_arch

        return timm_arch(spec[len("timm:") :], num_classes, in_chans)
    if ":" in spec:
        target, func_name = spec.rsplit(":", 1)
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise ScanError("architecture file not found", path=file, hint="--arch path/to/file.py:function")
            mod_spec = importlib.util.spec_from_file_location(f"_backdoorscan_arch_{file.stem}", file)
            if mod_spec is None or mod_spec.loader is None:
                raise ScanError("not a Python file", path=file, hint="--arch path/to/file.py:function")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)  # the user's own code, which they trust
        else:
            try:
                module = importlib.import_module(target)
            except ImportError as exc:
                raise ScanError(f"cannot import {target!r} for --arch", hint="check the module path") from exc
        factory = getattr(module, func_name, None)
        if factory is None:
            raise ScanError(f"--arch {spec}: no function {func_name!r} in {target}")
        params = inspect.signature(factory).parameters
        kwargs = {"num_classes": num_classes} if num_classes is not None and "num_classes" in params else {}
        return factory(**kwargs)
    import torchvision

    if spec not in torchvision.models.list_models():
        raise ScanError(
            f"unknown architecture {spec!r}",
            hint="name a torchvision model (resnet18, vgg16_bn, ...), timm:NAME or path/to/file.py:function",
        )
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    return torchvision.models.get_model(spec, weights=None, **kwargs)


def _load_state_into(
    state: dict[str, torch.Tensor], arch: str | None, num_classes: int | None, path: Path
) -> nn.Module:
    if arch is None:
        raise ScanError(
            "this file holds only weights, so the architecture must be named",
            path=path,
            hint="add --arch resnet18 (torchvision) or --arch path/to/file.py:function",
        )
    inferred = infer_num_classes(state)
    if num_classes is not None and inferred is not None and inferred != num_classes:
        raise ScanError(
            f"--num-classes {num_classes} disagrees with the weights, whose head has {inferred} outputs",
            path=path,
            hint=f"use --num-classes {inferred}",
        )
    convs = [v for _, v in sorted(state.items(), key=lambda kv: _natural(kv[0])) if v.ndim == 4]
    module = resolve_arch(
        arch, num_classes if num_classes is not None else inferred, in_chans=int(convs[0].shape[1]) if convs else None
    )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3]
        raise ScanError(
            f"the weights do not match --arch {arch}: {' '.join(s.strip() for s in first)[:200]}",
            path=path,
            hint="name the architecture the weights were trained with",
        ) from exc
    return module


@contextlib.contextmanager
def guarded_loading(weights_only: bool = True) -> Iterator[None]:
    """While a loader runs: torch's unpickler forced to weights-only, torch's loggers and warnings silenced.

    `TORCH_FORCE_WEIGHTS_ONLY_LOAD` overrides call sites inside torch that pass `weights_only=False`
    (torch.export reads sample inputs and pickled payloads that way).
    """
    logger = logging.getLogger("torch")
    level, saved = logger.level, os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    logger.setLevel(logging.CRITICAL + 1)
    if weights_only:
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        if weights_only:
            if saved is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


def _load_pickle(
    path: Path, arch: str | None, num_classes: int | None, unsafe: bool, notes: list[str]
) -> tuple[nn.Module, str]:
    try:
        with guarded_loading():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" not in str(exc):
            raise ScanError(
                f"cannot read the file ({str(exc).splitlines()[0][:120]})",
                path=path,
                hint="download it again; it may be truncated",
            ) from exc
        if not unsafe:
            imports = pickle_imports(path)
            shown = ", ".join(imports[:6]) + (", ..." if len(imports) > 6 else "")
            raise ScanError(
                f"refused: this is a pickle that would import {shown or 'arbitrary objects'}",
                path=path,
                hint=PICKLE_HINT,
            ) from exc
        notes.append("loaded a full pickle with --unsafe-allow-pickle")
        with guarded_loading(weights_only=False):
            obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, nn.Module):
            return obj, "pickle"
    return _load_state_into(_unwrap_state_dict(obj, path), arch, num_classes, path), "state_dict"


def _load_export(path: Path, device: torch.device, notes: list[str]) -> tuple[nn.Module, tuple | None]:
    with guarded_loading():
        program = torch.export.load(str(path))
    nodes = check_exported_program(program, path)
    check_names(program_names(program), path)
    notes.append(f"{nodes} graph nodes checked: pure tensor operators only")
    shape = None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = set(program.graph_signature.user_inputs)
    for node in placeholders:
        if node.name in user_inputs and "val" in node.meta:
            shape = tuple(d if isinstance(d, int) else None for d in node.meta["val"].shape)
            break
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
        notes.append(f"moved to {device}")
    module = program.module()
    check_names(module_names(module), path)  # before its first forward runs the code generated from them
    return module, shape


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    unsafe_allow_pickle: bool = False,
    device: str | torch.device = DEFAULT_DEVICE,
    limits: Limits | None = None,
) -> LoadedModel:
    """Load a checkpoint in any supported format, in inference form, with gradients off for its parameters.

    The file is inspected before loading and its graph checked after; a refusal is a ScanError naming the reason.
    """
    path = Path(path)
    limits = limits or Limits()
    device = resolve_device(device)
    if path.is_dir():
        return _finish(_load_folder(path, arch, num_classes, limits), device)
    if path.exists() and not path.is_file():
        raise ScanError("refused: the model is not a regular file or a folder", path=path)
    if not path.is_file():
        raise ScanError("model file not found", path=path, hint=missing_hint(path))
    if path.stat().st_size == 0:
        raise ScanError("model file is empty", path=path, hint="download it again")
    fmt, shape = detect_format(path), None
    notes: list[str] = []
    max_bytes = limits.memory_bytes()
    if path.stat().st_size > max_bytes:
        raise ScanError(
            f"refused: the file is larger than the memory bound of {max_bytes >> 20} MiB",
            path=path,
            hint="raise --max-memory if the machine has the memory",
        )
    check_archive(path, fmt, max_bytes, limits.max_ratio, allow_pickle=unsafe_allow_pickle)
    try:
        if fmt == "torch.export":
            module, shape = _load_export(path, device, notes)
        elif fmt == "torchscript":
            with guarded_loading():
                module = torch.jit.load(str(path), map_location=device)
            nodes = check_torchscript_graph(module, path)
            notes.append(f"{nodes} graph nodes checked: pure tensor operators only")
            notes.append("TorchScript is deprecated upstream; prefer torch.export (.pt2)")
        elif fmt == "onnx":
            module, shape = load_onnx(path, notes, max_bytes)
            nodes = check_onnx_module(module, path)
            check_names(module_names(module), path)
            notes.append(f"{nodes} converted graph nodes checked")
        elif fmt == "safetensors":
            from safetensors.torch import load_file

            module = _load_state_into(load_file(str(path)), arch, num_classes, path)
        else:
            module, fmt = _load_pickle(path, arch, num_classes, unsafe_allow_pickle, notes)
    except ScanError:
        raise
    except Exception as exc:
        raise ScanError(
            f"cannot load this {fmt} file ({exc.__class__.__name__}: {str(exc).splitlines()[0][:140]})",
            path=path,
            hint="check that the file is complete and of a supported format",
        ) from exc
    if arch is not None and fmt in ("torch.export", "torchscript", "onnx", "pickle"):
        notes.append(f"--arch {arch} ignored: the file carries its own architecture")
    return _finish(
        LoadedModel(module=module, path=path, format=fmt, sha256=sha256_file(path), input_shape=shape, notes=notes),
        device,
    )


def _finish(loaded: LoadedModel, device: torch.device) -> LoadedModel:
    """Inference form, gradients off for the parameters, on the device, run in chunks when the batch is fixed."""
    module, shape = loaded.module, loaded.input_shape
    if loaded.format != "torch.export":  # an exported module is already in inference form and refuses .eval()
        module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    module.to(device)
    if shape is not None and shape and shape[0] is not None:
        loaded.notes.append(f"static batch size {shape[0]}: inputs are run in chunks of {shape[0]}")
        loaded.module = FixedBatch(module, shape[0])
    return loaded


def _load_folder(path: Path, arch: str | None, num_classes: int | None, limits: Limits) -> LoadedModel:
    """A Hugging Face or timm model folder: architecture, classes and preprocessing from its files."""
    from .hub import build_model, folder_digest, is_hub_folder, read_hub_folder

    if not is_hub_folder(path):
        raise ScanError(
            "a folder as CHECKPOINT must be a Hugging Face or timm model repository (with config.json)",
            path=path,
            hint="or pass the model file itself",
        )
    folder = read_hub_folder(path)
    if num_classes is not None and num_classes != folder.num_classes:
        raise ScanError(
            f"--num-classes {num_classes} disagrees with the folder, which declares {folder.num_classes} classes",
            path=path,
        )
    max_bytes = limits.memory_bytes()
    if sum(w.stat().st_size for w in folder.weights) > max_bytes:
        raise ScanError(
            f"refused: the weights are larger than the memory bound of {max_bytes >> 20} MiB",
            path=path,
            hint="raise --max-memory if the machine has the memory",
        )
    formats = {}
    for weights in folder.weights:
        formats[weights] = fmt = detect_format(weights)
        if fmt not in ("safetensors", "pickle"):
            raise ScanError(f"the weights are a {fmt} file, not safetensors or a state_dict", path=weights)
        check_archive(weights, fmt, max_bytes, limits.max_ratio, allow_pickle=False)

    def state() -> dict[str, torch.Tensor]:
        return {k: v for w, fmt in formats.items() for k, v in _read_weights(w, fmt).items()}

    notes = [f"{folder.kind} {folder.architecture}, {folder.num_classes} classes, read from the folder"]
    if arch is not None:
        notes.append(f"--arch {arch} ignored: the folder names its architecture")
    notes += folder.notes
    with guarded_loading():
        module = build_model(folder, state)
    shape = (None, folder.channels, *folder.input_size) if folder.input_size else None
    return LoadedModel(
        module=module,
        path=path,
        format=f"{folder.kind} folder",
        sha256=folder_digest(folder),
        input_shape=shape,
        notes=notes,
        hub=folder,
    )


def _read_weights(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """A weights file of a hub folder: safetensors, or a torch.save state_dict read weights-only."""
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ScanError(f"cannot read the safetensors file ({clean_label(exc, 120)})", path=path) from exc
    try:
        with guarded_loading():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ScanError(
            "refused: the weights file is a pickle that needs more than tensors",
            path=path,
            hint="convert it to safetensors where it was made",
        ) from exc
    return _unwrap_state_dict(obj, path)


class FixedBatch(nn.Module):
    """Runs a module exported with a fixed batch size on any batch, chunked and zero-padded."""

    def __init__(self, module: nn.Module, batch: int) -> None:
        super().__init__()
        self.inner, self.batch = module, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in x.split(self.batch):
            n = chunk.shape[0]
            if n < self.batch:
                pad = chunk.new_zeros((self.batch - n, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad])
            out = self.inner(chunk)
            if not isinstance(out, torch.Tensor):  # a structured output: handed on whole, for the probe to judge
                return out
            outs.append(out[:n])
        return torch.cat(outs)
