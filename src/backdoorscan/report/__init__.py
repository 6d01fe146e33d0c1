"""Reports: JSON (versioned schema), trigger images, Markdown and SARIF for CI; written atomically.

| module | holds |
|---|---|
| `writer.py` | report folders written whole or not at all (`atomic_output_dir`), scan and filter reports |
| `images.py` | triggers, masks, UAPs and warp fields as PNG grids |
| `markdown.py` | the Markdown summaries (a step summary, a PR comment) |
| `sarif.py` | SARIF 2.1.0 for code scanning |
| `rows.py` | the lines every renderer shows for the families (what was covered, what fired) |
| `uap_file.py` | the screen's UAP file (`--save-uap` / `--uap`), bound to its model's sha256 |
| `trigger_file.py` | a scan's named triggers (`triggers.safetensors`) for the erasure screen, bound likewise |
| `tensor_file.py` | both files read as hostile: dtypes, ranks and declared sizes checked before any tensor is read |
"""

from importlib import import_module
from typing import TYPE_CHECKING

# imported on first use (PEP 562): the supervisor writes the child's report files through `writer` without torch
_EXPORTS = {
    "to_image": ".images",
    "trigger_grid": ".images",
    "visible_perturbation": ".images",
    "atomic_output_dir": ".writer",
    "write_filter_report": ".writer",
    "write_scan_report": ".writer",
    "write_text_atomic": ".writer",
}
__all__ = [
    "atomic_output_dir",
    "to_image",
    "trigger_grid",
    "visible_perturbation",
    "write_filter_report",
    "write_scan_report",
    "write_text_atomic",
]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .images import to_image, trigger_grid, visible_perturbation
    from .writer import atomic_output_dir, write_filter_report, write_scan_report, write_text_atomic
