"""backdoorscan: find backdoors in image classifiers (USB) and trigger-carrying images in datasets (UAP rule).

The public API returns dataclasses and is usable from a notebook:

    from backdoorscan import ModelSource, ScanSettings, filter_dataset, scan_model
    report = scan_model("model.pt2", "clean_samples/")
    print(report.verdict, report.target_classes)
    weights = ModelSource("weights.safetensors", arch="resnet18", mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225))
    report = scan_model(weights, "clean_samples/", settings=ScanSettings(steps=300))
    screened = filter_dataset("model.pt2", "clean_samples/", "incoming/")
    print(screened.flagged, "of", screened.total)
"""

__version__ = "0.23.0"  # bumped with every change of behaviour (figures, verdicts, formats): see CHANGELOG.md

from importlib import import_module  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

# The public names, imported on first use (PEP 562) so that `backdoorscan --help` does not load torch.
_EXPORTS = {
    "ClassResult": ".usb.pipeline",
    "ModelScan": ".usb.pipeline",
    "scan_model": ".usb.pipeline",
    "FilterResult": ".screen.pipeline",
    "filter_dataset": ".screen.pipeline",
    "FilterSettings": ".core.settings",
    "ScanSettings": ".core.settings",
    "Inconclusive": ".core.errors",
    "ScanError": ".core.errors",
    "ModelSource": ".loading",
    "load_model": ".loading",
    "load_samples": ".loading",
}
__all__ = [
    "ClassResult",
    "FilterResult",
    "FilterSettings",
    "Inconclusive",
    "ModelScan",
    "ModelSource",
    "ScanError",
    "ScanSettings",
    "__version__",
    "filter_dataset",
    "load_model",
    "load_samples",
    "scan_model",
]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .core.errors import Inconclusive, ScanError
    from .core.settings import FilterSettings, ScanSettings
    from .loading import ModelSource, load_model, load_samples
    from .screen.pipeline import FilterResult, filter_dataset
    from .usb.pipeline import ClassResult, ModelScan, scan_model
