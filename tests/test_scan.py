"""USB end to end on real digits: the BadNets model is flagged with its target, the clean one is not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from backdoorscan import ScanSettings, scan_model
from backdoorscan.cli import app
from backdoorscan.core.jsonout import dumps
from backdoorscan.perturb.triggers import stamp
from backdoorscan.usb.refine import refine

from .conftest import BADNETS, CLEAN, MNIST_TEST


@pytest.fixture(scope="module")
def badnets_cli(tmp_path_factory):
    """One CLI scan of the committed BadNets model with --json, --out and --markdown (USB's family at half the
    default size: the default-size claims are `make test-detection`'s; every family runs on the clean model below)."""
    out = tmp_path_factory.mktemp("scan") / "report"
    md = out.parent / "summary.md"
    result = CliRunner().invoke(
        app,
        [
            "model",
            str(BADNETS),
            "--data",
            str(MNIST_TEST),
            "--device",
            "cpu",
            "--families",
            "universal",
            "--samples",
            "150",
            "--steps",
            "250",
            "--json",
            "--out",
            str(out),
            "--markdown",
            str(md),
        ],
    )
    return result, out, md


def test_badnets_model_is_flagged_with_its_target(badnets_cli, attack_meta):
    result, _, _ = badnets_cli
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "backdoor"
    assert report["target_classes"] == [attack_meta["target"]]
    target = report["classes"][attack_meta["target"]]
    others = [c["l1_norm"] for c in report["classes"] if c["class"] != attack_meta["target"]]
    assert target["l1_norm"] * 4 < np.median(others)  # the paper's "much smaller" reversed trigger
    assert target["asr"] >= 0.9


def test_a_log_gets_plain_progress_lines_on_stderr_and_the_json_alone_on_stdout(badnets_cli):
    result, _, _ = badnets_cli
    lines = result.stderr.splitlines()
    for phase in ("targeted UAPs (Alg. 1)", "refinement (Alg. 2)"):
        assert any(line.startswith(f"{phase}: started") for line in lines), result.stderr
        assert any(line.startswith(f"{phase}: done in") for line in lines), result.stderr
    assert result.stdout.lstrip().startswith("{")


def test_log_progress_states_an_eta_at_most_every_interval(capsys):
    from backdoorscan.cli.views import log_progress

    now = [0.0]
    update = log_progress(every=30, clock=lambda: now[0])
    for t, done in ((0, 0), (10, 10), (31, 31), (40, 40), (62, 62), (100, 100)):
        now[0] = float(t)
        update("refine", done, 100)
    assert capsys.readouterr().err.splitlines() == [
        "refinement (Alg. 2): started (100 steps)",
        "refinement (Alg. 2): 31/100 after 31 s, eta 69 s",
        "refinement (Alg. 2): 62/100 after 62 s, eta 38 s",
        "refinement (Alg. 2): done in 100 s",
    ]


def test_json_report_carries_the_documented_fields(badnets_cli):
    result, out, md = badnets_cli

    def not_json(constant: str):
        raise AssertionError(f"{constant} is not standard JSON")

    report = json.loads(result.stdout, parse_constant=not_json)  # strict, as jq and CI parsers read it
    assert report["schema"] == "backdoorscan.model-scan/1"
    assert report["families"]["covered"] == ["universal"] and "pairs" not in report["families"]  # USB as published
    assert {"verdict", "target_classes", "classes", "model", "settings", "timings", "device"} <= set(report)
    assert len(report["classes"]) == 10
    for c in report["classes"]:
        assert {"class", "l1_norm", "size_ratio", "anomaly_index", "asr", "flagged", "uap_success"} <= set(c)
    assert report["batching"]["class_group"] == 10 and report["batching"]["chosen_by"] == "memory"
    assert len(report["model"]["sha256"]) == 64 and report["model"]["format"] == "torch.export"
    assert json.loads((out / "report.json").read_text()) == report
    assert "Backdoor suspected" in md.read_text()


def test_trigger_images_are_written(badnets_cli, attack_meta):
    _, out, _ = badnets_cli
    for t in range(10):
        for kind in ("trigger", "mask", "stamped"):
            assert Image.open(out / f"{kind}_{t}.png").size[0] >= 112
    grid = Image.open(out / "triggers.png")
    assert grid.size[0] > 10 * 112
    # The reversed trigger of the target sits where the real patch is.
    mask = np.asarray(Image.open(out / f"mask_{attack_meta['target']}.png"), dtype=float)
    scale = mask.shape[0] // 28
    r, c, s = attack_meta["row"], attack_meta["col"], attack_meta["size"]
    inside = mask[r * scale : (r + s) * scale, c * scale : (c + s) * scale].sum()
    assert inside / mask.sum() > 0.3


def test_the_named_trigger_screens_a_dataset_by_erasure(badnets_cli, attack_meta, digits, tmp_path):
    """`model --out` writes the trigger it names (triggers.safetensors, bound to the model's sha256); `filter
    --method erase` undoes it on every input predicted as its target: stamped digits are flagged, clean ones
    almost never; the file is refused for another model, and without --method erase."""
    from backdoorlab import BadNets
    from backdoorscan.loading import to_uint8_images
    from backdoorscan.report.trigger_file import load_triggers

    _, out, _ = badnets_cli
    triggers = out / "triggers.safetensors"
    found = load_triggers(triggers, None, (28, 28), 10)
    assert found.describe() == [{"family": "universal", "target": attack_meta["target"], "source": None}]
    patch = BadNets(**{**{k: v for k, v in attack_meta.items() if k != "kind"}, "color": tuple(attack_meta["color"])})
    _, _, xt, yt = digits
    others = xt[1300:1600][yt[1300:1600] != attack_meta["target"]]
    np.savez(tmp_path / "screen.npz", x=to_uint8_images(torch.cat([xt[1000:1300], patch.apply(others)])))
    args = ["--input", str(tmp_path / "screen.npz"), "--clean", str(MNIST_TEST), "--device", "cpu", "--json"]
    runner = CliRunner()
    md = tmp_path / "screen.md"
    res = runner.invoke(
        app, ["filter", str(BADNETS), *args, "--method", "erase", "--triggers", str(triggers), "--markdown", str(md)]
    )
    assert res.exit_code == 1, res.output
    assert f"erasing the 1 patch trigger(s) the model scan named (target {attack_meta['target']})" in md.read_text()
    report = json.loads(res.stdout)
    (named,) = report["triggers"]  # with how far its region was grown (1 to 3 pixels, by the target's samples)
    assert report["method"] == "erase" and {k: named[k] for k in ("family", "target", "source")} == found.describe()[0]
    assert named["region_grow"] in (1, 2, 3)
    flags = np.array([i["flagged"] for i in report["items"]])
    assert flags[:300].mean() <= 0.05 and flags[300:].mean() >= 0.9, (flags[:300].mean(), flags[300:].mean())
    here = [*args, "--sandbox", "off"]  # refusals of the options, not of the file: no confined child needed
    other = runner.invoke(app, ["filter", str(CLEAN), *here, "--method", "erase", "--triggers", str(triggers)])
    assert other.exit_code == 2 and "another model" in other.output and len(other.output.strip().splitlines()) == 1
    alone = runner.invoke(app, ["filter", str(BADNETS), *here, "--triggers", str(triggers)])
    assert alone.exit_code == 2 and "--method erase" in alone.output


def test_adaptive_mask_cost_shrinks_the_target_to_the_patch(attack_meta):
    """The authors' L1 schedule (the default since 0.9.0) removes the diffuse mask a fixed weight leaves: the
    target's mask is the patch."""
    t, r, c, k = (attack_meta[key] for key in ("target", "row", "col", "size"))
    fixed = scan_model(
        BADNETS, MNIST_TEST, settings=ScanSettings(mask_cost="fixed", families="universal"), device="cpu"
    )
    scan = scan_model(BADNETS, MNIST_TEST, settings=ScanSettings(families="universal"), device="cpu")
    assert ScanSettings.mask_cost == "adaptive"
    assert scan.target_classes == [t] and scan.margin > 2
    target, mask = scan.classes[t], scan.masks[t]
    assert target.l1_norm < fixed.classes[t].l1_norm and target.l1_norm <= 2 * k * k and target.asr >= 0.9
    assert float(mask[:, r : r + k, c : c + k].sum() / mask.sum()) > 0.9  # fixed weight: about 0.6


def test_clean_model_is_not_flagged():
    """The claim at default size (make test-detection)."""
    scan = scan_model(CLEAN, MNIST_TEST, device="cpu")
    assert scan.verdict == "clean" and scan.target_classes == [] and scan.exit_code == 0
    assert all(c.anomaly_index < 2 or c.asr < 0.5 for c in scan.classes)
    assert scan.settings.covers == ("universal", "pairs", "warp")  # the default scan covers every family
    assert scan.families.findings == [] and len(scan.families.pairs.pairs) == 90
    assert scan.margin > 0 and set(scan.families.margins) == {"universal", "pairs", "warp"}


def test_every_family_runs_on_a_clean_model_at_reduced_size():
    """The plumbing at a fifth of the cost: every family measured (90 pairs, a warp per class), a clean verdict
    with a margin from each."""
    settings = ScanSettings(steps=60, samples=60, max_passes=2, pair_steps=30, pair_samples=6, warp_steps=20)
    scan = scan_model(CLEAN, MNIST_TEST, settings=settings, device="cpu")
    assert scan.verdict == "clean" and scan.exit_code == 0 and scan.covered == ["universal", "pairs", "warp"]
    measured = {s for s, _ in scan.families.pairs.pairs}  # the sources with 6 samples, to every other class
    assert scan.families.findings == [] and len(scan.families.pairs.pairs) == 9 * len(measured) >= 36
    text = dumps(scan.to_dict())
    assert "Infinity" not in text and "NaN" not in text  # standard JSON, whatever the margins
    report = json.loads(text)
    assert report["families"]["covered"] == ["universal", "pairs", "warp"] and not report["families"]["not_measured"]
    assert {"index", "objective_index", "spill", "cross_entropy"} <= set(report["families"]["pairs"]["pairs"][0])
    assert len(scan.families.warps.targets) == 10 and len(scan.families.warp_index) == 10
    assert scan.margin > 0 and set(scan.families.margins) == {"universal", "pairs", "warp"}


def test_same_seed_same_report():
    settings = ScanSettings(steps=20, samples=40, max_passes=1, seed=5, pair_steps=5, pair_samples=4, warp_steps=5)
    a = scan_model(BADNETS, MNIST_TEST, settings=settings, device="cpu").to_dict()
    b = scan_model(BADNETS, MNIST_TEST, settings=settings, device="cpu").to_dict()
    a.pop("timings"), b.pop("timings")
    assert a == b


def test_uaps_all_at_the_bound_leave_the_decision_to_the_refined_triggers():
    """A small L-inf radius stops every class's UAP at --delta: Alg. 1 told no class apart, so the classes are
    decided on the refined triggers alone (the refined L1's indices), the notes say why, and the margin is
    measured against the refined triggers' spread (against the UAPs' zero spread it was 2.5e11)."""
    from backdoorscan.usb.decide import anomaly_index

    settings = ScanSettings(
        steps=60, samples=30, max_passes=1, deepfool_iter=3, norm="linf", delta=0.2, families="universal", refine="all"
    )
    scan = scan_model(BADNETS, MNIST_TEST, settings=settings, device="cpu")
    assert np.allclose([c.uap_norm for c in scan.classes], 0.2, atol=1e-6)
    assert any("same size" in note for note in scan.evidence.notes)
    refined_only = anomaly_index([c.l1_norm for c in scan.classes], "log")
    assert np.allclose([c.anomaly_index for c in scan.classes], refined_only)
    assert scan.verdict != "inconclusive" and 0 < abs(scan.margin) < 100


def test_refinement_starts_from_the_uap(digits):
    x = digits[2][:4]
    v = torch.rand(2, 1, 28, 28) * 0.1
    stamped = stamp(x, v, torch.ones_like(v), "paper")
    assert torch.allclose(stamped, (x[None] + v[:, None]).clamp(0, 1))  # Alg. 2: first x' = x + v


def test_refinement_paper_form_runs_batched_over_classes(small_model, digits):
    x, y = digits[2][:32], digits[3][:32]
    targets = torch.arange(10)
    refined = refine(
        small_model,
        x,
        y,
        targets,
        torch.zeros(10, 1, 28, 28),
        torch.zeros(10, dtype=torch.bool),
        form="paper",
        steps=5,
        lr=0.1,
        batch=16,
        betas=(0.5, 0.9),
        w0=10.0,
        mask_cost="fixed",
        init_cost=1e-3,
    )
    assert refined.trigger.shape == (10, 1, 28, 28) and refined.l1.shape == (10,)
    assert float(refined.mask.min()) >= 0 and float(refined.mask.max()) <= 1


def test_neural_cleanse_baseline_finds_the_same_target(attack_meta):
    scan = scan_model(BADNETS, MNIST_TEST, settings=ScanSettings(method="nc", steps=300), device="cpu")
    assert scan.target_classes == [attack_meta["target"]]


def test_a_2x2_badnets_model_trained_here_is_flagged(digits):
    """Train a CNN with a random 2x2 BadNets patch (10 % poisoned) on real digits, then scan it."""
    from backdoorlab import make_attack, mnist_cnn, train_classifier

    x, y, xt, yt = digits
    attack = make_attack("badnets", (1, 28, 28), 10, np.random.default_rng(13), size=2)
    trained = train_classifier(mnist_cnn, x, y, xt, yt, attack=attack, seed=13, epochs=6)
    assert trained.accuracy > 0.9 and trained.asr > 0.9  # the attack worked
    scan = scan_model(trained.model, MNIST_TEST, settings=ScanSettings(families="universal"), device="cpu")
    assert scan.target_classes == [attack.target]


def test_progress_spans_all_class_groups():
    """With classes in groups, each phase reports one rising count to its end, so the bar's ETA means something."""
    seen: dict[str, list[tuple[int, int]]] = {}
    settings = ScanSettings(
        steps=20, samples=40, max_passes=1, class_group=4, pair_steps=5, pair_samples=3, warp_steps=5
    )
    scan_model(
        BADNETS,
        MNIST_TEST,
        settings=settings,
        device="cpu",
        progress=lambda phase, done, total: seen.setdefault(phase, []).append((done, total)),
    )
    assert set(seen) == {"uap", "refine", "pairs", "warp"}
    for calls in seen.values():
        done = [d for d, _ in calls]
        assert done == sorted(done) and len({t for _, t in calls}) == 1 and done[-1] == calls[-1][1]
    assert seen["refine"][-1][1] == 3 * 20  # three groups of at most 4 classes, 20 steps each
