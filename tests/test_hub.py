"""Models as hubs ship them: a transformers ViT folder and a timm folder trained here with a BadNets patch on the
bundled digits, saved with their libraries' own conventions, scanned by path alone; and the refusals."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoorlab import make_attack, train_classifier
from backdoorlab.hub import DIGIT_NAMES, Normalised, save_timm_folder, save_vit_folder, tiny_timm, tiny_vit
from backdoorscan.cli import app
from backdoorscan.core.errors import ScanError
from backdoorscan.loading import load_model
from backdoorscan.loading.labels import read_labels

from .conftest import MNIST_TEST

HOSTILE = "zero|<b>x</b>[a](http://e)\x1b[31m"  # a class name that tries table breaks, HTML, links, escapes
FAST = ["--samples", "100", "--steps", "100", "--device", "cpu", "--families", "universal"]
PLUMBING = ["--max-passes", "1", "--steps", "2", "--samples", "20"]  # a test of the loading plumbing: a token scan
IN_PROCESS = ["--sandbox", "off"]  # refusals and overrides need no sandboxed child (the scans by path use one)


def _attack():
    return make_attack("badnets", (1, 28, 28), 10, np.random.default_rng(1), size=3)  # target 4 ("four")


@pytest.fixture(scope="module")
def digits_4000(digits):
    x, y, xt, yt = digits
    return x[:4000], y[:4000], xt, yt


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory, digits_4000):
    """A 2-layer ViT trained on digits normalised with mean 0.5, std 0.5, saved by save_pretrained."""
    names = (HOSTILE, *DIGIT_NAMES[1:])
    trained = train_classifier(
        lambda: Normalised(tiny_vit(names=names), 0.5, 0.5, hf=True),
        *digits_4000,
        attack=_attack(),
        epochs=8,
        lr=0.002,
        optimiser="adam",
        schedule="cosine",
    )
    assert trained.asr > 0.9 and trained.accuracy > 0.6
    return save_vit_folder(trained.model.model, tmp_path_factory.mktemp("hf") / "vit-digits")


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory, digits_4000):
    """timm's test_resnet trained on 4,000 digits normalised with mean 0.5, std 0.5, saved by timm's save_for_hf.
    (On 2,000 it reaches the same accuracy and attack success, but its target's reversed trigger came out at 0.50-0.53
    of the median class, on the size guard, depending on the training's thread count: a test that flipped.)"""
    trained = train_classifier(
        lambda: Normalised(tiny_timm(), 0.5, 0.5),
        *digits_4000,
        attack=_attack(),
        epochs=6,
        lr=0.003,
        optimiser="adam",
        schedule="cosine",
    )
    assert trained.asr > 0.9 and trained.accuracy > 0.9
    return save_timm_folder(trained.model.model, tmp_path_factory.mktemp("timm") / "timm-digits")


def _scan(*args: str) -> tuple[int, dict | None, str]:
    result = CliRunner().invoke(app, ["model", "--data", str(MNIST_TEST), *FAST, *map(str, args)])  # args win
    try:
        return result.exit_code, json.loads(result.stdout), result.stderr
    except ValueError:
        return result.exit_code, None, result.stdout + result.stderr


def test_transformers_folder_is_scanned_by_path_alone(vit_folder, tmp_path):
    code, report, _ = _scan(vit_folder, "--json", "--out", tmp_path / "out", "--markdown", tmp_path / "r.md")
    assert code == 1 and report["target_classes"] == [4]
    target = next(c for c in report["classes"] if c["class"] == 4)
    assert target["name"] == "four" and target["flagged"]
    folder = report["model"]["read_from_folder"]
    assert folder["kind"] == "transformers" and folder["architecture"] == "ViTForImageClassification"
    assert folder["labels"] == 10 and folder["preprocessing_from"] == "preprocessor_config.json"
    # The preprocessing is the folder's: size 28, mean 0.5, std 0.5 (rescale 1/255 folded in), no override.
    assert report["input"]["height"] == 28 and report["input"]["mean"] == [0.5] and report["input"]["std"] == [0.5]
    assert report["model"]["overrides"] == [] and report["evidence"]["clean_accuracy"]["ok"]
    # Names reach the trigger files as safe slugs, and the Markdown as literal text.
    assert (tmp_path / "out/trigger_4_four.png").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if "<" in p.name or "|" in p.name]
    md = (tmp_path / "r.md").read_text()
    assert "4 (four)" in md and "<b>" not in md and "](http" not in md and "\x1b" not in md


def test_timm_folder_is_scanned_by_path_alone(timm_folder):
    code, report, _ = _scan(timm_folder, "--json")
    assert code == 1 and report["target_classes"] == [4]
    assert next(c for c in report["classes"] if c["class"] == 4)["name"] == "four"
    folder = report["model"]["read_from_folder"]
    assert folder["kind"] == "timm" and folder["architecture"] == "test_resnet" and folder["channels"] == 1
    assert folder["resample"] == "bilinear" and folder["weights"] == ["model.safetensors"]
    assert report["input"]["mean"] == [0.5] and report["input"]["std"] == [0.5]


def test_flags_override_the_folder_and_the_override_is_reported(timm_folder):
    code, report, _ = _scan(
        timm_folder,
        "--json",
        "--mean",
        "0.4",
        "--std",
        "0.5",
        *PLUMBING,
        *IN_PROCESS,
    )
    assert code in (0, 1) and report["input"]["mean"] == [0.4]
    assert report["model"]["overrides"] == ["--mean 0.4 overrides the folder's 0.5"]


def test_missing_or_wrong_preprocessing_is_a_clear_exit_2(vit_folder, tmp_path):
    bare = shutil.copytree(vit_folder, tmp_path / "bare")
    (bare / "preprocessor_config.json").unlink()
    code, _, text = _scan(bare, *IN_PROCESS)
    assert code == 2 and "preprocessor_config.json" in text and len(text.strip().splitlines()) == 1
    # With all three flags the user takes responsibility, and the scan runs.
    code, report, _ = _scan(
        bare,
        "--json",
        "--input-size",
        "28x28",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        *PLUMBING,
        *IN_PROCESS,
    )
    assert code in (0, 1) and report["input"]["mean"] == [0.5]
    wrong = json.loads((vit_folder / "preprocessor_config.json").read_text())
    wrong["image_mean"] = [0.5, 0.5, 0.5]  # three channels for a one-channel model
    (bare / "preprocessor_config.json").write_text(json.dumps(wrong))
    code, _, text = _scan(bare, *IN_PROCESS)
    assert code == 2 and "image_mean has 3 values for 1 channels" in text


def test_repository_code_and_escaping_shards_are_refused(vit_folder, tmp_path):
    remote = shutil.copytree(vit_folder, tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    code, _, text = _scan(remote, *IN_PROCESS)
    assert code == 2 and "trust_remote_code" in text
    sharded = shutil.copytree(vit_folder, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    code, _, text = _scan(sharded, *IN_PROCESS)
    assert code == 2 and "not a .safetensors file in the folder" in text


def test_a_missing_extra_names_it(timm_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ScanError, match=r"backdoorscan\[hub\]"):
        load_model(timm_folder, device="cpu")


def test_timm_architecture_for_bare_weights(timm_folder):
    folder = load_model(timm_folder, device="cpu").module
    bare = load_model(timm_folder / "model.safetensors", arch="timm:test_resnet", device="cpu").module
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(folder(x), bare(x))


def test_dynamo_exported_vit_matches_onnxruntime(vit_folder, tmp_path):
    import onnxruntime as ort
    from transformers import AutoModelForImageClassification

    model = Normalised(AutoModelForImageClassification.from_pretrained(vit_folder), 0.0, 1.0, hf=True).eval()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "vit.onnx"
    torch.onnx.export(
        model, (x,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
    )
    loaded = load_model(path, device="cpu")
    assert any("Gelu" in n for n in loaded.notes) and any("opset 20" in n for n in loaded.notes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        got = loaded.module(x).numpy()
    assert np.abs(got - expected).max() < 1e-4 and np.abs(expected).max() > 1.0  # trained logits, not noise


def test_labels_file_forms(tmp_path):
    (tmp_path / "a.txt").write_text("cat\ndog\n\nbird\n")
    (tmp_path / "b.json").write_text(json.dumps({"1": "dog", "0": "cat\x07"}))
    (tmp_path / "c.json").write_text(json.dumps({"0": "cat", "2": "bird"}))
    assert read_labels(tmp_path / "a.txt") == ("cat", "dog", "bird")
    assert read_labels(tmp_path / "b.json") == ("cat", "dog")
    with pytest.raises(ScanError, match="every class"):
        read_labels(tmp_path / "c.json")


def test_labels_flag_names_classes_and_must_match(tmp_path):
    from .conftest import BADNETS

    (tmp_path / "names.txt").write_text("\n".join(f"digit {i}" for i in range(10)))
    result = CliRunner().invoke(
        app,
        [
            "model",
            str(BADNETS),
            "--data",
            str(MNIST_TEST),
            "--labels",
            str(tmp_path / "names.txt"),
            "--json",
            "--max-passes",
            "1",
            "--steps",
            "2",
            "--families",
            "universal",
            "--samples",
            "20",
            "--device",
            "cpu",
            *IN_PROCESS,
        ],
    )
    assert [c["name"] for c in json.loads(result.stdout)["classes"]] == [f"digit {i}" for i in range(10)]
    (tmp_path / "few.txt").write_text("a\nb\nc\n")
    result = CliRunner().invoke(
        app,
        [
            "model",
            str(BADNETS),
            "--data",
            str(MNIST_TEST),
            "--labels",
            str(tmp_path / "few.txt"),
            "--device",
            "cpu",
            "--samples",
            "20",
            *IN_PROCESS,
        ],
    )
    assert result.exit_code == 2 and "names 3 classes but the model has 10" in result.output


def test_a_pickle_as_hub_weights_never_runs(timm_folder, tmp_path):
    from .hostile.builders import WritesCanary, torch_save_bytes

    canary = tmp_path / "canary"
    hostile = shutil.copytree(timm_folder, tmp_path / "hostile")
    (hostile / "model.safetensors").unlink()
    (hostile / "pytorch_model.bin").write_bytes(torch_save_bytes({"conv1.0.weight": WritesCanary(canary)}))
    with pytest.raises(ScanError, match="pytorch_model.bin"):
        load_model(hostile, device="cpu")
    code, _, text = _scan(hostile, *IN_PROCESS)
    assert code == 2 and len(text.strip().splitlines()) == 1 and not canary.exists()


def test_hub_folders_load_with_the_network_cut(vit_folder, timm_folder, monkeypatch):
    """Nothing is downloaded at run time: with every way to a network refused (and recorded), both hub folders
    load as they do online, and no connection, name lookup or socket was even attempted."""
    import socket

    tried: list[str] = []

    def refuse(what: str):
        def call(*args, **kwargs):
            tried.append(what)
            raise OSError(f"network cut by the test ({what})")

        return call

    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    for folder in (vit_folder, timm_folder):
        loaded = load_model(folder, device="cpu")
        with torch.no_grad():
            assert loaded.module(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert tried == []
