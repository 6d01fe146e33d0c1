"""The package's shape: one source for defaults and choices, pipelines side by side, no lab code in the product."""

from __future__ import annotations

import ast
import itertools
from dataclasses import MISSING, FrozenInstanceError, fields
from pathlib import Path
from typing import Literal, get_origin, get_type_hints

import pytest
import typer
from typer.testing import CliRunner

from backdoorscan import FilterSettings, ScanError, ScanSettings
from backdoorscan.cli import app
from backdoorscan.core.choices import choices

from .conftest import BADNETS, MNIST_TEST

SRC = Path(__file__).resolve().parents[1] / "src/backdoorscan"


def _cli_params(name: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[name].params}


@pytest.mark.parametrize(
    ("command", "cls"), [("model", ScanSettings), ("filter", FilterSettings), ("filter-dataset", FilterSettings)]
)  # the alias: the same options
def test_cli_defaults_and_choices_are_the_dataclasses(command, cls):
    params, hints = _cli_params(command), get_type_hints(cls)
    shown = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
    exposed = [f for f in fields(cls) if "help" in f.metadata]
    assert len(exposed) >= 9
    for f in exposed:
        assert params[f.name].default == f.default, f.name
        if get_origin(hints[f.name]) is Literal:  # a Literal: the CLI offers exactly its values
            assert f"--{f.name.replace('_', '-')} <{'|'.join(choices(hints[f.name]))}>" in shown, f.name
    hidden = {f.name for f in fields(cls)} - {f.name for f in exposed}
    assert not hidden & set(params)  # library-only knobs are not options
    for f in fields(cls):
        assert f.default is not MISSING  # every knob has its one default, here


def test_unknown_choices_are_refused_with_the_allowed_list():
    with pytest.raises(ScanError, match="form 'pape'") as info:
        ScanSettings(form="pape")
    assert "blend, paper" in info.value.hint
    with pytest.raises(ScanError, match="solver"):
        FilterSettings(solver="sgd")  # once silently PGD
    with pytest.raises(ScanError, match="samples must be at least 1"):
        FilterSettings(samples=0)
    with pytest.raises(FrozenInstanceError):
        ScanSettings().steps = 1  # checked when made, so never changed after
    from backdoorscan.perturb import project
    from backdoorscan.perturb.triggers import stamp

    with pytest.raises(ScanError, match="use one of l2, linf"):
        project(__import__("torch").zeros(1, 3), 1.0, "l1")
    with pytest.raises(ScanError, match="form"):
        stamp(*[__import__("torch").zeros(1, 1, 2, 2)] * 3, form="sum")
    result = CliRunner().invoke(app, ["model", str(BADNETS), "--data", str(MNIST_TEST), "--form", "pape"])
    assert result.exit_code == 2 and "blend" in result.output and "paper" in result.output


def _imports(path: Path) -> set[str]:
    """Modules a source file imports, resolved to absolute names (relative imports included)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: -node.level] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
    return names


# The layers, top to bottom: a module imports its own layer or lower ones, and the three pipelines never each other.
LAYERS = {
    "cli": 4,
    "usb": 3,
    "screen": 3,
    "fleet": 3,
    "loading": 2,
    "perturb": 2,
    "report": 2,
    "baselines": 2,
    "safety": 1,
    "core": 0,
}
PIPELINES = ("usb", "screen", "fleet")


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "backdoorscan" and parts[1] in LAYERS else None


def test_import_graph_keeps_the_layers_and_the_lab_out():
    graph = {p.relative_to(SRC).as_posix(): _imports(p) for p in SRC.rglob("*.py")}
    assert len(graph) > 40
    roots = sorted(m for m in graph if "/" not in m)
    assert roots == ["__init__.py", "__main__.py"], roots  # every module lives in a folder named for its part
    for module, imports in graph.items():
        lab = [m for m in imports if m.split(".")[0] == "backdoorlab" or m.startswith("backdoorscan.zoo")]
        assert not lab, (module, lab)
        own = module.split("/")[0]
        if own not in LAYERS:
            continue
        for target in {f for f in map(_folder, imports) if f is not None and f != own}:
            assert LAYERS[target] <= LAYERS[own], f"{module} imports {target}: a layer above it"
            assert not (own in PIPELINES and target in PIPELINES), f"{module} imports the {target} pipeline"
    assert LAYERS["safety"] > LAYERS["core"] and not (SRC / "zoo").exists()


def test_each_folder_has_a_map_of_its_modules():
    """Every folder's __init__ names each of its modules: the newcomer's way in."""
    for folder in sorted(p for p in SRC.iterdir() if p.is_dir() and p.name in LAYERS):
        doc = (folder / "__init__.py").read_text()
        missing = [p.name for p in folder.glob("*.py") if p.name != "__init__.py" and p.name not in doc]
        assert not missing or folder.name in ("cli", "baselines"), (folder.name, missing)


def test_inputs_are_protected_through_the_library(tmp_path):
    """The copy-to guard and the report guards live in the library, not only in the CLI."""
    import numpy as np
    from PIL import Image

    from backdoorscan import filter_dataset, scan_model
    from backdoorscan.report import write_filter_report, write_scan_report

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(folder / f"{i}.png")
    before = sorted(p.name for p in folder.rglob("*"))
    for where in (folder / "sorted", folder):
        with pytest.raises(ScanError, match="inside the input"):
            filter_dataset(BADNETS, MNIST_TEST, folder, copy_to=where, device="cpu")
    with pytest.raises(ScanError, match="inside the input"):
        filter_dataset(BADNETS, MNIST_TEST, folder, save_uap_to=folder / "v.safetensors", device="cpu")
    result = filter_dataset(
        BADNETS, MNIST_TEST, folder, settings=FilterSettings(epsilon=0.7, samples=100), device="cpu"
    )
    with pytest.raises(ScanError, match="inside the input"):
        write_filter_report(result, folder / "report")
    scan = scan_model(
        BADNETS, folder, settings=ScanSettings(steps=2, max_passes=1, samples=2, families="universal"), device="cpu"
    )
    with pytest.raises(ScanError, match="inside the input"):
        write_scan_report(scan, folder / "out")
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_readme_layout_names_every_module():
    """The README's Layout is the newcomer's map: every module of the package appears in it by name."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("## Documentation")]
    package = Path(__file__).resolve().parents[1] / "src/backdoorscan"
    lines = layout.splitlines()
    missing = []
    for p in package.rglob("*.py"):
        if p.parent == package:
            missing += [] if p.name in layout else [p.name]
            continue
        start = next((i for i, line in enumerate(lines) if line.strip().startswith(p.parent.name + "/")), None)
        block = (
            []
            if start is None
            else [lines[start], *itertools.takewhile(lambda line: line.startswith(" " * 18), lines[start + 1 :])]
        )  # the folder's entry and its continuation
        if p.name != "__init__.py" and p.name not in "\n".join(block):
            missing.append(str(p.relative_to(package)))
    assert not missing, f"README Layout omits {missing}"
