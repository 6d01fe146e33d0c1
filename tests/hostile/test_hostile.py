"""The hostile corpus: one file per attack class, built here; each is refused (exit 2) or inconclusive (exit 3),
with no side effect (its canary never appears), one line of output, no traceback and bounded memory."""

from __future__ import annotations

import resource
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from backdoorscan.cli import app
from backdoorscan.core.errors import ScanError
from backdoorscan.loading import load_model
from backdoorscan.safety.archive import check_expression
from backdoorscan.safety.graph import check_fx_node, operator_allowed
from backdoorscan.safety.pickles import pickle_globals
from backdoorscan.safety.sandbox import landlock_abi

from ..conftest import ARCHS_FILE, CLEAN, MNIST_TEST
from . import builders as b

PEAK_LIMIT_MB = 3000


def scan(*args: str):
    return CliRunner().invoke(app, ["model", *map(str, args), "--quiet"])


def assert_refused(result, needle: str, canary: Path | None = None, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert needle in result.output, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    if canary is not None:
        assert not canary.exists(), "the payload ran"


@pytest.fixture()
def canary(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "CANARY"
    path.parent.mkdir()
    return path


@pytest.mark.parametrize("raw", [False, True], ids=["torch.save", "raw-pickle"])
def test_pt2_sample_inputs_pickle_never_runs(tmp_path, canary, raw):
    evil = b.pt2_pickled_sample_inputs(CLEAN, tmp_path / "evil.pt2", canary, raw=raw)
    assert_refused(scan(evil, "--data", MNIST_TEST), "would import", canary)
    with pytest.raises(ScanError, match=r"would import \S*open"):
        load_model(evil)
    assert not canary.exists()


def test_pt2_opaque_constant_is_refused(tmp_path, canary):
    evil = b.pt2_opaque_constant(CLEAN, tmp_path / "evil.pt2", canary)
    assert_refused(scan(evil, "--data", MNIST_TEST), "opaque", canary)


@pytest.mark.parametrize(
    "name,needle",
    [
        ("mnist_clean/data/aotinductor/model/model.so", "native code"),
        ("../../outside.txt", "'..'"),
        ("/etc/cron.d/evil", "absolute"),
    ],
)
def test_pt2_native_code_and_escaping_names_are_refused(tmp_path, name, needle):
    evil = b.pt2_with_member(CLEAN, tmp_path / "evil.pt2", name)
    assert_refused(scan(evil, "--data", MNIST_TEST), needle)
    assert not (tmp_path.parent / "outside.txt").exists()


def test_pt2_shape_expression_with_code_is_refused(small_model, tmp_path, canary):
    evil = b.pt2_shape_expression(small_model, tmp_path / "evil.pt2", canary)
    assert_refused(scan(evil, "--data", MNIST_TEST), "shape expression", canary)


def test_shape_expression_grammar():
    assert check_expression("s0") and check_expression("2*s0 + FloorDiv(s1, 4)")
    assert check_expression("Symbol('s31', positive=True, integer=True)")
    for code in ("__import__('os')", "s0.__class__", "open('x')", "lambda: 1", "[s0 for s0 in ()]", "s0[0]", "{}"):
        assert not check_expression(code), code


def test_pickle_reader_sees_through_stack_tricks():
    import pickle as pk

    # push 'os', 'system', then a decoy string that is popped before STACK_GLOBAL
    data = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x8c\x05torch\x30\x93\x8c\x02hi\x85R."
    assert pickle_globals(data) == {"os.system"}
    assert pickle_globals(pk.dumps(b.WritesCanary(Path("x")))) == {open.__module__ + ".open"}


def test_torchscript_graph_that_touches_files_is_refused(tmp_path, canary):
    path = tmp_path / "evil.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(b.FromFileForward(str(canary)).eval()), path)
    assert_refused(scan(path, "--data", MNIST_TEST, "--channels", "1"), "aten::from_file", canary)
    assert not operator_allowed("aten::from_file") and not operator_allowed("aten::save")
    assert operator_allowed("aten::conv2d") and operator_allowed("prim::If")


def test_exported_graph_nodes_outside_the_allowlist_are_refused():
    import os

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    for target in (torch.ops.aten.from_file.default, os.system, torch.ops.aten._print.default):
        node = graph.call_function(target, (x,))
        with pytest.raises(ScanError, match="refused"):
            check_fx_node(node)
    check_fx_node(graph.call_function(torch.ops.aten.relu.default, (x,)))


def test_torchscript_setstate_is_refused_before_loading(tmp_path, canary):
    source = tmp_path / "ts"
    model = torch.jit.script(b.NeverReturns().eval())
    torch.jit.save(model, tmp_path / "plain.ts")
    name = b.member(tmp_path / "plain.ts", ".py")
    with __import__("zipfile").ZipFile(tmp_path / "plain.ts") as zf:
        code = zf.read(name).decode()
    code += (
        f"\n  def __setstate__(self, state: Tuple[bool]) -> None:\n"
        f'    _0 = torch.from_file("{canary}", True, 16)\n    return None\n'
    )
    evil = b.rewrite_zip(tmp_path / "plain.ts", tmp_path / "evil.ts", replace={name: code.encode()})
    assert_refused(scan(evil, "--data", MNIST_TEST), "__setstate__", canary)
    assert not source.exists()


def test_deflate_bomb_is_refused_without_inflating(tmp_path):
    bomb = b.deflated_bomb_pth(tmp_path / "bomb.pth")
    assert bomb.stat().st_size < 2 << 20
    assert_refused(scan(bomb, "--data", MNIST_TEST, "--arch", f"{ARCHS_FILE}:mnist_cnn"), "zip bomb")
    pt2 = b.rewrite_zip(CLEAN, tmp_path / "bomb.pt2", add={"mnist_clean/extra/pad": bytes(64 << 20)}, deflate=True)
    assert_refused(scan(pt2, "--data", MNIST_TEST), "zip bomb")
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < PEAK_LIMIT_MB * 1024


def test_onnx_external_data_is_checked_before_reading(tmp_path):
    evil = b.onnx_lying_external_data(tmp_path / "evil.onnx")
    assert_refused(scan(evil, "--data", MNIST_TEST), "declares")
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < PEAK_LIMIT_MB * 1024


def test_markup_in_names_cannot_break_the_error_line(tmp_path):
    evil = b.onnx_custom_domain(tmp_path / "evil.onnx")
    assert_refused(scan(evil, "--data", MNIST_TEST), "evil[/]ops[bold]")
    weights = tmp_path / "keys.pt"
    torch.save({"[/]oops[bold red]": torch.zeros(3)}, weights)
    assert_refused(scan(weights, "--data", MNIST_TEST, "--arch", f"{ARCHS_FILE}:mnist_cnn"), "do not match")


def test_forward_that_never_returns_is_stopped(tmp_path):
    path = tmp_path / "hang.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(b.NeverReturns().eval()), path)
    start = time.perf_counter()
    assert_refused(
        scan(path, "--data", MNIST_TEST, "--channels", "1", "--forward-timeout", "1"), "did not finish within 1 s"
    )
    result = scan(path, "--data", MNIST_TEST, "--channels", "1", "--forward-timeout", "100", "--timeout", "6")
    assert_refused(result, "ran past --timeout 6 s")
    assert time.perf_counter() - start < 60


def _exported(module: torch.nn.Module, path: Path) -> Path:
    torch.export.save(torch.export.export(module, (torch.rand(2, 1, 28, 28),)), path)
    return path


@pytest.fixture(scope="module")
def clean_module() -> torch.nn.Module:
    return torch.export.load(str(CLEAN)).module()


def test_zero_gradient_model_is_inconclusive_not_clean(tmp_path, clean_module):
    path = _exported(b.Rounded(clean_module), tmp_path / "rounded.pt2")
    result = scan(path, "--data", MNIST_TEST, "--out", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert "input gradient is zero" in result.output and "Traceback" not in result.output
    report = __import__("json").loads((tmp_path / "out/report.json").read_text())
    assert report["verdict"] == "inconclusive" and report["evidence"]["input_gradient"]["ok"] is False


def test_tuple_output_is_inconclusive(tmp_path, clean_module):
    path = _exported(b.TupleOut(clean_module), tmp_path / "tuple.pt2")
    result = scan(path, "--data", MNIST_TEST)
    assert result.exit_code == 3 and "not one logits tensor" in result.output, result.output


def test_untrained_model_is_inconclusive(tmp_path):
    from backdoorlab.archs import mnist_cnn

    torch.manual_seed(0)
    path = _exported(mnist_cnn().eval(), tmp_path / "untrained.pt2")
    result = scan(path, "--data", MNIST_TEST, "--json")
    assert result.exit_code == 3, result.output
    report = __import__("json").loads(result.stdout)
    assert report["evidence"]["clean_accuracy"]["accuracy"] < 0.3 and report["reasons"]


def test_labels_beyond_the_output_are_inconclusive(tmp_path):
    data = b.relabelled_npz(MNIST_TEST, tmp_path / "labels.npz", 12)
    result = scan(CLEAN, "--data", data)
    assert result.exit_code == 3 and "reach class 12" in result.output, result.output


@pytest.mark.skipif(landlock_abi() < 1, reason="Landlock is not available on this kernel")
def test_sandbox_stops_writes_outside_the_output(tmp_path, canary):
    arch = tmp_path / "arch.py"
    arch.write_text(
        "from backdoorlab.archs import mnist_cnn\n\n"
        f"def build(num_classes=10):\n    open({str(canary)!r}, 'w').write('x')\n"
        "    return mnist_cnn(num_classes)\n"
    )
    weights = tmp_path / "w.pt"
    from backdoorlab.archs import mnist_cnn

    torch.save(mnist_cnn().state_dict(), weights)
    result = scan(
        weights, "--data", MNIST_TEST, "--arch", f"{arch}:build", "--out", tmp_path / "out", "--sandbox", "on"
    )
    assert result.exit_code == 2 and "Permission denied" in result.output, result.output
    assert not canary.exists()


def test_converted_onnx_graph_uses_the_same_allowlist():
    from backdoorscan.safety.graph import check_onnx_module

    for op, target in (
        ("call_function", torch.from_file),
        ("call_method", "numpy"),
        ("call_method", "untyped_storage"),
    ):
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        graph.output(graph.create_node(op, target, (x,)))
        with pytest.raises(ScanError, match="refused"):
            check_onnx_module(torch.fx.GraphModule(torch.nn.Module(), graph))


def test_filter_without_clean_data_reports_an_applicable_reason(tmp_path):
    from backdoorlab.archs import mnist_cnn
    from backdoorscan.loading import ModelSource, prepare
    from backdoorscan.screen.pipeline import filter_dataset

    torch.manual_seed(0)
    model = b.Rounded(mnist_cnn().eval())
    ready = prepare(ModelSource(model), MNIST_TEST, samples=1, seed=0, device="cpu")
    # accuracy and class coverage (one sample) do not apply here
    assert set(ready.evidence.failures) == {"clean_accuracy", "class_coverage", "input_gradient"}
    result = filter_dataset(model, None, MNIST_TEST, uap_file=tmp_path / "stored.safetensors", device="cpu")
    assert result.verdict == "inconclusive" and result.exit_code == 3 and result.items == []
    assert len(result.reasons) == 1 and "input gradient is zero" in result.reasons[0]  # only what applies
    assert result.to_dict()["verdict"] == "inconclusive"
