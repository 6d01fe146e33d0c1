"""filter-dataset on real digits: triggered images are flagged, clean ones kept, the input never touched."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from backdoorscan import FilterSettings, filter_dataset
from backdoorscan.cli import app

from .conftest import BADNETS, CLEAN, DATA, MNIST_TEST

SCREEN = DATA / "mnist/screen_demo.npz"  # 300 held-out clean digits, then triggered digits of other classes


@pytest.fixture(scope="module")
def screened():
    return filter_dataset(BADNETS, MNIST_TEST, SCREEN, device="cpu")


def test_triggered_images_are_flagged_and_clean_ones_kept(screened, attack_meta):
    kind = np.load(SCREEN)["kind"]
    flagged = np.array([i.flagged for i in screened.items])
    assert flagged[kind == 1].mean() >= 0.95  # backdoor attack success after filtering <= 5 %
    assert flagged[kind == 0].mean() <= 0.1  # false rejection rate
    assert screened.suspected_target == attack_meta["target"]
    assert screened.fooling_rate >= 0.9 and 0 < screened.epsilon <= 1
    assert screened.exit_code == 1


def test_class_thresholds_lower_the_false_rejections_and_keep_the_triggers(screened):
    """The UAP's dominant class survives it trigger or not; its own UAP and a survival margin calibrated on its
    clean samples take those clean digits back, and the triggered ones still pass. The paper's single rule is
    calibrated here (`class_survival` 1) for the very UAP the default filter computed: the same UAP, another rule."""
    import torch

    from backdoorscan.loading import ModelSource, prepare
    from backdoorscan.loading.samples import to_model_format
    from backdoorscan.screen.pipeline import calibrate
    from backdoorscan.screen.rule import uap_rule

    d = np.load(SCREEN)
    kind = d["kind"]
    settings = FilterSettings(class_survival=1.0)
    ready = prepare(ModelSource.of(BADNETS), MNIST_TEST, samples=settings.samples, seed=settings.seed, device="cpu")
    single = calibrate(ready.model, ready.samples.x, screened.rule.v, 10, settings, screened.epsilon)
    assert single.dominant == [] and screened.rule.dominant
    x = to_model_format(d["x"], (1, 28, 28))
    with torch.no_grad():
        flags = {
            "single": uap_rule(ready.model, x, single)[2].numpy(),
            "class": np.array([i.flagged for i in screened.items]),
        }
    assert np.array_equal(uap_rule(ready.model, x, screened.rule)[2].numpy(), flags["class"])  # the same screen
    frr = {name: f[kind == 0].mean() for name, f in flags.items()}
    assert frr["class"] < frr["single"]
    assert flags["class"][kind == 1].mean() >= 0.95


def test_clean_model_flags_do_not_concentrate():
    result = filter_dataset(CLEAN, MNIST_TEST, SCREEN, device="cpu")
    assert result.suspected_target is None
    kind = np.load(SCREEN)["kind"]
    flagged = np.array([i.flagged for i in result.items])
    assert flagged[kind == 1].mean() < 0.5  # without a backdoor the patch is not special


def _tree_digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.sandbox
def test_copy_to_delivers_more_images_than_a_report_may_hold(tmp_path, monkeypatch):
    """A sandboxed screen's --copy-to is not held to the report caps (256 MiB, 20,000 files: a dataset of 50,000
    images was refused after the whole screen): with the caps lowered below the images screened, every image still
    arrives, byte for byte."""
    from backdoorscan.safety import files, sandbox

    if sandbox.landlock_abi() < 1:
        pytest.skip("no Landlock: the screen runs in-process and nothing is delivered")
    monkeypatch.setattr(files, "OUTPUT_FILES", 2)
    monkeypatch.setattr(files, "OUTPUT_LIMIT", 1000)
    d = np.load(SCREEN)
    src = tmp_path / "incoming"
    src.mkdir()
    for i in (0, 1, 2, 400):
        Image.fromarray(d["x"][i, ..., 0]).save(src / f"img_{i}.png")
    res = CliRunner().invoke(
        app,
        ["filter", str(BADNETS), "--clean", str(MNIST_TEST), "--input", str(src), "--copy-to", str(tmp_path / "to")]
        + ["--samples", "150", "--json", "--device", "cpu"],
    )
    assert res.exit_code in (0, 1), res.output
    copied = sorted((tmp_path / "to").rglob("*.png"))
    assert len(copied) == 4
    assert all(p.read_bytes() == (src / p.name).read_bytes() for p in copied)


def test_folder_copy_to_single_image_and_uap_reuse(tmp_path, screened):
    d = np.load(SCREEN)
    src = tmp_path / "incoming"
    for i in [0, 1, 2, 400, 401, 402]:
        sub = src / ("batch_a" if i < 300 else "batch_b") / "deep"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(d["x"][i, ..., 0]).save(sub / f"img_{i}.png")
    before = _tree_digest(src)
    uap_file = tmp_path / "model.uap"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "filter",
            str(BADNETS),
            "--clean",
            str(MNIST_TEST),
            "--input",
            str(src),
            "--copy-to",
            str(tmp_path / "sorted"),
            "--out",
            str(tmp_path / "out"),
            "--save-uap",
            str(uap_file),
            "--json",
            "--device",
            "cpu",
            "--samples",
            "150",  # plumbing: a smaller clean draw than the default's 300
        ],
    )
    assert res.exit_code == 1, res.output
    report = json.loads(res.stdout)
    assert {"total", "flagged", "epsilon", "fooling_rate", "items"} <= set(report)
    assert report["total"] == 6
    flagged = {i["id"] for i in report["items"] if i["flagged"]}
    assert {f"batch_b/deep/img_{i}.png" for i in (400, 401, 402)} <= flagged
    assert _tree_digest(src) == before  # the input is untouched
    for item in report["items"]:
        where = "flagged" if item["flagged"] else "kept"
        assert (tmp_path / "sorted" / where / item["id"]).read_bytes() == (src / item["id"]).read_bytes()
    assert (tmp_path / "out/manifest.csv").read_text().count("\n") == 7
    assert (tmp_path / "out/uap.png").exists() and (tmp_path / "out/manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.pt"))  # no pickle written by a tool that refuses to load them
    # A deployment screens single inputs with the stored UAP: two forward passes, no clean data. The report's
    # uap.safetensors is the same file as --save-uap's, with the model's sha256, epsilon and fooling rate.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out/uap.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["model_sha256"] == report["model"]["sha256"] and float(meta["epsilon"]) == report["epsilon"]
    assert float(meta["fooling_rate"]) == report["fooling_rate"]
    from backdoorscan.report.uap_file import load_uap

    stored = load_uap(uap_file, report["model"]["sha256"], (1, 28, 28))
    assert np.allclose(stored.thresholds.numpy(), report["thresholds"], atol=1e-4)
    assert sorted(stored.class_v) == report["dominant_classes"] != []
    for c in stored.class_v:
        assert stored.class_v[c].shape == (1, 28, 28)
    one = src / "batch_b/deep/img_400.png"
    for stored in (uap_file, tmp_path / "out/uap.safetensors"):
        res = runner.invoke(
            app,
            ["filter-dataset", str(BADNETS), "--uap", str(stored), "--input", str(one), "--json", "--sandbox", "off"],
        )
        assert res.exit_code == 1 and json.loads(res.stdout)["flagged"] == 1
    res = runner.invoke(
        app,
        [
            "filter-dataset",
            str(BADNETS),
            "--uap",
            str(uap_file),
            "--input",
            str(src / "batch_a/deep/img_0.png"),
            "--json",
            "--sandbox",
            "off",  # the reuse of a UAP file is what this checks; the sandboxed path ran above
        ],
    )
    assert res.exit_code in (0, 1) and json.loads(res.stdout)["total"] == 1
    # ... and a UAP is refused for another model.
    res = runner.invoke(
        app, ["filter-dataset", str(CLEAN), "--uap", str(uap_file), "--input", str(one), "--sandbox", "off"]
    )
    assert res.exit_code == 2 and "another model" in res.output


def test_npz_copy_to_and_strip(tmp_path):
    result = filter_dataset(
        BADNETS, MNIST_TEST, SCREEN, settings=FilterSettings(method="strip"), copy_to=tmp_path / "sorted", device="cpu"
    )
    kind = np.load(SCREEN)["kind"]
    flagged = np.array([i.flagged for i in result.items])
    assert flagged[kind == 1].mean() >= 0.8 and flagged[kind == 0].mean() <= 0.3
    kept, bad = np.load(tmp_path / "sorted/kept.npz"), np.load(tmp_path / "sorted/flagged.npz")
    assert len(kept["x"]) + len(bad["x"]) == len(kind)
    assert np.array_equal(bad["x"], np.load(SCREEN)["x"][bad["index"]])


def test_refuses_to_write_inside_the_input(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(src / "a.png")
    res = CliRunner().invoke(
        app,
        [
            "filter-dataset",
            str(BADNETS),
            "--clean",
            str(MNIST_TEST),
            "--input",
            str(src),
            "--copy-to",
            str(src / "sorted"),
        ],
    )
    assert res.exit_code == 2 and "inside the input" in res.output


def test_malformed_thresholds_in_a_uap_file_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from backdoorscan.core.errors import ScanError
    from backdoorscan.report.uap_file import UAP_SCHEMA, load_uap

    meta = {"schema": UAP_SCHEMA, "epsilon": "0.5", "fooling_rate": "0.9", "model_sha256": ""}
    cases = {
        "no thresholds": {},
        "wrong rank": {"thresholds": torch.zeros(2, 5)},
        "not finite": {"thresholds": torch.tensor([0.0, float("nan")])},
        "class UAPs without classes": {"thresholds": torch.zeros(10), "class_uaps": torch.zeros(1, 1, 28, 28)},
        "class UAP of another shape": {
            "thresholds": torch.zeros(10),
            "class_uaps": torch.zeros(1, 1, 8, 8),
            "class_uap_classes": torch.tensor([3]),
        },
        "class without a threshold": {
            "thresholds": torch.zeros(10),
            "class_uaps": torch.zeros(1, 1, 28, 28),
            "class_uap_classes": torch.tensor([12]),
        },
    }
    for name, extra in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({"uap": torch.zeros(1, 28, 28), **extra}, str(path), metadata=meta)
        with pytest.raises(ScanError):
            load_uap(path, None, (1, 28, 28))
