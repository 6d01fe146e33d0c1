"""A gate for many models: one command over several checkpoints, a folder or a manifest; the result cache; SARIF
checked against the SARIF 2.1.0 schema; Ray (a local instance) giving the same reports as the local run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backdoorscan.cli import app
from backdoorscan.fleet.cache import ResultCache
from backdoorscan.fleet.plan import FleetEntry, plan_fleet

from .conftest import BADNETS, CLEAN, MNIST_TEST, ROOT

FAST = [
    "--samples",
    "40",
    "--steps",
    "30",
    "--max-passes",
    "2",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--families",
    "universal",
]
SCHEMA = ROOT / "tests/data/sarif-schema-2.1.0.json"


def _fleet(*args) -> tuple[int, list[dict], str]:
    result = CliRunner().invoke(app, ["model", *map(str, args), *FAST, "--json"])
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.exit_code, lines, result.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fleet") / "models"
    folder.mkdir()
    shutil.copy(BADNETS, folder / "badnets.pt2")
    shutil.copy(CLEAN, folder / "clean.pt2")
    return folder


@pytest.fixture(scope="module")
def first_run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    code, lines, _ = _fleet(
        models / "badnets.pt2",
        models / "clean.pt2",
        "--data",
        MNIST_TEST,
        "--out",
        out / "reports",
        "--sarif",
        out / "scan.sarif",
        "--markdown",
        out / "fleet.md",
        "--cache-dir",
        out / "cache",
    )
    return code, lines, out


def test_a_fleet_gives_one_report_per_model_a_summary_and_the_worst_exit_code(first_run):
    code, lines, out = first_run
    assert code == 1  # one suspect, one clean: the worst is 1
    *reports, summary = lines
    assert [Path(r["model"]["path"]).name for r in reports] == ["badnets.pt2", "clean.pt2"]
    assert [r["verdict"] for r in reports] == ["backdoor", "clean"] and reports[0]["target_classes"] == [4]
    assert summary["summary"]["models"] == 2 and summary["summary"]["exit_code"] == 1
    for name in ("badnets.pt2", "clean.pt2"):
        saved = json.loads((out / "reports" / name / "report.json").read_text())
        assert saved["model"]["path"].endswith(name) and (out / "reports" / name / "triggers.png").exists()
    assert "| **backdoor** | 4 |" in (out / "fleet.md").read_text()


def test_sarif_is_valid_2_1_0_with_one_result_per_suspect_model(first_run):
    jsonschema = pytest.importorskip("jsonschema")
    _, _, out = first_run
    log = json.loads((out / "scan.sarif").read_text())
    jsonschema.validate(log, json.loads(SCHEMA.read_text()))
    results = log["runs"][0]["results"]
    assert len(results) == 1 and results[0]["ruleId"] == "BDS001" and results[0]["level"] == "error"
    assert results[0]["properties"]["targetClasses"] == [4]
    assert results[0]["properties"]["anomalyIndex"]["4"] > 2
    assert results[0]["properties"]["report"].endswith("badnets.pt2")
    where = results[0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert where["uri"].endswith("badnets.pt2") and ".." not in where["uri"].split("/")
    assert set(results[0]["partialFingerprints"]) >= {"backdoorscanModel/v1", "modelSha256"}
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict enough to catch a broken log
        jsonschema.validate({**log, "version": "2.0.0"}, json.loads(SCHEMA.read_text()))


def test_an_unchanged_model_comes_from_the_cache_and_a_changed_one_does_not(first_run, models, tmp_path):
    code, lines, out = first_run
    again_code, again, _ = _fleet(
        models / "badnets.pt2",
        models / "clean.pt2",
        "--data",
        MNIST_TEST,
        "--out",
        tmp_path / "reports",
        "--cache-dir",
        out / "cache",
    )
    assert again_code == code and again[-1]["summary"]["cached"] == 2
    assert [r["classes"] for r in again[:-1]] == [r["classes"] for r in lines[:-1]]  # the same reports
    assert (tmp_path / "reports/badnets.pt2/report.json").exists()  # reports written from the cache too
    # The same bytes elsewhere (another checkout): a hit, reported at the paths given now.
    moved = shutil.copytree(models, tmp_path / "elsewhere")
    _, there, _ = _fleet(
        moved / "badnets.pt2", "--data", MNIST_TEST, "--out", tmp_path / "r2", "--cache-dir", out / "cache"
    )
    assert there[-1]["summary"]["cached"] == 1 and there[0]["model"]["path"] == str(moved / "badnets.pt2")
    saved = json.loads((tmp_path / "r2/badnets.pt2/report.json").read_text())
    assert saved["model"]["path"] == str(moved / "badnets.pt2") and saved["data"]["path"] == str(MNIST_TEST)
    # Other settings, or --no-cache, scan again.
    _, changed, _ = _fleet(
        models / "clean.pt2", "--data", MNIST_TEST, "--cache-dir", out / "cache", "--threshold", "2.5"
    )
    assert changed[-1]["summary"]["cached"] == 0


def test_cache_keys_follow_the_bytes_and_the_settings(models, tmp_path):
    cache = ResultCache(tmp_path)
    base = FleetEntry("a", models / "clean.pt2", MNIST_TEST)
    key = cache.key(base, {"device": "cpu"})
    assert key == cache.key(FleetEntry("b", models / "clean.pt2", MNIST_TEST), {"device": "cpu"})
    assert key != cache.key(FleetEntry("a", models / "badnets.pt2", MNIST_TEST), {"device": "cpu"})
    assert key != cache.key(FleetEntry("a", models / "clean.pt2", MNIST_TEST, settings={"steps": 9}), {"device": "cpu"})
    assert key != cache.key(base, {"device": "cuda"})


def test_an_unreadable_model_never_stops_the_others(models, tmp_path):
    shutil.copy(models / "clean.pt2", tmp_path / "clean.pt2")
    (tmp_path / "broken.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    code, lines, _ = _fleet(tmp_path, "--data", MNIST_TEST, "--no-cache")  # a folder of models
    assert code == 2
    broken, clean, summary = lines
    assert broken["verdict"] == "error" and "broken.pt2" in broken["error"]
    assert clean["verdict"] == "clean" and summary["summary"]["error"] == 1


def test_manifest_defaults_and_per_model_options(models, tmp_path):
    manifest = tmp_path / "fleet.toml"
    manifest.write_text(f"""
data = "{MNIST_TEST}"
threshold = 2.0

[[model]]
path = "{models / "badnets.pt2"}"
name = "trojaned"

[[model]]
path = "{models / "clean.pt2"}"
mean = [0.0]
std = [1.0]
steps = 20
""")
    entries = plan_fleet([], None, {}, {}, manifest)
    assert [e.name for e in entries] == ["trojaned", "clean.pt2"]
    assert entries[1].model == {"mean": [0.0], "std": [1.0]} and entries[1].settings == {"threshold": 2.0, "steps": 20}
    assert "--mean" in entries[1].argv({}) and "0.0" in entries[1].argv({})
    code, lines, _ = _fleet("--manifest", manifest, "--no-cache")
    assert code == 1 and [r["verdict"] for r in lines[:-1]] == ["backdoor", "clean"]
    assert lines[1]["settings"]["steps"] == 20 and lines[1]["input"]["mean"] == [0.0]
    manifest.write_text(manifest.read_text() + 'colour = "blue"\n')
    code, _, text = _fleet("--manifest", manifest)
    assert code == 2 and "unknown key 'colour'" in text


def test_ray_local_gives_the_local_reports(first_run, models):
    pytest.importorskip("ray")
    _, local, _ = first_run
    code, lines, _ = _fleet(models / "badnets.pt2", "--data", MNIST_TEST, "--ray", "local", "--no-cache")
    assert code == 1 and lines[-1]["summary"]["runner"].startswith("Ray local instance")
    for remote, here in zip(lines[:-1], local[:1], strict=True):  # the first run's badnets.pt2
        assert remote["verdict"] == here["verdict"] and remote["target_classes"] == here["target_classes"]
        assert [c["l1_norm"] for c in remote["classes"]] == [c["l1_norm"] for c in here["classes"]]
        assert [c["uap_norm"] for c in remote["classes"]] == [c["uap_norm"] for c in here["classes"]]


def test_a_single_model_can_write_sarif_too(tmp_path):
    result = CliRunner().invoke(
        app,
        ["model", str(BADNETS), "--data", str(MNIST_TEST), *FAST, "--sarif", str(tmp_path / "one.sarif"), "--quiet"],
    )
    assert result.exit_code == 1
    log = json.loads((tmp_path / "one.sarif").read_text())
    assert log["runs"][0]["results"][0]["properties"]["targetClasses"] == [4]


def test_the_github_action_is_valid_and_uses_real_options():
    import re
    import subprocess
    import sys

    checker = Path(sys.executable).parent / "check-jsonschema"
    if not checker.exists():
        pytest.skip("check-jsonschema is not installed")
    done = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-actions", str(ROOT / "action.yml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "action.yml").read_text()
    help_text = " ".join(CliRunner().invoke(app, ["model", "--help"], terminal_width=200).output.split())
    for flag in set(re.findall(r"(--[a-z][a-z-]+)", text)) - {"--quiet", "--extra-index-url"}:  # pip's
        assert flag in help_text, flag  # every option the action passes exists
