"""Loaders: models in any supported format (safely), clean samples, and the [0, 1]-pixel model wrapper."""

from .models import LoadedModel, detect_format, load_model, resolve_arch, sha256_file
from .preprocess import InputSpec, PixelModel, make_spec, parse_size, probe_outputs
from .samples import (
    Batch,
    SampleSet,
    iter_images,
    load_samples,
    open_source,
    to_model_format,
    to_uint8_images,
)

__all__ = [
    "Batch", "InputSpec", "LoadedModel", "PixelModel", "SampleSet", "probe_outputs", "detect_format",
    "iter_images", "load_model", "load_samples", "make_spec", "open_source", "parse_size", "resolve_arch",
    "sha256_file", "to_model_format", "to_uint8_images",
]
