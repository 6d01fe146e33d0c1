"""JSON for machines: standard JSON only. RFC 8259 has no Infinity or NaN, and jq, GitHub's expressions and most
CI parsers refuse them, yet a margin or a threshold can be infinite (no candidate could ever flag). Every report,
manifest and `--json` line goes through `dumps`: a non-finite number is written as null."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, *, indent: int | None = 2) -> str:
    """Standard JSON (no Infinity, no NaN: those become null), refusing anything else that is not JSON."""
    return json.dumps(finite(value), indent=indent, allow_nan=False)
