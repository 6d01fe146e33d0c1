"""Model loading: every format gives the same logits; pickles never run without the opt-in; bad files exit 2."""

from __future__ import annotations

import pickle
import re
import shutil
import warnings

import pytest
import torch
from typer.testing import CliRunner

from backdoorlab import save_model
from backdoorscan.cli import app
from backdoorscan.core.errors import ScanError
from backdoorscan.loading import detect_format, load_model

from .conftest import ARCHS_FILE, MNIST_TEST

ARCH = f"{ARCHS_FILE}:mnist_cnn"
TOL = 1e-4  # float32 logits of order 10: conversions (ONNX, export) reorder arithmetic only


@pytest.fixture(scope="module")
def saved(small_model, digits, tmp_path_factory):
    """The same trained model in every supported format."""
    folder = tmp_path_factory.mktemp("formats")
    example = digits[2][:2]
    paths = {
        fmt: save_model(small_model, folder / f"model.{ext}", fmt, example)
        for fmt, ext in [
            ("pt2", "pt2"),
            ("onnx", "onnx"),
            ("torchscript", "ts"),
            ("safetensors", "safetensors"),
            ("state_dict", "pt"),
        ]
    }
    return paths


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "torchscript", "safetensors", "state_dict"])
def test_every_format_gives_the_same_logits(fmt, saved, small_model, digits):
    loaded = load_model(saved[fmt], arch=ARCH)
    x = digits[2][:64]
    with torch.no_grad():
        expected, got = small_model(x), loaded.module(x)
    assert got.shape == (64, 10)
    assert torch.allclose(got, expected, atol=TOL), (got - expected).abs().max()


def test_onnx_from_this_torch_is_down_converted(saved):
    loaded = load_model(saved["onnx"])
    assert loaded.format == "onnx"
    assert any("down-converted to 17" in n for n in loaded.notes)


def test_dynamo_onnx_export_is_repaired(small_model, digits, tmp_path):
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small_model, (digits[2][:2].clone(),), str(path), dynamo=True, verbose=False)
    loaded = load_model(path)
    x = digits[2][:2]
    assert torch.allclose(loaded.module(x), small_model(x), atol=TOL)
    assert any("allowzero" in n for n in loaded.notes)


def test_shared_weight_identity_nodes_are_repaired(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["W"], ["W_shared"]),
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("MatMul", ["x", "W_shared"], ["h2"]),
            helper.make_node("Add", ["h", "h2"], ["y"]),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "shared.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path)
    x = torch.ones(2, 4)
    assert torch.allclose(loaded.module(x), 2 * x @ torch.from_numpy(w))
    assert any("Identity" in n for n in loaded.notes)


def test_torchvision_arch_state_dict_with_common_wrappers(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=7).eval()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    loaded = load_model(tmp_path / "ckpt.pth", arch="resnet18")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net(x), atol=1e-5)


def test_arch_from_a_file(tmp_path, saved, small_model, digits):
    factory = tmp_path / "my_arch.py"
    factory.write_text(
        "from backdoorlab.archs import mnist_cnn\n\ndef build(num_classes=10):\n    return mnist_cnn(num_classes)\n"
    )
    loaded = load_model(saved["safetensors"], arch=f"{factory}:build")
    assert torch.allclose(loaded.module(digits[2][:4]), small_model(digits[2][:4]), atol=TOL)


def test_format_is_detected_from_content_not_extension(saved, tmp_path):
    for fmt, expected in [
        ("pt2", "torch.export"),
        ("onnx", "onnx"),
        ("torchscript", "torchscript"),
        ("safetensors", "safetensors"),
        ("state_dict", "pickle"),
    ]:
        renamed = tmp_path / f"{fmt}.bin"
        shutil.copy(saved[fmt], renamed)
        assert detect_format(renamed) == expected


class WritesAFile:
    """A pickle payload: unpickling it would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_never_runs_without_the_flag(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": WritesAFile(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ScanError) as info:
        load_model(path, arch=ARCH)
    assert not marker.exists()
    assert "refused" in info.value.message and "open" in info.value.message  # names what it would import
    assert "--unsafe-allow-pickle" in info.value.hint
    result = CliRunner().invoke(app, ["model", str(path), "--data", str(MNIST_TEST), "--arch", ARCH])
    assert result.exit_code == 2 and not marker.exists()


def test_full_pickle_loads_only_with_the_flag(tmp_path, small_model, digits):
    path = tmp_path / "full.pt"
    torch.save(small_model, path)
    with pytest.raises(ScanError, match="refused"):
        load_model(path)
    loaded = load_model(path, unsafe_allow_pickle=True)
    assert loaded.format == "pickle"
    assert torch.allclose(loaded.module(digits[2][:4]), small_model(digits[2][:4]))


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_bad_inputs_exit_2_with_one_line(tmp_path, saved):
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "empty.pt2").write_bytes(b"")
    data = saved["pt2"].read_bytes()
    (tmp_path / "truncated.pt2").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "junk_dir").mkdir()
    (tmp_path / "junk_dir/a.png").write_bytes(b"not a png")
    nan = {k: torch.full_like(v, float("nan")) for k, v in torch.load(saved["state_dict"]).items()}
    torch.save(nan, tmp_path / "nan.pt")
    d = str(MNIST_TEST)
    cases = [
        (["model", str(tmp_path / "missing.pt2"), "--data", d], "not found"),
        (["model", str(tmp_path / "random.bin"), "--data", d], "unknown model format"),
        (["model", "https://huggingface.co/org/model/resolve/main/model.safetensors", "--data", d], "never downloads"),
        (["model", "some-org/some-model", "--data", d], "huggingface-cli download some-org/some-model"),
        (["model", "/dev/null", "--data", d], "not a regular file"),
        (["model", str(saved["pt2"]), "--data", "https://example.org/clean.npz"], "never downloads"),
        (["model", str(tmp_path / "empty.pt2"), "--data", d], "empty"),
        (["model", str(tmp_path / "truncated.pt2"), "--data", d], "truncated.pt2"),
        (["model", str(saved["state_dict"]), "--data", d], "--arch"),
        (["model", str(saved["state_dict"]), "--data", d, "--arch", "resnet18"], "do not match"),
        (["model", str(saved["pt2"]), "--data", d, "--num-classes", "7"], "disagrees"),
        (["model", str(saved["pt2"]), "--data", str(tmp_path / "empty_dir")], "no images"),
        (
            ["model", str(saved["pt2"]), "--data", str(tmp_path / "junk_dir")],
            "no readable images (1 file drawn, none decoded; first: a.png)",
        ),
        (["model", str(tmp_path / "nan.pt"), "--data", d, "--arch", ARCH], "not finite"),
    ]
    for n, (args, needle) in enumerate(cases):  # the first two through the sandboxed child, the rest in-process
        result = _cli(*args, *(["--sandbox", "off"] if n >= 2 else []))
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_refusal_is_one_line_when_the_scan_picks_its_own_threads(saved, monkeypatch):
    """Without OMP_NUM_THREADS the CLI chooses torch's threads and says so, but only once a scan runs: a refusal
    after the choice is still its one line."""
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        result = _cli("model", str(saved["pt2"]), "--data", str(MNIST_TEST), "--num-classes", "7", "--sandbox", "off")
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 2 and "disagrees" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_head_width_is_read_whatever_the_key_order(tmp_path):
    """safetensors sorts keys as strings ("11.weight" before "9.weight"); the head must still be found."""
    from safetensors.torch import save_file

    from backdoorlab import mnist_cnn_bn

    net = mnist_cnn_bn().eval()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_model(tmp_path / "w.safetensors", arch=f"{ARCHS_FILE}:mnist_cnn_bn", device="cpu")
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(loaded.module(x), net(x))


def test_a_url_or_hub_id_is_never_downloaded_and_says_what_to_do():
    """Nothing is fetched: a URL or a hub id names no local file, and the refusal says how to get one; a device file
    is not taken for a missing one."""
    from backdoorscan.loading.samples import open_source

    for path, needle in (
        ("https://huggingface.co/org/model/resolve/main/model.safetensors", "never downloads"),
        ("hf://org/model", "never downloads"),
        ("some-org/some-model", "huggingface-cli download some-org/some-model --local-dir DIR"),
        ("missing_model.pt2", "check the path"),
        ("/dev/null", "not a regular file"),
    ):
        with pytest.raises(ScanError, match=re.escape(needle)):
            load_model(path, device="cpu")
    with pytest.raises(ScanError, match="never downloads"):
        open_source("https://example.org/clean.npz")
