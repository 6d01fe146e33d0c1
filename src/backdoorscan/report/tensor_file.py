"""Reading a safetensors file the scanner wrote earlier (a UAP file, a triggers file) as the hostile input it may
be: every tensor's dtype, rank and declared size checked from the header before any is read, floats finite after.
One reader for both files, so that a check added for one holds for the other."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ScanError

KINDS = {  # safetensors dtype names by what a field may hold: class numbers are never floats, sizes never ints
    "float": {"F16", "BF16", "F32", "F64"},
    "int": {"I8", "I16", "I32", "I64", "U8"},
}


@dataclass(frozen=True)
class Field:
    """One tensor a file holds: its kind ("float" or "int"), its rank, and whether it may be absent."""

    kind: str
    ndim: int
    optional: bool = False


def read_tensors(
    path: Path, fields: dict[str, Field], *, max_elements: int, what: str, hint: str
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The file's metadata and its `fields` (absent optional ones left out), refused as one ScanError when it is
    missing, not safetensors, lacks a field, declares one of another dtype or rank, declares more than `max_elements`
    elements in all, or holds a float that is not finite."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ScanError(f"{what} not found", path=path, hint=hint)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            keys = set(fh.keys())
            total = 0
            for key, field in fields.items():
                if key not in keys:
                    if field.optional:
                        continue
                    raise ScanError(f"not a {what}: it holds no {key!r}", path=path, hint=hint)
                declared = fh.get_slice(key)
                shape, dtype = list(declared.get_shape()), declared.get_dtype()
                if dtype not in KINDS[field.kind] or len(shape) != field.ndim:
                    raise ScanError(
                        f"the {what}'s {key!r} is {dtype} of rank {len(shape)}; expected {field.kind} of rank "
                        f"{field.ndim}",
                        path=path,
                        hint=hint,
                    )
                total += math.prod(shape)
            if total > max_elements:
                raise ScanError(f"the {what} declares {total} values, more than {max_elements}", path=path, hint=hint)
            tensors = {key: fh.get_tensor(key) for key in fields if key in keys}
    except ScanError:
        raise
    except Exception as exc:  # the safetensors parser's own refusals (bad header, offsets past the end)
        raise ScanError(f"not a {what} ({str(exc)[:80]})", path=path, hint=hint) from exc
    for key, tensor in tensors.items():
        if fields[key].kind == "float" and not bool(torch.isfinite(tensor).all()):
            raise ScanError(f"the {what}'s {key!r} holds values that are not finite", path=path)
    return meta, tensors
