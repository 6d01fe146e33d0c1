"""Round two of the hostile corpus (issue 23): one file per mechanism, built at test time. Each is refused,
inconclusive or harmless: its canary never appears, no process outlives the scan, no control character or
unescaped Markdown reaches an output."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from backdoorscan.cli import app
from backdoorscan.core.escape import ci_line, md_code, printable, relay_line
from backdoorscan.fleet.plan import expand, is_fleet
from backdoorscan.loading import load_model
from backdoorscan.safety.names import is_plain_name

from ..conftest import BADNETS, CLEAN, MNIST_TEST
from . import builders as b
from .test_hostile import assert_refused, scan

pytestmark = pytest.mark.hostile


@pytest.fixture()
def canary(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "CANARY"
    path.parent.mkdir()
    return path


# 1. Zip names that differ only in case


def test_case_twin_members_are_refused_before_torch_reads_them(tmp_path, canary):
    evil = b.pt2_case_twin(CLEAN, tmp_path / "twin.pt2", canary)
    assert_refused(scan(evil, "--data", MNIST_TEST), "appears twice", canary)


# 2. Names become Python source


def test_exported_parameter_name_with_code_is_refused(tmp_path, canary):
    evil = b.pt2_code_in_names(tmp_path / "names.pt2", canary)
    canary.unlink(missing_ok=True)  # exporting may already have run it, in the test's own process
    assert_refused(scan(evil, "--data", MNIST_TEST), "not a plain dotted identifier", canary)


def test_onnx_names_with_code_are_replaced_before_conversion(tmp_path, canary):
    evil = b.onnx_code_in_names(tmp_path / "names.onnx", canary)
    loaded = load_model(evil)
    logits = loaded.module(torch.rand(1, 1, 28, 28))
    assert logits.shape == (1, 10)
    assert not canary.exists(), "a name ran as code"
    assert all(is_plain_name(name) for name, _ in loaded.module.named_parameters())


def test_plain_name_rule():
    assert is_plain_name("features.0.weight") and is_plain_name("0.weight") and is_plain_name("_tensor_constant0")
    for bad in ('w", None) or x or getattr(self, "w', "a b", "a..b", "", "a/b", "a\nb", "x" * 600):
        assert not is_plain_name(bad)


# 3. Graph checks that miss a method


@pytest.mark.parametrize(
    "build,needle",
    [
        (lambda path, canary: b.torchscript_with_hook(path, canary), "hook"),
        (lambda path, canary: b.torchscript_with_method(path, canary), "aten::from_file"),
    ],
    ids=["forward-pre-hook", "method-beside-forward"],
)
def test_torchscript_code_beside_forward_is_refused(tmp_path, canary, build, needle):
    path = tmp_path / "evil.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(path, canary)
    assert_refused(scan(path, "--data", MNIST_TEST, "--channels", "1"), needle, canary)


# 4. The sandbox as the boundary


@pytest.mark.sandbox
def test_sandbox_probe_finds_every_way_out_closed(tmp_path, canary, monkeypatch):
    out = tmp_path / "out"
    unix_path = tmp_path / "outside.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(unix_path))
    listener.listen(1)
    monkeypatch.setenv("CI_TOKEN_FOR_TEST", "SECRET_SENTINEL")
    ci = tmp_path / "ci"  # as on a GitHub runner: the step summary beside GITHUB_ENV
    ci.mkdir()
    (ci / "GITHUB_ENV").write_text("")
    evil = b.sandbox_probe(tmp_path / "probe.pt", out, canary, unix_path, ci)
    result = CliRunner().invoke(
        app,
        [
            "model",
            str(evil),
            "--data",
            str(MNIST_TEST),
            "--unsafe-allow-pickle",
            "--out",
            str(out),
            "--markdown",
            str(ci / "summary.md"),
            "--sandbox",
            "on",
            "--max-memory",
            "512M",
            "--quiet",
        ],
    )
    listener.close()
    if "--sandbox on:" in result.output:
        pytest.skip(f"this kernel lacks a layer: {result.output.strip()}")
    assert result.exit_code in (2, 3), result.output
    line = next(line for line in result.output.splitlines() if line.startswith("PROBE "))
    probe = json.loads(line.removeprefix("PROBE "))
    opened = {name: how for name, how in probe.items() if how == "succeeded" or how is True}
    assert not opened, f"ways out of the sandbox: {opened}"
    assert probe["tiocsti"].endswith(" 1"), probe  # EPERM from the filter, not ENOTTY from the device
    assert {"write_output_folder", "write_beside_markdown"} <= set(probe)
    assert (ci / "GITHUB_ENV").read_text() == "" and not (out / "evil.sh").exists()
    time.sleep(2.5)  # the daemon's delay: had it started, it would have written the canary by now
    assert not canary.exists()


# 5. A backdoored model that measures the scanner


def test_model_that_routes_off_grid_inputs_to_a_clean_twin_is_not_clean(tmp_path):
    evil = b.pt2_grid_router(BADNETS, CLEAN, tmp_path / "router.pt2")
    result = CliRunner().invoke(app, ["model", str(evil), "--data", str(MNIST_TEST), "--json", "--quiet"])
    assert result.exit_code in (1, 3), result.output
    report = json.loads(result.stdout)
    assert report["verdict"] != "clean"
    if report["verdict"] == "inconclusive":
        assert not report["evidence"]["input_grid"]["ok"]


def test_honest_model_passes_the_grid_check():
    from backdoorscan.loading.evidence import Evidence, check_grid
    from backdoorscan.loading.preprocess import InputSpec, PixelModel
    from backdoorscan.loading.samples import load_samples, open_source

    model = PixelModel(load_model(CLEAN).module, InputSpec(1, 28, 28))
    samples = load_samples(open_source(MNIST_TEST), (1, 28, 28), n=64, seed=0)
    evidence = Evidence()
    check_grid(evidence, model, samples.x)
    assert evidence.ok, evidence.checks
    assert evidence.checks["input_grid"]["relative_logit_change"] < 0.01


# 6. Output that lies


def test_control_characters_in_a_refusal_never_reach_the_terminal(tmp_path):
    fake_clean = "\x1b[2K\x1b[1A\x1b[32mverdict: clean\x1b[0m ::error::x ##[set-env]"
    evil = b.onnx_custom_domain(tmp_path / "esc.onnx", domain=fake_clean)
    result = scan(evil, "--data", MNIST_TEST)
    assert result.exit_code == 2
    assert "\x1b" not in result.output and "\\x1b" in result.output
    assert "##[" not in result.output
    assert not any(line.lstrip().startswith("::") for line in result.output.splitlines())


def test_markdown_report_keeps_a_hostile_file_name_in_its_code_span(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    name = "x`<!-- hidden -->|**No backdoor found**.pt2"
    model = folder / name
    shutil.copy(BADNETS, model)
    summary = tmp_path / "summary.md"
    result = CliRunner().invoke(
        app,
        [
            "model",
            str(model),
            "--data",
            str(MNIST_TEST),
            "--samples",
            "30",
            "--steps",
            "5",
            "--families",
            "universal",
            "--markdown",
            str(summary),
            "--quiet",
        ],
    )
    assert result.exit_code in (0, 1, 3), result.output
    heading = summary.read_text().splitlines()[0]
    assert heading.startswith("### backdoorscan: ``"), heading  # a fence longer than the name's backtick
    assert heading.endswith("``"), heading
    assert "<!-- hidden -->" in heading  # literal inside the code span, not an HTML comment
    body = "\n".join(summary.read_text().splitlines()[1:])
    assert "<!--" not in body


def test_escapes_per_sink():
    assert printable("a\x1bb\u202ec\n") == "a\\x1bb\\u202ec\\x0a"
    assert md_code("a`b") == "``a`b``" and md_code("a|b") == "`a\\|b`"
    assert ci_line("::set-env name=X::1").startswith("\\::")
    assert "##[" not in ci_line("x ##[error]y")
    assert relay_line("\x1b[2Kok\n") == "\\x1b[2Kok\n"


# 7. A path with `[` in it


def test_literal_path_with_brackets_is_one_model_not_a_pattern(tmp_path, monkeypatch):
    folder = tmp_path / "models[v2]"
    folder.mkdir()
    model = folder / "m.pt2"
    shutil.copy(CLEAN, model)
    assert not is_fleet([model], None)
    assert expand([model]) == [model]
    monkeypatch.setenv("BACKDOORSCAN_FLEET_CHILD", "1")  # inside a fleet's child: never a fleet again
    assert not is_fleet([tmp_path / "models[v2]" / "*.pt2"], None)
    result = CliRunner().invoke(app, ["model", str(model), str(model), "--data", str(MNIST_TEST), "--quiet"])
    assert result.exit_code == 2 and "never starts a fleet" in result.output


def test_a_missing_bracketed_path_is_reported_as_not_found_in_one_line(tmp_path):
    """A literal name with `[` that does not exist reads as a pattern as well: the refusal says both."""
    missing = tmp_path / "models[v2]" / "m.pt2"
    result = CliRunner().invoke(app, ["model", str(missing), "--data", str(MNIST_TEST), "--quiet"])
    assert result.exit_code == 2 and "not found, and as a pattern it matches no file" in result.output
    assert str(missing) in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_fleet_of_a_bracketed_folder_scans_its_model_once(tmp_path):
    folder = tmp_path / "models[v2]"
    folder.mkdir()
    shutil.copy(CLEAN, folder / "m.pt2")
    before = {p.pid for p in _children()}
    result = CliRunner().invoke(
        app,
        [
            "model",
            str(folder / "m.pt2"),
            str(folder / "m.pt2"),
            "--data",
            str(MNIST_TEST),
            "--samples",
            "20",
            "--steps",
            "2",
            "--families",
            "universal",
            "--no-cache",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code in (0, 1, 3), result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[-1]["summary"]["models"] == 1, lines[-1]
    assert {p.pid for p in _children()} <= before, "a scanning process outlived the fleet"


class _Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def _children() -> list[_Proc]:
    from backdoorscan.safety.confine import children

    return [_Proc(pid) for pid in children()]


def test_no_env_secret_reaches_a_child(monkeypatch):
    from backdoorscan.safety.child import child_environment

    monkeypatch.setenv("GITHUB_TOKEN", "SECRET_SENTINEL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET_SENTINEL")
    env = child_environment(["/tmp"], "/tmp")
    assert "SECRET_SENTINEL" not in env.values()
    assert env["TMPDIR"] == "/tmp" and "PATH" in env
    assert os.environ["GITHUB_TOKEN"] == "SECRET_SENTINEL"  # the parent's own environment is untouched
