"""Every choice list, written once as a `Literal` type; the library checks values against them and the CLI offers
them as its choices. Kept free of torch so that the command line starts fast.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from .errors import ScanError

Method = Literal["usb", "nc"]  # the model scan: USB (the paper) or Neural Cleanse (baseline)
FilterMethod = Literal["uap", "strip", "erase"]  # screening: Xue et al.'s UAP rule, STRIP, a scan's triggers undone
Norm = Literal["l2", "linf"]  # the norm balls UAPs live in
Solver = Literal["pgd", "deepfool"]  # how the untargeted UAP is computed
Form = Literal["blend", "paper"]  # how a reversed trigger is stamped (see perturb/triggers.py)
SizeEvidence = Literal["combined", "refined", "uap"]  # the per-class size the decision reads (see usb/decide.py)
MaskCost = Literal["adaptive", "fixed"]  # Alg. 2's size penalty: the authors' code's schedule or Eq. (1)'s mean
Refine = Literal["staged", "all"]  # refine stage-1 suspects and references, or every class (see usb/staging.py)
Families = Literal["all", "universal+warp", "universal"]  # backdoor families a scan covers (see usb/families.py)
Scale = Literal["log", "linear"]  # the anomaly index over log L1 or over L1 (see usb/decide.py)
SandboxMode = Literal["auto", "on", "off"]  # Landlock where the kernel has it / required / never


def choices(literal: Any) -> tuple[str, ...]:
    """The allowed values of a `Literal[...]` type, in the order written."""
    return tuple(get_args(literal))


def check_choice(name: str, value: object, literal: Any) -> None:
    """Refuse a value outside the `Literal` type, naming the allowed ones."""
    allowed = choices(literal)
    if value not in allowed:
        raise ScanError(f"unknown {name} {value!r}", hint=f"use one of {', '.join(allowed)}")
