"""Model folders as hubs ship them: a Hugging Face transformers image classifier or a timm model.

The folder's JSON files say which architecture to build, how many classes it has, what its classes are called and
how its inputs are prepared; the weights come from safetensors (or a weights-only `pytorch_model.bin`). Nothing in
the folder runs as code: a transformers config that needs `trust_remote_code` (`auto_map`) is refused, timm and
transformers build only architectures their registries name, and the JSON is read with size and type checks. A
folder whose preprocessing is missing or incomplete is refused rather than scanned with a guessed default.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import ScanError
from .labels import clean_label

JSON_LIMIT = 4 << 20  # bytes: a config larger than this is not a config
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's numbers
EXTRA = "hub"  # pip install 'backdoorscan[hub]'
_FORBIDDEN_ARG = re.compile(r"pretrained|path|file|url|checkpoint|cfg|overlay|hub", re.IGNORECASE)


@dataclass
class HubFolder:
    """What a hub folder declares: how to build the model, its classes and its preprocessing."""

    kind: str  # "transformers" or "timm"
    path: Path
    architecture: str
    num_classes: int
    channels: int
    config: dict[str, Any]
    weights: list[Path]
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resample: str | None = None
    labels: list[str] | None = None
    preprocessing_from: str | None = None  # the file the preprocessing was read from
    missing: str | None = None  # why the preprocessing could not be read, when it could not
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """What was read from the folder, for the report's `model.read_from_folder`."""
        return {
            "kind": self.kind,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "input_size": list(self.input_size) if self.input_size else None,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "resample": self.resample,
            "labels": len(self.labels) if self.labels else 0,
            "preprocessing_from": self.preprocessing_from,
            "weights": [w.name for w in self.weights],
        }


def is_hub_folder(path: Path) -> bool:
    """A folder with a config.json (the one thing every hub model folder has)."""
    return path.is_dir() and (path / "config.json").is_file()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a hub folder, bounded in size, with NaN and infinities refused."""
    from ..safety.files import inside_folder, read_text_bounded

    if not path.is_file():
        raise ScanError("file not found", path=path)
    inside_folder(path, path.parent)
    text = read_text_bounded(path, JSON_LIMIT, "JSON file")

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ScanError(f"not valid JSON ({str(exc)[:100]})", path=path) from exc
    if not isinstance(value, dict):
        raise ScanError("a JSON object was expected", path=path)
    return value


MAX_CLASSES = 100_000  # a declared class count beyond this (ImageNet-22k has 21,843) is refused
_INFORMATIONAL = frozenset({"_name_or_path"})  # where the model was saved from: never read by a loader
_NAMES = frozenset({"id2label", "label2id", "label_names"})  # class names: data shown escaped, never opened
_DEPTH = 32  # nesting a config may have


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "\\", "~", "file:"))
        or "://" in value
        or ".." in value.replace("\\", "/").split("/")
        or (len(value) > 1 and value[1] == ":" and value[0].isalpha())  # C:
    )


def check_no_paths(value: Any, where: Path, key: str = "", depth: int = 0) -> None:
    """Refuse a config that names a file, folder or URL anywhere (a loader could follow it: timm_wrapper passes
    `model_args.checkpoint_path` to timm); `_name_or_path` is only informational."""
    if depth > _DEPTH:
        raise ScanError("refused: the config is nested too deeply", path=where)
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k) not in _INFORMATIONAL and not (depth == 0 and str(k) in _NAMES):
                check_no_paths(v, where, f"{key}.{k}" if key else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_no_paths(v, where, f"{key}[{i}]", depth + 1)
    elif isinstance(value, str) and _looks_like_path(value):
        raise ScanError(f"refused: {clean_label(key, 60)} names a path or URL ({clean_label(value, 60)!r})", path=where)


def plain_model_args(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """`model_args` as a builder may take them: plain values under keys that name no file, checkpoint or URL."""
    args = config.get("model_args") or {}
    if not isinstance(args, dict):
        raise ScanError("model_args is not an object", path=where)
    for key, value in args.items():
        if _FORBIDDEN_ARG.search(str(key)) or not isinstance(value, (int, float, str, bool)):
            raise ScanError(
                f"refused: model_args.{clean_label(key, 40)} is not a plain architecture setting", path=where
            )
    return {str(k): v for k, v in args.items()}


def read_hub_folder(path: Path) -> HubFolder:
    """Tell a transformers folder from a timm folder and read what each declares (no extra needed yet)."""
    config = read_json(path / "config.json")
    check_no_paths(config, path / "config.json")
    plain_model_args(config, path / "config.json")  # timm folders and transformers' timm_wrapper pass them on
    if "model_type" in config:
        return _read_transformers(path, config)
    if isinstance(config.get("architecture"), str):
        return _read_timm(path, config)
    raise ScanError(
        "config.json is neither a transformers config (model_type) nor a timm config (architecture)",
        path=path,
        hint="a folder as CHECKPOINT must be a Hugging Face or timm model repository",
    )


def _weights(path: Path) -> list[Path]:
    """The weight files, preferring safetensors; shards listed in an index must be plain names in the folder; no
    weight file may be a link out of the folder."""
    from ..safety.files import inside_folder

    files = _weight_files(path)
    for file in files:
        inside_folder(file, path)
    return files


def _weight_files(path: Path) -> list[Path]:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ScanError("the shard index has no weight_map", path=index)
        shards = sorted({str(v) for v in weight_map.values()})
        for name in shards:
            if Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
                raise ScanError(
                    f"refused: the shard index names {clean_label(name)!r}, not a .safetensors file in the folder",
                    path=index,
                )
            if not (path / name).is_file():
                raise ScanError(f"shard {name} is missing", path=path, hint="download the whole repository")
        return [path / name for name in shards]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]  # read weights-only; a pickle that needs more is refused
    raise ScanError(
        "the folder has no weights (model.safetensors, its shards or pytorch_model.bin)",
        path=path,
        hint="download the weights with the configuration",
    )


def _labels_from(id2label: Any, k: int) -> list[str] | None:
    """id2label ({"0": "cat", ...}) as a list, when it names every class 0..k-1; None otherwise."""
    if not isinstance(id2label, dict) or len(id2label) != k:
        return None
    try:
        named = {int(i): clean_label(v) for i, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if sorted(named) != list(range(k)):
        return None
    labels = [named[i] for i in range(k)]
    return None if labels == [f"LABEL_{i}" for i in range(k)] else labels  # transformers' placeholder names


def _floats(value: Any, name: str, where: Path, channels: int) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) for v in value):
        raise ScanError(f"{name} is not a list of numbers", path=where)
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        values *= channels
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise ScanError(f"{name} has {len(values)} values for {channels} channels", path=where)
    return values


def _classes(value: Any, name: str, where: Path) -> int:
    """A declared class count: a whole number from 2 to MAX_CLASSES (a head of 10**9 classes is not built)."""
    if type(value) is not int or not 2 <= value <= MAX_CLASSES:
        raise ScanError(f"{name} {clean_label(value, 20)} is not a class count from 2 to {MAX_CLASSES:,}", path=where)
    return value


def _channels(value: Any, name: str, where: Path) -> int:
    """Input channels: the integer 1 or 3 (not 1.0 or true)."""
    if type(value) is not int or value not in (1, 3):
        raise ScanError(f"{name} {clean_label(value, 20)} is not 1 or 3", path=where)
    return value


def _side(value: Any, where: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
        raise ScanError(f"an input side of {clean_label(value, 20)!r} is not a size in pixels", path=where)
    return value


def _read_transformers(path: Path, config: dict[str, Any]) -> HubFolder:
    if "auto_map" in config or any(path.glob("*.py")):
        raise ScanError(
            "refused: this model needs trust_remote_code (its repository ships Python code that "
            "would run); backdoorscan never runs repository code",
            path=path,
            hint="scan an export of it (torch.export .pt2 or ONNX) made where the code is trusted",
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ScanError("model_type is not a string", path=path / "config.json")
    labels_map = config.get("id2label")
    if isinstance(labels_map, dict) and labels_map:
        k = _classes(len(labels_map), "id2label's label count", path / "config.json")
    else:
        k = _classes(config.get("num_labels", 2), "num_labels", path / "config.json")
    channels = _channels(config.get("num_channels", 3), "num_channels", path / "config.json")
    archs = config.get("architectures")
    arch = clean_label(archs[0]) if isinstance(archs, list) and archs else model_type
    folder = HubFolder(
        kind="transformers",
        path=path,
        architecture=arch,
        num_classes=k,
        channels=channels,
        config=config,
        weights=_weights(path),
        labels=_labels_from(labels_map, k),
    )
    _transformers_preprocessing(folder)
    return folder


def _transformers_preprocessing(folder: HubFolder) -> None:
    """Size, mean, std, rescale and resample from preprocessor_config.json, folded into [0, 1]-pixel terms.

    The processor computes ((pixel * rescale_factor) - mean) / std on 0..255 pixels; on [0, 1] pixels x that is
    (x - mean / s) / (std / s) with s = 255 * rescale_factor, so the wrapper's mean and std are scaled by 1 / s.
    """
    where = folder.path / "preprocessor_config.json"
    if not where.is_file():
        folder.missing = (
            "the folder has no preprocessor_config.json, so its input size, mean and std are unknown; "
            "scanning with a guess would skew every trigger norm"
        )
        return
    pre = read_json(where)
    c = folder.channels
    if pre.get("do_center_crop") and isinstance(pre.get("crop_size"), (dict, int)):
        size = pre["crop_size"]
    else:
        size = pre.get("size")
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if isinstance(size, dict) and "height" in size and "width" in size:
        folder.input_size = (_side(size["height"], where), _side(size["width"], where))
    elif isinstance(size, dict) and "shortest_edge" in size:
        side = _side(size["shortest_edge"], where)
        folder.input_size = (side, side)
        folder.notes.append(f"size shortest_edge {side}: scanned at {side}x{side}")
    else:
        folder.missing = "preprocessor_config.json declares no input size (size: height and width or shortest_edge)"
        return
    if pre.get("do_normalize", True):
        if "image_mean" not in pre or "image_std" not in pre:
            folder.missing = "preprocessor_config.json normalises (do_normalize) but gives no image_mean/image_std"
            return
        mean, std = _floats(pre["image_mean"], "image_mean", where, c), _floats(pre["image_std"], "image_std", where, c)
    else:
        mean, std = (0.0,) * c, (1.0,) * c
    factor = pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0
    if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise ScanError("rescale_factor is not a positive number", path=where)
    s = 255.0 * float(factor)
    if any(v <= 0 for v in std):
        raise ScanError("image_std has a value that is not positive", path=where)
    folder.mean = tuple(m / s for m in mean)
    folder.std = tuple(v / s for v in std)
    if abs(s - 1.0) > 1e-6:
        folder.notes.append(f"rescale to {s:g} x [0, 1] folded into mean and std")
    resample = pre.get("resample")
    folder.resample = RESAMPLE.get(resample) if isinstance(resample, int) else None
    folder.preprocessing_from = where.name


def _read_timm(path: Path, config: dict[str, Any]) -> HubFolder:
    where = path / "config.json"
    cfg = config.get("pretrained_cfg")
    k = config.get("num_classes", cfg.get("num_classes") if isinstance(cfg, dict) else None)
    k = _classes(k, "num_classes", where)
    args = config.get("model_args") or {}
    if not isinstance(args, dict):
        raise ScanError("model_args is not an object", path=where)
    channels = _channels(args.get("in_chans", 3), "in_chans", where)
    names = config.get("label_names")
    labels = [clean_label(v) for v in names] if isinstance(names, list) and len(names) == k else None
    folder = HubFolder(
        kind="timm",
        path=path,
        architecture=clean_label(config["architecture"]),
        num_classes=k,
        channels=channels,
        config=config,
        weights=_weights(path),
        labels=labels,
    )
    if not isinstance(cfg, dict):
        folder.missing = "config.json has no pretrained_cfg, so the input size, mean and std are unknown"
        return folder
    size = cfg.get("input_size")
    if not (isinstance(size, list) and len(size) == 3) or "mean" not in cfg or "std" not in cfg:
        folder.missing = "pretrained_cfg lacks input_size, mean or std"
        return folder
    folder.input_size = (_side(size[1], where), _side(size[2], where))
    folder.mean = _floats(cfg["mean"], "pretrained_cfg.mean", where, channels)
    folder.std = _floats(cfg["std"], "pretrained_cfg.std", where, channels)
    if any(v <= 0 for v in folder.std):
        raise ScanError("pretrained_cfg.std has a value that is not positive", path=where)
    interpolation = cfg.get("interpolation")
    folder.resample = clean_label(interpolation, 20) if isinstance(interpolation, str) else None
    folder.preprocessing_from = "config.json (pretrained_cfg)"
    return folder


def _need(module: str) -> Any:
    """Import an optional extra, or exit 2 naming it."""
    try:
        return __import__(module)
    except ImportError as exc:
        raise ScanError(
            f"reading this folder needs {module}, which is not installed",
            hint=f"pip install 'backdoorscan[{EXTRA}]' (or pip install {module})",
        ) from exc


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own logging and progress bars stay off stdout and stderr while it loads."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class Logits(nn.Module):
    """A transformers classifier as a plain module: pixel values in, the logits tensor out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x, return_dict=True).logits


def build_model(folder: HubFolder, state: Callable[[], dict[str, torch.Tensor]]) -> nn.Module:
    """The folder's architecture from its library's registry with its weights, every key accounted for.

    transformers reads the weights itself (weights-only), from the files `read_hub_folder` checked; timm's come
    from `state()`."""
    if folder.kind == "transformers":
        with offline():
            return _build_transformers(folder)
    return _build_timm(folder, state)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """While transformers builds a model: no hub access (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE), restored after."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _build_transformers(folder: HubFolder) -> nn.Module:
    """A transformers image classifier from the folder's config and weights (offline, no remote code)."""
    _need("transformers")
    from transformers import AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    model_type = folder.config["model_type"]
    if model_type not in CONFIG_MAPPING or model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        raise ScanError(
            f"model_type {clean_label(model_type, 40)!r} is not an image classifier transformers knows",
            path=folder.path / "config.json",
        )
    safetensors = folder.weights[0].suffix == ".safetensors"
    try:  # transformers maps the saved key names onto its modules (they differ between its versions)
        with _quiet_transformers():
            module, info = AutoModelForImageClassification.from_pretrained(
                str(folder.path),
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=safetensors,
                output_loading_info=True,
            )
    except Exception as exc:
        raise ScanError(
            f"transformers cannot build this model ({type(exc).__name__}: {clean_label(exc, 140)})",
            path=folder.path / "config.json",
        ) from exc
    problems = [
        (what, keys)
        for what in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if (keys := list(info.get(what) or ()))
    ]
    if problems:
        what, keys = problems[0]
        shown = ", ".join(clean_label(k, 60) for k in keys[:3])
        raise ScanError(
            f"the weights do not match the configured {folder.architecture}: {len(keys)} "
            f"{what.replace('_', ' ')} ({shown})",
            path=folder.weights[0],
        )
    return Logits(module)


def _build_timm(folder: HubFolder, state: Callable[[], dict[str, torch.Tensor]]) -> nn.Module:
    """A timm architecture from its registry, with the folder's plain model_args and weights."""
    timm = _need("timm")
    if folder.architecture not in timm.list_models():
        raise ScanError(
            f"architecture {folder.architecture!r} is not in timm's registry",
            path=folder.path / "config.json",
            hint="upgrade timm if the model is newer than it",
        )
    kwargs = plain_model_args(folder.config, folder.path / "config.json")
    kwargs["num_classes"] = folder.num_classes
    try:
        module = timm.create_model(folder.architecture, pretrained=False, **kwargs)
    except Exception as exc:
        raise ScanError(
            f"timm cannot build {folder.architecture} ({type(exc).__name__}: {clean_label(exc, 140)})",
            path=folder.path / "config.json",
        ) from exc
    _load_strict(module, state(), folder)
    return module


def timm_arch(name: str, num_classes: int | None, in_chans: int | None = None) -> nn.Module:
    """`--arch timm:NAME`: an untrained timm architecture for a bare state_dict or safetensors file (the input
    channels read from the weights' first convolution)."""
    timm = _need("timm")
    if name not in timm.list_models():
        raise ScanError(f"--arch timm:{name}: not in timm's registry", hint="see timm.list_models()")
    kwargs = {key: v for key, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    return timm.create_model(name, pretrained=False, **kwargs)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], folder: HubFolder) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    wrong = missing or result.unexpected_keys
    if wrong:
        shown = ", ".join(clean_label(k, 60) for k in wrong[:3])
        what = "missing from" if missing else "unexpected in"
        raise ScanError(
            f"the weights do not match the configured {folder.architecture}: {len(wrong)} keys {what} "
            f"the weights ({shown})",
            path=folder.weights[0],
        )


def folder_digest(folder: HubFolder, deadline: float | None = None) -> str:
    """sha256 over the folder's config, preprocessing and weight files (names and contents), in a fixed order."""
    from ..core.digest import files_digest

    files = [folder.path / "config.json", *folder.weights]
    if (folder.path / "preprocessor_config.json").is_file():
        files.append(folder.path / "preprocessor_config.json")
    return files_digest(folder.path, files, deadline)
