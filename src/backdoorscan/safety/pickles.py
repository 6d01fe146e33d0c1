"""Read a pickle by opcode, never executing it, and say which globals it would import.

The reader simulates the pickle machine's stack just far enough to resolve `STACK_GLOBAL` operands (strings pushed
directly or fetched from the memo), so interleaved pushes, pops and memo tricks cannot hide an import. A global
whose name cannot be resolved is reported as `?` and refused like any other name outside the allowlist.
"""

from __future__ import annotations

import functools
import pickletools

UNRESOLVED = "?"
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_MARK = object()


class PickleFormatError(ValueError):
    """The bytes are not a well-formed pickle."""


def pickle_globals(data: bytes) -> set[str]:
    """Every `module.name` the pickle in `data` would import (`?` for a name it computes)."""
    found: set[str] = set()
    stack: list[object] = []
    memo: dict[int, object] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.add(str(arg).replace(" ", "."))
            if name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else bytes(arg or b"").decode("latin-1"))
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(int(arg or 0)))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg or 0)] = stack[-1] if stack else None
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "STACK_GLOBAL":
                module, attr = (stack.pop() if stack else None), (stack.pop() if stack else None)
                module, attr = attr, module
                ok = isinstance(module, str) and isinstance(attr, str)
                found.add(f"{module}.{attr}" if ok else UNRESOLVED)
                stack.append(None)
            elif name == "DUP":
                stack.append(stack[-1] if stack else None)
            else:
                _apply(op, stack)
            if name == "STOP":
                break
    except PickleFormatError:
        raise
    except Exception as exc:  # genops raises ValueError and others on malformed input
        raise PickleFormatError(str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__) from exc
    return found


def _apply(op: pickletools.OpcodeInfo, stack: list[object]) -> None:
    """Pop what `op` consumes and push placeholders for what it produces."""
    before = list(op.stack_before)
    if pickletools.stackslice in before:  # consumes everything down to the topmost mark
        while stack and stack[-1] is not _MARK:
            stack.pop()
        if stack:
            stack.pop()
        before = [b for b in before if b not in (pickletools.markobject, pickletools.stackslice)]
    for _ in before:
        if stack:
            stack.pop()
    stack.extend(None for _ in op.stack_after)


@functools.lru_cache(maxsize=1)
def weights_only_globals() -> frozenset[str]:
    """The globals torch's weights-only unpickler accepts (tensors, storages, plain containers)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return frozenset(_get_allowed_globals())


# TorchScript archives name the classes of their own compiled code (`__torch__.*`) and TorchScript's pickle
# helpers; the TorchScript unpickler resolves these inside the archive's compilation unit, never by importing.
TORCHSCRIPT_PREFIXES = ("__torch__.", "torch.jit._pickle.")


def disallowed_globals(data: bytes, *, torchscript: bool = False) -> list[str]:
    """The globals in `data` outside the weights-only allowlist, sorted (empty when the pickle is safe to load)."""
    allowed = weights_only_globals()
    bad = []
    for name in pickle_globals(data):
        if name in allowed or (torchscript and name.startswith(TORCHSCRIPT_PREFIXES)):
            continue
        bad.append(name)
    return sorted(bad)
