"""Run per-class work in class groups sized to the memory at hand, halving a group when the GPU runs out of memory.

The class dimension is a batch dimension: all K classes' problems run as one batch when they fit. The group size
comes from a memory budget (`memory_budget`) over what one class's batch needs, measured on the model
(`bytes_per_sample`); `--class-group` overrides it.
"""

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


def slice_progress(
    progress: Callable[[int, int], None] | None,
    sl: slice,
    num: int,
) -> Callable[[int, int], None]:
    """Progress of one slice's steps as a share of the whole phase (num items), in item-steps: one rising count
    to its end whatever the group size, also after an out-of-memory halving."""

    def tick(done: int, steps: int) -> None:
        if progress is not None:
            progress(sl.start * steps + done * (sl.stop - sl.start), num * steps)

    return tick


OVERHEAD = 3.0  # saved activations, their gradients and the step's temporaries, over the saved bytes alone


def bytes_per_sample(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps per input sample for a forward+backward of `model`: the difference between a forward
    of four samples and of two, so that weights (saved once, whatever the batch) do not count.

    Counted with saved-tensor hooks, so it works for any module (exported graphs, converted ONNX) on any device.
    """

    def saved(n: int) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without a plain storage
                seen[id(t)] = t.numel() * t.element_size()
            return t

        xb = x[:1].detach().expand(n, *x.shape[1:]).clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(xb)
        return sum(seen.values()) + 2 * xb.numel() * xb.element_size() + out.numel() * out.element_size()

    return max(1, int((saved(4) - saved(2)) / 2))


def memory_budget(device: torch.device, max_memory: int | None, available: int) -> int:
    """Bytes the per-class batches may use: 80 % of the GPU's free memory, or half the CPU memory available,
    never more than `max_memory` (the scan's --max-memory) when it is set."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.8)
    else:
        budget = int(available * 0.5)
    return min(budget, max_memory) if max_memory is not None else budget


def auto_class_group(per_sample: int, samples_per_class: int, num_classes: int, budget: int) -> int:
    """How many classes fit in one batch: the budget over the bytes one class's samples need, between 1 and all."""
    per_class = per_sample * samples_per_class * OVERHEAD
    return int(max(1, min(num_classes, budget // max(1, int(per_class)))))
