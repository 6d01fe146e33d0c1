"""backdoorscan: find backdoors in image classifiers (USB) and trigger-carrying images in datasets (UAP rule).

The public API returns dataclasses and is usable from a notebook:

    from backdoorscan import scan_model, filter_dataset
    report = scan_model("model.pt2", "clean_samples/")
    print(report.verdict, report.target_classes)
"""

__version__ = "0.1.0"

from .errors import ScanError  # noqa: E402
from .loading import load_model, load_samples  # noqa: E402
from .scan import ClassResult, ModelScan, ScanSettings, scan_model  # noqa: E402

__all__ = ["ClassResult", "ModelScan", "ScanError", "ScanSettings", "__version__", "load_model", "load_samples",
           "scan_model"]
