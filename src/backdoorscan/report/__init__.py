"""Reports: JSON (versioned schema), trigger images, a Markdown summary for CI; written atomically."""

from .images import to_image, trigger_grid, visible_perturbation
from .writer import atomic_output_dir, write_filter_report, write_scan_report, write_text_atomic

__all__ = ["atomic_output_dir", "to_image", "trigger_grid", "visible_perturbation", "write_filter_report",
           "write_scan_report", "write_text_atomic"]
