"""The setup both pipelines stand on: load the model safely, settle its input, probe it, draw clean samples.

`prepare` resolves the device once, opens the data once, runs the probe's first forward under a time limit, and
measures the evidence checks (one logits output, labels within the output, clean accuracy, input gradients) for
the model scan and the dataset filter alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..core.device import DEFAULT_DEVICE, resolve_device
from ..core.errors import ScanError
from ..perturb.evaluate import predict
from ..safety.limits import Limits, call_with_timeout
from .evidence import (
    Evidence,
    check_batch_sizes,
    check_coverage,
    check_gradients,
    check_grid,
    check_predictions,
)
from .labels import clean_label
from .models import LoadedModel, load_model
from .preprocess import InputSpec, PixelModel, make_spec, probe_outputs
from .samples import Batch, SampleSet, Source, load_samples, map_folders_by_name, open_source, top_up
from .source import ModelSource


@dataclass
class Prepared:
    """A model ready to scan: the [0, 1]-pixel wrapper, what was loaded, the clean samples and the evidence."""

    model: PixelModel
    loaded: LoadedModel | None  # None for a module given in memory
    samples: SampleSet | None  # None when the probe already showed the model cannot be measured
    predictions: torch.Tensor | None  # the model's labels of the samples, on the device
    device: torch.device
    num_classes: int
    evidence: Evidence
    labels: list[str] | None = None  # class names: --labels, else the model's own, else the data's class folders
    overrides: list[str] | None = None  # flags that replaced what a hub folder declared
    extra: Batch | None = None  # samples read beyond the draw for classes the model seldom predicts (`top_up`)

    @property
    def spec(self) -> InputSpec:
        """What the wrapped model takes: channels, size and the model's own preprocessing."""
        return self.model.spec

    def model_info(self) -> dict:
        """What was scanned, for reports: path, sha256, format, a description and the number of classes."""
        if self.loaded is None:
            return {
                "path": None,
                "sha256": None,
                "format": "nn.Module",
                "description": type(self.model.model).__name__,
                "num_classes": self.num_classes,
            }
        info = {
            "path": str(self.loaded.path),
            "sha256": self.loaded.sha256,
            "format": self.loaded.format,
            "description": self.loaded.description,
            "num_classes": self.num_classes,
        }
        if self.loaded.hub is not None:
            info["read_from_folder"] = self.loaded.hub.to_dict()
            info["overrides"] = self.overrides or []
        return info


def prepare(
    source: ModelSource,
    data: str | Path,
    *,
    samples: int,
    seed: int,
    device: str | torch.device = DEFAULT_DEVICE,
    limits: Limits | None = None,
    per_class: int = 0,
) -> Prepared:
    """Load the model and a class-balanced draw of clean samples on the scan's device, and measure the evidence;
    with `per_class`, read more of the data for the classes the model predicts fewer times in the draw (`extra`)."""
    limits = limits or Limits()
    dev = resolve_device(device)
    if isinstance(source.checkpoint, nn.Module):
        loaded, module, declared = None, _eval(source.checkpoint).to(dev), None
        for param in module.parameters():
            param.requires_grad_(False)
    else:
        loaded = load_model(
            source.checkpoint,
            arch=source.arch,
            num_classes=source.num_classes,
            unsafe_allow_pickle=source.unsafe_allow_pickle,
            device=dev,
            limits=limits,
        )
        module, declared = loaded.module, loaded.input_shape
    images: Source = open_source(data)
    declared, mean, std, overrides = _folder_preprocessing(loaded, declared, source)
    spec = make_spec(
        module,
        declared,
        input_size=source.input_size,
        channels=source.channels,
        mean=mean,
        std=std,
        data_size=images.image_size(),
    )
    model = PixelModel(module, spec).to(dev)
    evidence = Evidence()
    k, problem = call_with_timeout(
        lambda: probe_outputs(model, spec, dev, source.num_classes), limits.forward_timeout, "the model's first forward"
    )
    evidence.record("single_logits_output", problem is None, problem or "", num_classes=k)
    if problem is not None:
        return Prepared(model, loaded, None, None, dev, k, evidence, overrides=overrides)
    sample_set = load_samples(images, spec.shape, n=samples, seed=seed, predict=lambda x: predict(model, x.to(dev)))
    sample_set.x = sample_set.x.to(dev)
    names = _labels(source, loaded, sample_set, k)
    if source.labels is not None or (loaded is not None and loaded.hub is not None and loaded.hub.labels):
        note = map_folders_by_name(sample_set, names or [])  # the model's own names: class folders map by them
        if note is not None:
            evidence.notes.append(note)
    pred = predict(model, sample_set.x)
    check_predictions(evidence, pred, sample_set.y, sample_set.labels_from, k)
    check_coverage(evidence, sample_set.y if sample_set.y is not None else pred, sample_set.labels_from, k)
    _sample_notes(evidence, sample_set)
    check_gradients(evidence, model, sample_set.x, pred)
    check_grid(evidence, model, sample_set.x, seed)
    check_batch_sizes(evidence, model, sample_set.x)
    extra = None
    if per_class > 0:
        extra = top_up(
            images,
            spec.shape,
            sample_set,
            pred,
            k=k,
            need=per_class,
            seed=seed,
            predict=lambda x: predict(model, x.to(dev)),
        )
        if extra is not None:
            extra.x, extra.y = extra.x.to(dev), extra.y.to(dev) if extra.y is not None else None
            classes = sorted(set(extra.y.tolist())) if extra.y is not None else []
            evidence.notes.append(
                f"{len(extra.x)} more clean images read for the classes the model predicted fewer than {per_class} "
                f"times among the samples ({', '.join(map(str, classes))}): the pairs stage fits its patches on them"
            )
    return Prepared(model, loaded, sample_set, pred, dev, k, evidence, names, overrides, extra)


def _eval(module: nn.Module) -> nn.Module:
    """A module in eval mode; one from `torch.export` (refusing `.eval()`) is already in the mode it was exported in,
    so a module holding one is put in eval mode part by part."""
    try:
        return module.eval()
    except NotImplementedError:
        for part in module.modules():
            part.training = False  # the flag only: `train()` is what an exported module refuses
        return module


def _sample_notes(evidence: Evidence, samples: SampleSet) -> None:
    """What the data held back: fewer samples than asked, files that could not be read."""
    got = int(samples.x.shape[0])
    if got < samples.requested:
        evidence.notes.append(f"{got} clean samples used of the {samples.requested} asked (--samples)")
    if samples.skipped:
        evidence.notes.append(
            f"{len(samples.skipped)} file(s) in the clean data could not be read and were left out "
            f"(first: {samples.skipped[0]})"
        )


def _folder_preprocessing(
    loaded: LoadedModel | None, declared: tuple | None, source: ModelSource
) -> tuple[tuple | None, tuple | None, tuple | None, list[str]]:
    """A hub folder's size, mean and std unless a flag overrides them (each override noted); a folder whose
    preprocessing could not be read needs all three flags, never a silent default."""
    hub = None if loaded is None else loaded.hub
    if hub is None:
        return declared, source.mean, source.std, []
    given = {"input_size": source.input_size, "mean": source.mean, "std": source.std}
    if hub.missing is not None and None in given.values():
        raise ScanError(hub.missing, path=hub.path, hint="give --input-size, --mean and --std to scan it anyway")
    overrides = [
        f"--{name.replace('_', '-')} {_show(value)} overrides the folder's {_show(getattr(hub, name))}"
        for name, value in given.items()
        if value is not None and _differs(value, getattr(hub, name))
    ]
    if source.input_size is not None:
        declared = (None, hub.channels, None, None)  # the user's size is the model's: no resize to the folder's
    return (
        declared,
        source.mean if source.mean is not None else hub.mean,
        source.std if source.std is not None else hub.std,
        overrides,
    )


def _differs(given: tuple, declared: tuple | None) -> bool:
    if declared is None or len(given) != len(declared):
        return True
    return any(abs(a - b) > 1e-9 for a, b in zip(given, declared, strict=True))


def _show(value: tuple | None) -> str:
    return "nothing" if value is None else ",".join(f"{v:g}" for v in value)


def _labels(source: ModelSource, loaded: LoadedModel | None, samples: SampleSet, k: int) -> list[str] | None:
    """Class names: --labels (checked against the model), else the model's own, else the data's class folders."""
    if source.labels is not None:
        if len(source.labels) != k:
            raise ScanError(f"--labels names {len(source.labels)} classes but the model has {k}")
        return list(source.labels)
    if loaded is not None and loaded.hub is not None and loaded.hub.labels is not None:
        return list(loaded.hub.labels)
    names = samples.class_names
    if names is None or len(names) != k or names == [str(i) for i in range(k)]:
        return None  # digit classes named '0'..'9' add nothing
    return [clean_label(n) for n in names]
