"""Command-line options, each declared once: the settings dataclasses' fields with `help`, and two shared groups
(how to load the model, how to run the scan) that both commands take.

`with_options` adds a group's parameters to a command's signature, which is what Typer reads; the command receives
them in `**options` and turns them back into the library's typed objects (`ScanSettings`, `ModelSource`, `Limits`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_type_hints

import typer

from ..core.choices import SandboxMode
from ..core.device import DEFAULT_DEVICE
from ..core.errors import ScanError
from ..safety.limits import Limits, parse_bytes

if TYPE_CHECKING:
    from ..loading import ModelSource
from .supervise import DEFAULT_SANDBOX

LIMITS = Limits()


def model_options(
    arch: Annotated[
        str | None,
        typer.Option(
            help="Architecture for weight-only files: a torchvision name (resnet18), timm:NAME, "
            "path/to/file.py:function or package.module:function (hub folders name their own)."
        ),
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Number of classes (checked against the model's output).")
    ] = None,
    input_size: Annotated[str | None, typer.Option(help="Input size HxW of the [0, 1] images the model takes.")] = None,
    channels: Annotated[
        int | None, typer.Option(help="Input channels (1 or 3); read from the model when possible.")
    ] = None,
    mean: Annotated[
        str | None, typer.Option(help="Per-channel mean the model expects, e.g. 0.485,0.456,0.406.")
    ] = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std the model expects, e.g. 0.229,0.224,0.225.")] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Class names: one per line, or a JSON list or {index: name} object (default: the model folder's "
            "id2label or label_names, else the data's class folders)."
        ),
    ] = None,
    unsafe_allow_pickle: Annotated[
        bool,
        typer.Option(
            "--unsafe-allow-pickle",
            help="Allow loading a fully pickled model. A pickle can run arbitrary code: only for files you trust.",
        ),
    ] = False,
) -> None:
    """How to load the model and feed it (the fields of `ModelSource`)."""


def run_options(
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = DEFAULT_DEVICE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout and nothing else.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (1 when several scans share a machine).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds the whole scan may take; past it, exit 2.")] = LIMITS.timeout,
    forward_timeout: Annotated[
        float, typer.Option(help="Seconds the model's first forward may take.")
    ] = LIMITS.forward_timeout,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory bound, e.g. 4G (default: 75 % of the memory available): larger archives are refused, CPU "
            "scans capped."
        ),
    ] = None,  # Limits.max_memory: None is 75 % of what is available
    sandbox: Annotated[
        SandboxMode,
        typer.Option(
            help="Run the scan in a child process restricted by Landlock: auto (where the kernel has it), on (refuse "
            "to scan without it) or off."
        ),
    ] = DEFAULT_SANDBOX,
) -> None:
    """How to run a scan: device, output mode, limits and sandbox."""


def settings_parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter per field of a settings dataclass that has `help`: its default, its choices."""
    hints = get_type_hints(cls)
    params = []
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        annotation = Annotated[hints[f.name], typer.Option(help=f.metadata["help"])]  # type: ignore[valid-type,name-defined]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def _parameters(group: Callable[..., None] | type) -> list[inspect.Parameter]:
    if is_dataclass(group):
        return settings_parameters(group)
    return [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(group, eval_str=True).parameters.values()
    ]


def with_options(*groups: Callable[..., None] | type) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add the options of each group (a template function or a settings dataclass) to a command's signature."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        added = [p for group in groups for p in _parameters(group)]
        names = [p.name for p in own + added]
        if len(names) != len(set(names)):
            raise TypeError(f"{command.__name__}: an option is declared twice")
        command.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
        return command

    return decorate


def take(group: Callable[..., None] | type, options: dict[str, Any]) -> dict[str, Any]:
    """The values of one group's options, removed from `options`."""
    return {p.name: options.pop(p.name) for p in _parameters(group) if p.name in options}


def parse_size(text: str | None) -> tuple[int, int] | None:
    """`32`, `32x32` or `224,224` -> (H, W)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts if p]
    except ValueError as exc:
        raise ScanError(f"--input-size {text!r} is not a size", hint="write it as HxW, e.g. 32x32") from exc
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise ScanError(f"--input-size {text!r} is not a size", hint="write it as HxW, e.g. 32x32")
    return values[0], values[1]


def parse_floats(text: str | None, name: str) -> tuple[float, ...] | None:
    """`0.5,0.5,0.5` -> (0.5, 0.5, 0.5)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError as exc:
        raise ScanError(f"--{name} {text!r} is not a list of numbers", hint="e.g. 0.5,0.5,0.5") from exc


def model_values(values: dict[str, Any]) -> dict[str, Any]:
    """The model options parsed: sizes and per-channel values as tuples (the labels file stays a path)."""
    return {
        **values,
        "input_size": parse_size(values["input_size"]),
        "mean": parse_floats(values["mean"], "mean"),
        "std": parse_floats(values["std"], "std"),
    }


def model_source(checkpoint: Path, values: dict[str, Any]) -> ModelSource:
    """The `ModelSource` the model options describe."""
    from ..loading import ModelSource
    from ..loading.labels import read_labels

    parsed = model_values(values)
    return ModelSource(
        checkpoint=checkpoint,
        **{**parsed, "labels": None if values["labels"] is None else read_labels(values["labels"])},
    )


def limits(values: dict[str, Any]) -> Limits:
    """The `Limits` the run options describe."""
    return Limits(
        timeout=values["timeout"],
        forward_timeout=values["forward_timeout"],
        max_memory=parse_bytes(values["max_memory"]),
    )
