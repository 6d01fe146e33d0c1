"""Loaders: models in any supported format (safely), clean samples, the [0, 1]-pixel model wrapper, and the
setup (`prepare`) that both pipelines stand on. The names below are imported on first use (PEP 562), so that a
process that only supervises a scan (or names a `ModelSource`) never loads torch.

| module | holds |
|---|---|
| `models.py` | format detection and the safe loader of each format |
| `onnx.py` | ONNX: checked, renamed, repaired, converted with onnx2torch |
| `hub.py` | Hugging Face / timm folders (config, weights, labels), offline |
| `source.py` | `ModelSource`: a checkpoint plus what the user says about it |
| `preprocess.py` | `PixelModel`: resizing, normalisation and the 8-bit grid inside the model |
| `samples.py` | clean samples and inputs: npz, image folders, class balance |
| `extensions.py` | the file name extensions read as images (torch-free: the supervisor sorts copies by it) |
| `labels.py` | class names from files and models, made safe to show |
| `evidence.py` | checks that the scan can measure the model (accuracy, gradients, grid, search) |
| `setup.py` | `prepare`: model + samples + evidence, shared by both pipelines |
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "LoadedModel": ".models",
    "detect_format": ".models",
    "load_model": ".models",
    "resolve_arch": ".models",
    "sha256_file": ".models",
    "InputSpec": ".preprocess",
    "PixelModel": ".preprocess",
    "make_spec": ".preprocess",
    "probe_outputs": ".preprocess",
    "Batch": ".samples",
    "SampleSet": ".samples",
    "Source": ".samples",
    "iter_images": ".samples",
    "load_samples": ".samples",
    "open_source": ".samples",
    "to_model_format": ".samples",
    "to_uint8_images": ".samples",
    "Prepared": ".setup",
    "prepare": ".setup",
    "ModelSource": ".source",
}
__all__ = [
    "Batch",
    "InputSpec",
    "LoadedModel",
    "ModelSource",
    "PixelModel",
    "Prepared",
    "SampleSet",
    "Source",
    "detect_format",
    "iter_images",
    "load_model",
    "load_samples",
    "make_spec",
    "open_source",
    "prepare",
    "probe_outputs",
    "resolve_arch",
    "sha256_file",
    "to_model_format",
    "to_uint8_images",
]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .models import LoadedModel, detect_format, load_model, resolve_arch, sha256_file
    from .preprocess import InputSpec, PixelModel, make_spec, probe_outputs
    from .samples import (
        Batch,
        SampleSet,
        Source,
        iter_images,
        load_samples,
        open_source,
        to_model_format,
        to_uint8_images,
    )
    from .setup import Prepared, prepare
    from .source import ModelSource
