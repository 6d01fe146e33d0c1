"""The staged scan: stage 1 ranks every class, stage 2 refines suspects and references; 43 real traffic-sign classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from backdoorlab.data import BUNDLED_GTSRB, bundled_gtsrb
from backdoorscan import ScanSettings, scan_model
from backdoorscan.cli import app
from backdoorscan.usb.decide import anomaly_index, weighted_median
from backdoorscan.usb.staging import choose_classes, select

from .conftest import BADNETS, MNIST_TEST

STEPS = 150  # refinement steps for the 43-class scans (the default is 500); staging keeps its defaults


def test_weighted_median_is_numpys_for_equal_weights_and_counts_repeats():
    rng = np.random.default_rng(0)
    for n in range(1, 9):
        values = rng.random(n)
        assert weighted_median(values, [3.7] * n) == np.median(values)
    # A weight of w is the value repeated w times.
    assert weighted_median([1, 2, 3, 10], [1, 1, 1, 5]) == np.median([1, 2, 3] + [10] * 5)
    assert weighted_median([1, 2, 3], [1, 1, 2]) == np.median([1, 2, 3, 3])


def test_references_form_a_stratified_sample_of_all_classes():
    order = list(range(43))  # the stage-1 ranking, most suspect first
    refined, roles, weights = select(order, suspects=6, references=10, seed=0)
    assert refined[:6] == order[:6] and roles == ["suspect"] * 6 + ["reference"] * 10
    refs = refined[6:]
    assert len(set(refs)) == 10 and min(refs) >= 6 and refs == sorted(refs)
    assert np.all(np.diff(refs) >= 3) and np.all(np.diff(refs) <= 4)  # evenly spaced over the 37 other ranks
    assert sum(weights) == pytest.approx(43)  # together they stand for every class
    # Weighted, the 16 refined classes estimate the index over all 43; unweighted, the over-sampled suspects
    # would pull the median down and halve the smallest class's index.
    sizes = np.linspace(1.0, 2.0, 43)
    full = anomaly_index(sizes, "log")[0]
    staged = anomaly_index(sizes[refined], "log", weights)[0]
    naive = anomaly_index(sizes[refined], "log")[0]
    assert staged == pytest.approx(full, rel=0.25) and abs(staged - full) < abs(naive - full) / 2


def test_staged_scan_of_a_10_class_model_equals_the_full_scan(attack_meta):
    """Staged with 2 suspects and 4 references (so stage 1 really chooses): same verdict and target, and each
    refined class's figures are the full scan's, since every class's Alg. 1 and Alg. 2 run on their own (up to
    floating point, whose differences between batch shapes grow over long refinements)."""
    base = {"steps": 40, "samples": 80, "max_passes": 1, "families": "universal"}
    full = scan_model(BADNETS, MNIST_TEST, settings=ScanSettings(refine="all", **base), device="cpu")
    staged = scan_model(BADNETS, MNIST_TEST, settings=ScanSettings(suspects=2, references=4, **base), device="cpu")
    assert full.staging.mode == "all" and staged.staging.mode == "staged"
    assert staged.verdict == full.verdict == "backdoor"
    assert staged.target_classes == full.target_classes == [attack_meta["target"]]
    assert staged.classes[0].cls == attack_meta["target"] and staged.classes[0].role == "suspect"
    by_class = {c.cls: c for c in full.classes}
    for c in staged.classes:
        assert c.uap_norm == pytest.approx(by_class[c.cls].uap_norm, rel=1e-3)  # DeepFool amplifies rounding
        assert c.l1_norm == pytest.approx(by_class[c.cls].l1_norm, rel=0.05)
    # With the defaults (6 + 10 >= 10 classes) every class is refined, without a stage 1: the paper's scan.
    assert choose_classes(None, None, None, 10, ScanSettings(), group=10).mode == "all"


@pytest.fixture(scope="module")
def gtsrb_model(tmp_path_factory):
    """A 43-class CNN trained here on real traffic signs (14 per class) with a 4x4 BadNets patch. (Clean 43-class
    models are the GTSRB zoo's: docs/results.md.)"""
    from backdoorlab import make_attack, save_model, train_classifier
    from backdoorlab.archs import cifar_small_bn

    x, y, xt, yt = bundled_gtsrb()
    folder = tmp_path_factory.mktemp("gtsrb")
    attack = make_attack("badnets", (3, 32, 32), 43, np.random.default_rng(3), size=4)
    kw = {"seed": 3, "epochs": 40, "lr": 0.003, "optimiser": "adam", "schedule": "cosine"}
    backdoored = train_classifier(lambda: cifar_small_bn(43), x, y, xt, yt, attack=attack, **kw)
    assert backdoored.asr > 0.9 and backdoored.accuracy > 0.5  # trained, and the attack took
    return save_model(backdoored.model, folder / "backdoored.pt2", "pt2", xt[:1]), attack.target


def _scan(path) -> tuple[int, dict]:
    result = CliRunner().invoke(
        app,
        [
            "model",
            str(path),
            "--data",
            str(BUNDLED_GTSRB["test"]),
            "--device",
            "cpu",
            "--steps",
            str(STEPS),
            "--families",
            "universal",
            "--json",
        ],
    )
    return result.exit_code, json.loads(result.stdout)


def test_43_class_backdoor_is_flagged_by_the_default_staged_scan(gtsrb_model):
    path, target = gtsrb_model
    code, report = _scan(path)
    assert code == 1 and report["verdict"] == "backdoor" and report["target_classes"] == [target]
    staging = report["staging"]
    assert staging["mode"] == "staged" and len(staging["refined"]) == 16
    assert len(staging["stage1"]["order"]) == 43 and staging["stage1"]["order"][0] == target
    assert [c["class"] for c in report["classes"]] == staging["refined"]
    assert report["threshold"] == pytest.approx(2.556, abs=1e-3)  # raised for 43 classes (decide.class_threshold)
    flagged = [c for c in report["classes"] if c["target"]]
    assert flagged[0]["flagged"] and flagged[0]["role"] == "suspect" and flagged[0]["stage1_rank"] == 0
    assert flagged[0]["name"]  # the sign's name, from the data file's class names
