"""Loaders: models in any supported format (safely), clean samples, the [0, 1]-pixel model wrapper, and the
setup (`prepare`) that both pipelines stand on.

| module | holds |
|---|---|
| `models.py` | format detection and the safe loader of each format |
| `onnx.py` | ONNX: checked, renamed, repaired, converted with onnx2torch |
| `hub.py` | Hugging Face / timm folders (config, weights, labels), offline |
| `source.py` | `ModelSource`: a checkpoint plus what the user says about it |
| `preprocess.py` | `PixelModel`: resizing, normalisation and the 8-bit grid inside the model |
| `samples.py` | clean samples and inputs: npz, image folders, class balance |
| `labels.py` | class names from files and models, made safe to show |
| `evidence.py` | checks that the scan can measure the model (accuracy, gradients, grid, search) |
| `setup.py` | `prepare`: model + samples + evidence, shared by both pipelines |
"""

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
    "prepare",
    "probe_outputs",
    "iter_images",
    "load_model",
    "load_samples",
    "make_spec",
    "open_source",
    "resolve_arch",
    "sha256_file",
    "to_model_format",
    "to_uint8_images",
]
