"""The gate as people run it: the clean data they actually have, CI runners, GitHub's summary and code scanning,
and the messages a mistake gets (issue 28)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from backdoorscan import ScanError, ScanSettings, scan_model
from backdoorscan.cli import app
from backdoorscan.core.device import usable_cpus
from backdoorscan.fleet.run import FleetItem, FleetResult
from backdoorscan.loading import ModelSource, prepare
from backdoorscan.report.sarif import fleet_sarif
from backdoorscan.report.writer import write_markdown

from .conftest import BADNETS, CLEAN, MNIST_TEST

TINY = ScanSettings(steps=5, max_passes=1, samples=60, families="universal")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits(classes: list[int], n: int = 100) -> dict[str, np.ndarray]:
    d = np.load(MNIST_TEST)
    keep = np.isin(d["y"], classes)
    return {"x": d["x"][keep][:n], "y": d["y"][keep][:n]}


@pytest.mark.parametrize("classes", [[3], [3, 5]])
def test_clean_samples_of_one_or_two_classes_are_inconclusive_with_the_reason(classes, tmp_path):
    """100 clean digits, all 3s (or 3s and 5s), once flagged a clean model ("target 3, margin 15.57")."""
    np.savez(tmp_path / "few.npz", **_digits(classes))
    scan = scan_model(CLEAN, tmp_path / "few.npz", settings=TINY, device="cpu")
    assert scan.verdict == "inconclusive" and scan.exit_code == 3
    assert f"cover {len(classes)} of the model's 10 classes" in scan.reasons[0]
    assert scan.to_dict()["evidence"]["class_coverage"]["covered"] == len(classes)


def test_what_the_data_held_back_is_said_in_the_verdict(tmp_path):
    """Fewer samples than asked, a class missing, an unreadable file: the scan runs and says so."""
    parts = [_digits([c], 5) for c in range(9)]  # five of each digit but 9
    np.savez(
        tmp_path / "nine.npz", x=np.concatenate([p["x"] for p in parts]), y=np.concatenate([p["y"] for p in parts])
    )
    scan = scan_model(CLEAN, tmp_path / "nine.npz", settings=TINY, device="cpu")
    notes = " ".join(scan.to_dict()["notes"])
    assert "cover 9 of 10 classes" in notes and "45 clean samples used of the 60 asked" in notes
    folder = tmp_path / "flat"
    folder.mkdir()
    for i, image in enumerate(_digits(list(range(10)), 40)["x"]):
        Image.fromarray(image[..., 0]).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    unlabelled = scan_model(CLEAN, folder, settings=TINY, device="cpu")
    notes = " ".join(unlabelled.to_dict()["notes"])
    assert "unlabelled" in notes and "could not be read" in notes and "broken.png" in notes


def _label_folders(root, names: list[str]) -> None:
    d = _digits(list(range(10)), 200)
    for name in names:
        (root / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(d["x"], d["y"], strict=True)):
        Image.fromarray(image[..., 0]).save(root / names[int(label)] / f"{i}.png")


def test_class_folders_named_after_the_labels_are_mapped_by_name(tmp_path):
    """Folders zero/ ... nine/ with labels zero ... nine: alphabetically `eight` would be class 0 (accuracy 0.08)."""
    _label_folders(tmp_path / "named", NAMES)
    ready = prepare(ModelSource(CLEAN, labels=tuple(NAMES)), tmp_path / "named", samples=100, seed=0, device="cpu")
    assert ready.evidence.ok and ready.evidence.checks["clean_accuracy"]["accuracy"] > 0.9
    assert ready.labels == NAMES and not ready.evidence.notes
    other = [f"class_{c}" for c in "abcdefghij"]
    _label_folders(tmp_path / "other", other)
    unmatched = prepare(ModelSource(CLEAN, labels=tuple(NAMES)), tmp_path / "other", samples=100, seed=0, device="cpu")
    assert any("match none of the model's label names" in n for n in unmatched.evidence.notes)


def test_bad_output_paths_are_refused_before_the_model_is_loaded(tmp_path):
    (tmp_path / "summary.md").mkdir()  # a folder where the Markdown file should go
    missing_model = tmp_path / "not-there.pt2"  # never reached: the outputs are checked first
    runner = CliRunner()
    for option in ("--markdown", "--sarif"):
        result = runner.invoke(
            app, ["model", str(missing_model), "--data", str(MNIST_TEST), option, str(tmp_path / "summary.md")]
        )
        assert result.exit_code == 2 and "is a folder, not a file" in result.output, result.output
    (tmp_path / "locked").mkdir()
    os.chmod(tmp_path / "locked", stat.S_IRUSR | stat.S_IXUSR)
    if not os.access(tmp_path / "locked", os.W_OK):  # root writes anywhere: nothing to refuse then
        result = runner.invoke(
            app, ["model", str(missing_model), "--data", str(MNIST_TEST), "--markdown", str(tmp_path / "locked/a.md")]
        )
        assert result.exit_code == 2 and "not writable" in result.output


def test_the_step_summary_is_appended_to_and_other_files_keep_a_normal_mode(tmp_path, monkeypatch):
    summary = tmp_path / "step_summary"
    summary.write_text("## an earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    write_markdown(summary, "### backdoorscan\n")
    write_markdown(summary, "### backdoorscan again\n")
    assert summary.read_text() == "## an earlier step\n\n### backdoorscan\n\n### backdoorscan again\n"
    write_markdown(tmp_path / "report.md", "x")
    write_markdown(tmp_path / "report.md", "y")  # elsewhere: replaced whole, atomically
    assert (tmp_path / "report.md").read_text() == "y"
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_sarif_points_at_files_relative_to_the_checkout_with_stable_fingerprints(tmp_path, monkeypatch):
    hub = tmp_path / "models/vit"
    hub.mkdir(parents=True)
    (hub / "config.json").write_text("{}")
    (hub / "model.safetensors").write_bytes(b"0")
    (tmp_path / "models/a.pt2").write_bytes(b"0")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path))
    monkeypatch.chdir(tmp_path / "models")
    report = {"verdict": "backdoor", "model": {"sha256": "ab" * 32}, "classes": []}
    items = [
        FleetItem("a", "./../models/a.pt2", 1, 1.0, report=report),
        FleetItem("vit", str(hub), 1, 1.0, report=report),
        FleetItem("gone", "missing.pt2", 2, 0.0, error="model file not found"),
    ]
    runs = [fleet_sarif(FleetResult(items))["runs"][0] for _ in range(2)]
    uris = [r["locations"][0]["physicalLocation"]["artifactLocation"] for r in runs[0]["results"]]
    assert [u["uri"] for u in uris] == ["models/a.pt2", "models/vit/model.safetensors", "models/missing.pt2"]
    assert all(u["uriBaseId"] == "%SRCROOT%" for u in uris)
    assert runs[0]["originalUriBaseIds"]["%SRCROOT%"]["uri"] == tmp_path.as_uri() + "/"
    prints = [r["partialFingerprints"]["backdoorscanModel/v1"] for r in runs[0]["results"]]
    assert len(set(prints)) == 3 and prints == [
        r["partialFingerprints"]["backdoorscanModel/v1"] for r in runs[1]["results"]
    ]


def test_threads_follow_the_cpus_the_process_may_use(tmp_path):
    cpus, why = usable_cpus(str(tmp_path))  # no cgroup file here: affinity alone
    assert cpus == len(os.sched_getaffinity(0)) and "affinity" in why
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a runner limited to 1.5 CPUs
    assert usable_cpus(str(tmp_path))[0] == max(1, min(cpus, 1))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(str(tmp_path))[0] == cpus


def test_npz_mistakes_get_a_message_that_says_what_to_do(tmp_path):
    d = _digits(list(range(10)), 50)
    np.savez(tmp_path / "cf.npz", x=d["x"].transpose(0, 3, 1, 2), y=d["y"])
    np.savez(tmp_path / "f255.npz", x=d["x"].astype(np.float32), y=d["y"])
    with pytest.raises(ScanError, match="channels-first"):
        scan_model(CLEAN, tmp_path / "cf.npz", settings=TINY, device="cpu")
    with pytest.raises(ScanError, match=r"must lie in \[0, 1\]") as info:
        scan_model(CLEAN, tmp_path / "f255.npz", settings=TINY, device="cpu")
    assert "divide" in info.value.hint and str(tmp_path / "f255.npz") in info.value.one_line()


def test_settings_that_make_no_sense_are_refused():
    for bad in ({"threshold": -1}, {"threshold": 0}, {"pair_cost": -0.1}, {"warp_lr": 0}):
        with pytest.raises(ScanError):
            ScanSettings(**bad)
    result = CliRunner().invoke(app, ["model", str(BADNETS), "--data", str(MNIST_TEST), "--threshold", "-1"])
    assert result.exit_code == 2 and "threshold must be positive" in result.output


def test_a_reader_that_leaves_early_ends_the_output_not_the_verdict(tmp_path):
    """`backdoorscan model ... --json | true` (the reader gone before the report): no BrokenPipeError, the
    scan's own exit code."""
    import subprocess
    import sys

    cmd = (
        f"{sys.executable} -m backdoorscan model {BADNETS} --data {MNIST_TEST} --json --quiet --sandbox off "
        "--steps 5 --max-passes 1 --samples 40 --families universal --device cpu --threads 1 | true"
    )
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), done.stderr  # the verdict's code (a tiny scan may or may not flag)


def test_the_nc_table_shows_no_uap_and_the_fleet_counts_read_well():
    from backdoorscan.report.rows import class_rows

    scan = scan_model(BADNETS, MNIST_TEST, settings=ScanSettings(method="nc", steps=3, samples=30), device="cpu")
    assert all(cells[1] == "n/a" for _, cells in class_rows(scan))  # UAP norm: none, not 0.00
    from backdoorscan.report.markdown import fleet_markdown

    one = FleetResult([FleetItem("a", "a.pt2", 0, 1.0, report={"verdict": "clean"})])
    assert "1 model\n" in fleet_markdown(one) and "1 models" not in fleet_markdown(one)
    assert torch.get_num_threads() >= 1


def test_a_sandboxed_scan_appends_to_a_step_summary_named_as_runners_name_it(tmp_path, monkeypatch):
    """A runner's `$GITHUB_STEP_SUMMARY` has no `.md` suffix; the parent, not the child, knows it is the summary."""
    summary = tmp_path / "step_summary_0f1e"
    summary.write_text("## an earlier step\n")
    os.chmod(summary, 0o644)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = CliRunner().invoke(
        app,
        [
            "model",
            str(BADNETS),
            "--data",
            str(MNIST_TEST),
            "--markdown",
            str(summary),
            "--quiet",
            "--samples",
            "40",
            "--steps",
            "5",
            "--max-passes",
            "1",
            "--families",
            "universal",
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code in (0, 1, 3), result.output
    text = summary.read_text()
    assert text.startswith("## an earlier step\n\n### backdoorscan") and stat.S_IMODE(summary.stat().st_mode) == 0o644


def test_the_supervisor_never_loads_torch(tmp_path):
    """The process a user starts only checks options, supervises the confined child and writes what it returns: it
    never imports torch (2 s and a few hundred MB saved on every run; `--version` and a refusal return at once).
    A fresh interpreter runs a refusal and a small supervised scan with every output, then looks."""
    import subprocess
    import sys

    (tmp_path / "broken.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    script = f"""
import sys
from typer.testing import CliRunner
from backdoorscan.cli import app
run = CliRunner().invoke
refused = run(app, ["model", {str(tmp_path / "broken.pt2")!r}, "--data", {str(MNIST_TEST)!r}])
assert refused.exit_code == 2, refused.output
out = {str(tmp_path)!r}
scanned = run(app, ["model", {str(BADNETS)!r}, "--data", {str(MNIST_TEST)!r}, "--samples", "40", "--steps", "30",
    "--max-passes", "2", "--families", "universal", "--threads", "1", "--out", out + "/out", "--markdown",
    out + "/r.md", "--sarif", out + "/s.sarif", "--json"])
assert scanned.exit_code == 1, scanned.output
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout[-500:]
    assert (tmp_path / "out/report.json").exists() and (tmp_path / "out/triggers.png").exists()
    assert (tmp_path / "r.md").exists() and (tmp_path / "s.sarif").exists()
