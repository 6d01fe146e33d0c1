"""Run per-class work in class groups, halving the group when the GPU runs out of memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def in_class_groups(fn: Callable[[slice], T], num: int, group: int | None = None) -> list[T]:
    """Call fn on consecutive slices of range(num); a CUDA out-of-memory error halves the slice and retries it.

    The per-class problems are independent, so splitting them changes no result, only the peak memory.
    """
    group = max(1, min(group or num, num))
    results, start = [], 0
    while start < num:
        stop = min(num, start + group)
        try:
            results.append(fn(slice(start, stop)))
            start = stop
        except torch.cuda.OutOfMemoryError:
            if group == 1:
                raise
            torch.cuda.empty_cache()
            group = max(1, group // 2)
    return results
