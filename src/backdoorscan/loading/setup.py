"""The setup both pipelines stand on: load the model safely, settle its input, probe it, draw clean samples.

The probe's first forward runs under a time limit, and the evidence checks (one logits output, labels within the
output, clean accuracy, input gradients) are measured here, once, for the model scan and the dataset filter alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..device import resolve_device
from ..evidence import Evidence, check_gradients, check_predictions
from ..perturb.uap import predict
from ..safety.limits import Limits, call_with_timeout
from .models import LoadedModel, load_model
from .preprocess import PixelModel, make_spec, probe_outputs
from .samples import NpzSource, SampleSet, load_samples, open_source


@dataclass
class Prepared:
    """A model ready to scan: the [0, 1]-pixel wrapper, what was loaded, the clean samples and the evidence."""

    model: PixelModel
    loaded: LoadedModel | None
    samples: SampleSet | None  # None when the probe already showed the model cannot be measured
    predictions: torch.Tensor | None  # the model's labels of the samples, on the device
    device: torch.device
    num_classes: int
    evidence: Evidence


def prepare(checkpoint: str | Path | nn.Module, data: str | Path, *, arch: str | None = None,
            num_classes: int | None = None, input_size: tuple[int, int] | None = None, channels: int | None = None,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            device: str | torch.device = "auto", unsafe_allow_pickle: bool = False, samples: int = 300,
            seed: int = 0, limits: Limits | None = None) -> Prepared:
    """Load the model and a class-balanced draw of clean samples on the scan's device, and measure the evidence."""
    limits = limits or Limits()
    limits.check()
    dev = resolve_device(device)
    if isinstance(checkpoint, nn.Module):
        loaded, module, declared = None, checkpoint.eval().to(dev), None
        for param in module.parameters():
            param.requires_grad_(False)
    else:
        loaded = load_model(checkpoint, arch=arch, num_classes=num_classes,
                            unsafe_allow_pickle=unsafe_allow_pickle, device=dev, limits=limits)
        module, declared = loaded.module, loaded.input_shape
    spec = make_spec(module, declared, input_size=input_size, channels=channels, mean=mean, std=std,
                     data_size=data_size(data))
    model = PixelModel(module, spec).to(dev)
    evidence = Evidence()
    k, problem = call_with_timeout(lambda: probe_outputs(model, spec, dev, num_classes), limits.forward_timeout,
                                   "the model's first forward")
    evidence.record("single_logits_output", problem is None, problem or "", num_classes=k)
    if problem is not None:
        return Prepared(model, loaded, None, None, dev, k, evidence)
    sample_set = load_samples(data, spec.shape, samples, seed, predict=lambda x: predict(model, x.to(dev)))
    sample_set.x = sample_set.x.to(dev)
    pred = predict(model, sample_set.x)
    check_predictions(evidence, pred, sample_set.y, sample_set.labels_from, k)
    check_gradients(evidence, model, sample_set.x, pred)
    return Prepared(model, loaded, sample_set, pred, dev, k, evidence)


def data_size(data: str | Path) -> tuple[int, int] | None:
    """Height and width of the first sample, used when neither the flags nor the model say the size."""
    source = open_source(data)
    first = next(iter(source.blocks(1)))[1][0] if isinstance(source, NpzSource) else source.read(0)
    return None if first is None else (int(first.shape[0]), int(first.shape[1]))
