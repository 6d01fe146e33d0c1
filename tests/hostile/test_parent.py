"""What the unconfined parent and the CI runner trust (issue 27): outputs written by the parent from a checked
copy, reads bounded by the bytes read, no link out of a model folder, no path in a hub config, and a model that
behaves differently at batch size 1. Every case is built here, at test time."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.nn as nn

from backdoorscan import ScanError, scan_model
from backdoorscan.cli.supervise import _check_names, _deliver_copies
from backdoorscan.fleet.cache import loader_digest
from backdoorscan.loading import load_model
from backdoorscan.loading.hub import read_hub_folder
from backdoorscan.report.writer import write_tree
from backdoorscan.safety.files import read_bounded, read_tree_bounded

from ..conftest import CLEAN, MNIST_TEST

TIMM_CONFIG = {
    "architecture": "resnet18",
    "num_classes": 10,
    "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
}


def test_reads_are_bounded_by_the_bytes_read_not_the_size_reported(tmp_path):
    assert os.stat("/proc/self/status").st_size == 0  # procfs reports nothing ...
    with pytest.raises(ScanError, match="larger than 64 bytes"):
        read_bounded("/proc/self/status", 64, "labels file")  # ... and holds more
    with pytest.raises(ScanError, match="not a regular file"):
        read_bounded("/dev/zero", 1 << 20, "labels file")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    os.symlink("/proc/self/environ", tmp_path / "link.txt")
    with pytest.raises(ScanError, match="link"):
        read_bounded(tmp_path / "link.txt", 1 << 20, "report file", nofollow=True)
    assert read_bounded(tmp_path / "labels.txt", 4, "labels file") == b"a\nb\n"


def test_a_childs_output_is_read_bounded_without_links(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with open(out / "huge.png", "wb") as fh:  # 3 GiB sparse: what a child once left for the parent to read
        fh.truncate(3 << 30)
    t0 = time.monotonic()
    with pytest.raises(ScanError, match="larger than 1 MiB"):
        read_tree_bounded(out, limit=1 << 20)
    assert time.monotonic() - t0 < 5
    os.unlink(out / "huge.png")
    os.symlink("/etc/passwd", out / "passwd.png")
    with pytest.raises(ScanError, match="left a link"):
        read_tree_bounded(out)


def test_only_the_files_a_command_writes_reach_the_real_outputs(tmp_path):
    _check_names({"report.json": b"", "trigger_4.png": b""}, copies=False, folder=tmp_path)
    _check_names({"kept/a/1.png": b"", "flagged.npz": b""}, copies=True, folder=tmp_path)
    for name, copies in (("evil.sh", False), ("sub/report.json", False), ("kept/run.sh", True), ("x.png", True)):
        with pytest.raises(ScanError, match="unexpected file"):
            _check_names({name: b""}, copies=copies, folder=tmp_path)
    for name in ("../escape.png", "/abs.png", "a/../../b.png"):
        with pytest.raises(ScanError, match="refused"):
            write_tree(tmp_path / "w", {name: b"x"})


def test_copy_to_takes_the_childs_sorting_and_the_inputs_bytes(tmp_path):
    """--copy-to: the parent copies each image from the input into where the child sorted it; what the child wrote
    in its copy is never delivered, a name that is no input is refused, a link in the dataset is copied as the file
    it names and a link to a device is refused."""
    src, private = tmp_path / "input", tmp_path / "private"
    (src / "a").mkdir(parents=True)
    (src / "a/1.png").write_bytes(b"input one")
    (src / "2.png").write_bytes(b"input two")
    (tmp_path / "elsewhere.png").write_bytes(b"linked")
    os.symlink(tmp_path / "elsewhere.png", src / "3.png")
    for name, data in (("kept/a/1.png", b"child's own bytes"), ("flagged/2.png", b""), ("kept/3.png", b"")):
        (private / name).parent.mkdir(parents=True, exist_ok=True)
        (private / name).write_bytes(data)
    _deliver_copies(private, tmp_path / "sorted", src)
    assert (tmp_path / "sorted/kept/a/1.png").read_bytes() == b"input one"
    assert (tmp_path / "sorted/flagged/2.png").read_bytes() == b"input two"
    assert (tmp_path / "sorted/kept/3.png").read_bytes() == b"linked"
    (private / "kept/4.png").write_bytes(b"a file of the child's")
    with pytest.raises(ScanError, match="not an input"):
        _deliver_copies(private, tmp_path / "sorted2", src)
    os.unlink(private / "kept/4.png")
    os.symlink("/dev/zero", src / "5.png")
    (private / "kept/5.png").write_bytes(b"")
    with pytest.raises(ScanError, match="not an input"):
        _deliver_copies(private, tmp_path / "sorted3", src)
    assert not (tmp_path / "sorted2").exists() or not any((tmp_path / "sorted2").rglob("*.png"))


def test_a_link_out_of_a_model_folder_is_refused_before_anything_is_hashed(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(TIMM_CONFIG))
    os.symlink("/proc/self/pagemap", hub / "model.safetensors")  # hundreds of GiB of zeros, once hashed whole
    t0 = time.monotonic()
    with pytest.raises(ScanError, match="leaves the model folder"):
        loader_digest(hub)
    with pytest.raises(ScanError, match="leaves the model folder"):
        load_model(hub, device="cpu")
    assert time.monotonic() - t0 < 5
    images = tmp_path / "images"
    images.mkdir()
    os.symlink("/proc/self/pagemap", images / "x.png")
    with pytest.raises(ScanError, match="leaves the model folder"):
        loader_digest(images)


@pytest.mark.parametrize(
    "config",
    [
        {
            "model_type": "timm_wrapper",
            "architecture": "resnet18",
            "num_labels": 10,
            "model_args": {"checkpoint_path": "weights.pth"},
        },
        {**TIMM_CONFIG, "model_args": {"pretrained_cfg_overlay": "x"}},
        {**TIMM_CONFIG, "pretrained_cfg": {**TIMM_CONFIG["pretrained_cfg"], "file": "/etc/passwd"}},
        {"model_type": "vit", "num_labels": 10, "extra": {"url": "https://example.com/w.bin"}},
        {"model_type": "vit", "num_labels": 10, "weights": "../../outside.bin"},
    ],
)
def test_a_hub_config_that_names_a_file_is_refused(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ScanError, match="refused"):
        read_hub_folder(tmp_path)


class BatchOneBackdoor(nn.Module):
    """A clean model, except at batch size 1 (a deployment serving single requests), where class 0 wins."""

    def __init__(self, clean: nn.Module) -> None:
        super().__init__()
        self.clean = clean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.clean(x)
        if x.shape[0] == 1:
            logits = logits + torch.nn.functional.one_hot(torch.zeros(1, dtype=torch.long), logits.shape[1]) * 100
        return logits


def test_a_model_backdoored_only_at_batch_size_one_is_not_clean():
    model = BatchOneBackdoor(load_model(CLEAN, device="cpu").module)
    from backdoorscan import ScanSettings

    scan = scan_model(model, MNIST_TEST, settings=ScanSettings(steps=5, max_passes=1, samples=60), device="cpu")
    assert scan.verdict == "inconclusive" and scan.exit_code == 3
    assert not scan.evidence.checks["batch_size"]["ok"] and "one image at a time" in scan.reasons[0]


def test_the_fleet_parents_hashing_stops_at_the_timeout(tmp_path):
    from backdoorscan.fleet.cache import ResultCache
    from backdoorscan.fleet.plan import FleetEntry

    big = tmp_path / "model.pt2"
    with open(big, "wb") as fh:
        fh.write(os.urandom(4 << 20))
    cache = ResultCache(tmp_path / "cache")
    cache.timeout = 0.0  # already past: the parent's share of --timeout is spent
    with pytest.raises(ScanError, match="ran past --timeout"):
        cache.key(FleetEntry("m", big, MNIST_TEST), {"device": "cpu"})
    cache = ResultCache(tmp_path / "cache")
    cache.timeout = 600.0
    assert len(cache.key(FleetEntry("m", big, MNIST_TEST), {"device": "cpu"})) == 64
