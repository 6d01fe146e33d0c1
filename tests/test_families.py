"""Backdoor families beyond one universal trigger (issue 25): warps, source-specific pairs and all-to-all mappings,
on bundled models trained with those attacks (scripts/make_family_models.py), and the rules on hand-made figures.
"""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from backdoorscan.core.settings import ScanSettings
from backdoorscan.usb.decide import class_threshold, flip_distance
from backdoorscan.usb.families import PAIR_ASR, FamilyScan, decide_warps, scan_pairs, scan_warps
from backdoorscan.usb.pair_rule import (
    PAIR_CE_MAX,
    PAIR_COMPACT_MAX_RATIO,
    PAIR_COMPACT_MIN,
    PAIR_COMPACT_SPILL_MAX,
    PAIR_MAX_RATIO,
    PAIR_SPILL_MAX,
    WINDOW_CE_MAX,
    confidence_distance,
    decide_pairs,
    index_pairs,
    spill_distance,
)
from backdoorscan.usb.pairs import (
    PAIR_BUDGET,
    PairTriggers,
    candidate_pairs,
    densest_window,
    pair_compactness,
    pair_support,
    window_test,
)
from backdoorscan.usb.warp import apply_warp

from .conftest import MNIST_TEST, MODELS

WANET = MODELS / "mnist_wanet.pt2"  # WaNet, target 0 (models/zoo.json)
ALL_TO_ALL = MODELS / "mnist_all_to_all.pt2"  # a 3x3 patch maps y -> y + 1
SOURCE_3TO8 = MODELS / "mnist_source_3to8.pt2"  # a 3x3 corner patch sends 3 to 8, inert elsewhere
SOURCE_2TO6 = MODELS / "mnist_source_2to6.pt2"  # a 4x4 patch sends 2 to 6, inert elsewhere


def _ready(path):
    from backdoorscan.loading.setup import prepare
    from backdoorscan.loading.source import ModelSource

    return prepare(ModelSource.of(path), MNIST_TEST, samples=300, seed=0)


# The rules, on hand-made figures (fast)


def _matrix_pairs(sizes: dict[tuple[int, int], float], k: int = 10, base: float = 40.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    pairs = [(s, t) for s in range(k) for t in range(k) if s != t]
    l1 = np.array([sizes.get(p, base * float(np.exp(rng.normal(0, 0.25)))) for p in pairs])
    return pairs, l1


def test_a_pair_whose_region_makes_its_target_does_not_flag():
    """Reliance (0.12.0): a small patch whose region, blanked with its source's look, moves most of the target's own
    samples off the target is the target's own feature (a robust model's 9 -> 4), not a trigger; unmeasured (NaN)
    is no constraint, and the distance counts the criterion within one unit, as spill's does."""
    from backdoorscan.usb.pair_rule import PAIR_RELIANCE_MAX, reliance_distance

    pairs, l1 = _matrix_pairs({(3, 8): 9.0})
    where = {p: i for i, p in enumerate(pairs)}
    ce, asr = np.full(len(pairs), 0.05), np.ones(len(pairs))
    reliance = np.full(len(pairs), np.nan)
    settings = ScanSettings()
    assert where[(3, 8)] in decide_pairs(pairs, l1, ce, asr, settings=settings, universal_targets=[]).flagged
    reliance[where[(3, 8)]] = 0.1
    low = decide_pairs(pairs, l1, ce, asr, settings=settings, universal_targets=[], reliance=reliance)
    assert where[(3, 8)] in low.flagged
    reliance[where[(3, 8)]] = 0.85
    high = decide_pairs(pairs, l1, ce, asr, settings=settings, universal_targets=[], reliance=reliance)
    assert where[(3, 8)] not in high.flagged and 0 < high.distance[where[(3, 8)]] <= 1
    assert reliance_distance(np.array([PAIR_RELIANCE_MAX]))[0] == 0
    assert np.isneginf(reliance_distance(np.array([np.nan]))[0])


def test_a_planted_pair_stands_out_and_a_natural_neighbour_does_not():
    pairs, l1 = _matrix_pairs({(3, 8): 9.0, (4, 9): 12.0, (9, 4): 14.0})
    index, ratio, _ = index_pairs(pairs, l1, np.ones(len(pairs), bool))
    where = {p: i for i, p in enumerate(pairs)}
    assert index[where[(3, 8)]] > 4 and ratio[where[(3, 8)]] < 0.35
    threshold = class_threshold(2.0, len(pairs), 10)  # 2.8 for 90 pairs
    assert index[where[(4, 9)]] < threshold and index[where[(9, 4)]] < threshold  # close both ways: neighbours


def test_a_source_that_is_easy_to_move_anywhere_is_not_a_backdoor():
    pairs, l1 = _matrix_pairs({(1, t): 15.0 for t in range(10) if t != 1})
    index, _, _ = index_pairs(pairs, l1, np.ones(len(pairs), bool))
    assert max(index[i] for i, (s, _) in enumerate(pairs) if s == 1) < 2.8


def test_pairs_whose_patch_does_not_work_are_never_flagged():
    pairs, l1 = _matrix_pairs({(3, 8): 1.0})
    works = np.ones(len(pairs), bool)
    works[pairs.index((3, 8))] = False
    index, _, _ = index_pairs(pairs, l1, works)
    assert index[pairs.index((3, 8))] == -np.inf


def test_the_clean_margin_counts_the_size_guard():
    # a class at index 4.18 (far past the threshold 2) held back only by the size guard (ratio 0.505 > 0.5):
    # it is a hair from flipping, not 2 units away
    index, ratio, asr = np.array([4.18, 0.1, -0.2]), np.array([0.505, 1.0, 1.1]), np.ones(3)
    distance = flip_distance(index, ratio, asr, threshold=2.0, asr_min=0.5, max_ratio=0.5, sigma=0.4)
    assert 0 < distance[0] < 0.05
    assert np.isclose(distance[1], 1.9)
    assert np.isinf(
        flip_distance(index, ratio, np.zeros(3), threshold=2.0, asr_min=0.5, max_ratio=0.5, sigma=0.4)
    ).all()


def test_the_pairs_decision_names_a_planted_pair_and_leaves_a_universal_target_to_usb():
    """decide_pairs on hand-made figures (the scan's own decision; benchmarks re-decide stored tables with it)."""
    pairs, l1 = _matrix_pairs({(3, 8): 6.0, (5, 2): 6.0})
    works = np.ones(len(pairs))
    ce = np.full(len(pairs), 0.05)
    settings = ScanSettings()
    decision = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[])
    assert {pairs[i] for i in decision.flagged} == {(3, 8), (5, 2)} and decision.margin > 0
    decision = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[2])
    assert {pairs[i] for i in decision.flagged} == {(3, 8)}  # 5 -> 2 is USB's finding (target 2), not a pair's
    clean = decide_pairs(pairs, *_matrix_pairs({})[1:], ce, works, settings=settings, universal_targets=[])
    assert clean.flagged == [] and 0 < clean.margin < np.inf


def test_a_pair_whose_patch_moves_other_classes_to_its_target_does_not_flag_on_its_own():
    """A source-specific trigger is inert elsewhere; a natural feature of the target (a clean model's 8 -> 2 at
    index 4.4, spill 0.42) moves other classes too: held back by spill, and counted in the clean margin."""
    pairs, l1 = _matrix_pairs({(3, 8): 6.0, (5, 2): 6.0})
    works, ce, settings = np.ones(len(pairs)), np.full(len(pairs), 0.05), ScanSettings()
    spill = np.full(len(pairs), np.nan)  # not measured: no constraint
    spill[pairs.index((3, 8))], spill[pairs.index((5, 2))] = 0.03, 0.42
    decision = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[], spill=spill)
    assert {pairs[i] for i in decision.flagged} == {(3, 8)}
    assert 0 < decision.distance[pairs.index((5, 2))] <= 1  # the spill criterion's distance, at most one unit
    assert 0 < decision.margin <= 1  # (3, 8)'s own spill is within a unit of the limit
    spill[pairs.index((3, 8))] = 0.5
    clean = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[], spill=spill)
    assert clean.flagged == [] and 0 < clean.margin <= (0.42 - PAIR_SPILL_MAX) / (1 - PAIR_SPILL_MAX) + 1e-9
    assert list(spill_distance(np.array([np.nan, 0.0, PAIR_SPILL_MAX, 1.0]))) == [-np.inf, -1.0, 0.0, 1.0]


def test_a_patch_that_moves_exactly_nine_tenths_of_its_source_works():
    """27 of 30 is PAIR_ASR: counted exactly, not as float32's 0.8999999 (which lost such pairs, and made stored
    tables, rounded, decide differently from the scan)."""
    from backdoorscan.usb.pairs import pair_success

    class Votes(torch.nn.Module):  # class 1 for the first 27 of 30 samples, class 0 for the rest
        def forward(self, x):
            first = (x.flatten(1)[:, 0] < 0.89).float()
            return torch.stack([1 - first, first], 1)

    x = (torch.arange(30.0) / 30).view(30, 1, 1, 1)  # pixel values in [0, 1]: 27 of them under 0.89
    asr, _ = pair_success(Votes(), x, torch.zeros(30, dtype=torch.long), [(0, 1)], torch.zeros(1, 1, 1, 1), x[:1])
    assert asr[0] == 27 / 30 and asr[0] >= PAIR_ASR


def test_candidate_pairs_are_bounded_for_many_classes():
    y = torch.arange(43).repeat(5)
    logits = torch.randn(len(y), 43)
    pairs = candidate_pairs(43, y, lambda: logits)
    assert len(pairs) == PAIR_BUDGET and len(set(pairs)) == PAIR_BUDGET
    assert len({s for s, _ in pairs}) == 43  # every source's nearest target before any source's second
    never = lambda: pytest.fail("up to 10 classes every pair is measured: no logits needed")  # noqa: E731
    assert len(candidate_pairs(10, torch.arange(10).repeat(3), never)) == 90


def test_a_zero_warp_is_the_identity():
    x = torch.rand(4, 1, 28, 28)
    out = apply_warp(x, torch.zeros(2, 2, 4, 4))
    assert out.shape == (2, 4, 1, 28, 28)
    assert torch.allclose(out[0], x, atol=1e-5) and torch.allclose(out[1], x, atol=1e-5)


# The families on models trained with those attacks (slow)


@pytest.mark.slow
def test_warp_family_finds_the_wanet_target():
    ready = _ready(WANET)
    result = FamilyScan()
    scan_warps(
        ready.model,
        ready.samples.x,
        ready.predictions,
        list(range(10)),
        10,
        settings=ScanSettings(),
        group=10,
        progress=None,
        result=result,
    )
    assert [(f.family, f.target) for f in result.findings] == [("warp", 0)]
    i = result.warps.targets.index(0)
    assert result.warps.asr[i] >= 0.8 and result.warps.displacement[i] < 0.5 * np.median(result.warps.displacement)


@functools.cache  # a scan's pairs stage, shared by the tests that read it
def _pairs_of(path) -> FamilyScan:
    ready = _ready(path)
    result = FamilyScan()
    scan_pairs(
        ready.model,
        ready.samples.x,
        ready.predictions,
        10,
        settings=ScanSettings(),
        universal_targets=[],
        group=10,
        progress=None,
        result=result,
    )
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    "path,family,expected",
    [
        (SOURCE_2TO6, "source-specific", {(2, 6)}),
        (ALL_TO_ALL, "all-to-all", {(y, (y + 1) % 10) for y in range(10)}),
    ],
)
def test_pairs_family_names_the_pair_or_the_mapping(path, family, expected):
    result = _pairs_of(path)
    found = {(f.source, f.target) for f in result.findings}
    assert found and found <= expected, found
    assert {f.family for f in result.findings} == {family}
    if family == "all-to-all":
        assert len(found) >= 3
    # the shared patch (alltoall.py): the whole mapping from one inversion on the all-to-all model, nothing on the
    # source-specific one, whose patch moves one class only
    shared = result.shared_decision
    assert shared.flagged == (family == "all-to-all"), result.to_dict()["shared_patch"]
    if family == "all-to-all":
        assert set(shared.mapped) <= expected and len(shared.mapped) >= 8 and shared.ratio < 0.7
    # spill (a figure no decision uses) is measured for the pairs the report names, and only those
    table = result.to_dict()["pairs"]["pairs"]
    measured = {(p["source"], p["target"]) for p in table if p["spill"] is not None}
    assert found <= measured and len(measured) <= len(found) + 10


def test_a_named_pair_screens_its_source_by_erasure(tmp_path, digits):
    """The pair the scan names goes into the triggers file (`ModelScan.found_triggers`), and `filter --method
    erase` catches the 2s stamped with the planted patch, leaving clean digits alone."""
    from backdoorlab import BadNets
    from backdoorscan import FilterSettings, filter_dataset
    from backdoorscan.loading import to_uint8_images
    from backdoorscan.report.trigger_file import save_triggers
    from backdoorscan.usb.result import ModelScan

    families = _pairs_of(SOURCE_2TO6)
    scan = SimpleNamespace(
        verdict="backdoor",
        classes=[],
        families=families,
        form="blend",
        input=SimpleNamespace(height=28, width=28),
        model={"sha256": None},
    )
    found = ModelScan.found_triggers(scan)
    assert found is not None and {"family": "source-specific", "target": 6, "source": 2} in found.describe()
    # its region carries nothing of the 6s (`measure_reliance`): it is no feature of the target
    assert families.pairs is not None and families.pairs.reliance is not None
    assert families.pairs.reliance[families.pairs.pairs.index((2, 6))] <= 0.35
    save_triggers(tmp_path / "triggers.safetensors", found)
    attack = json.loads((MODELS / "zoo.json").read_text())["mnist_source_2to6"]["attack"]["patch"]
    patch = BadNets(target=0, size=attack["size"], row=attack["row"], col=attack["col"], color=tuple(attack["color"]))
    _, _, xt, yt = digits
    twos = xt[1000:2000][yt[1000:2000] == 2]
    np.savez(tmp_path / "screen.npz", x=to_uint8_images(torch.cat([xt[1000:1300], patch.apply(twos)])))
    result = filter_dataset(
        SOURCE_2TO6,
        MNIST_TEST,
        tmp_path / "screen.npz",
        settings=FilterSettings(method="erase"),
        triggers=tmp_path / "triggers.safetensors",
        device="cpu",
    )
    flags = np.array([i.flagged for i in result.items])
    moved = np.array([i.prediction == 6 for i in result.items])[300:]
    assert moved.mean() >= 0.8  # the backdoor works on these 2s
    assert flags[:300].mean() <= 0.05 and flags[300:][moved].mean() >= 0.9, (flags[:300].mean(), flags[300:].mean())


def test_a_3x3_corner_source_specific_patch_is_found_by_the_staged_pairs_stage():
    """The bundled 3 -> 8 model's 3x3 corner patch is about as small as the natural neighbour pairs (4 -> 9): 0.12's
    stage (every pair 100 steps, then the recheck) left it under the threshold, and this was a strict known-limit
    test. The staged stage (0.13.0) measures its source's other pairs as finished references and names it, alone."""
    found = _pairs_of(SOURCE_3TO8)
    assert [(f.family, f.source, f.target) for f in found.findings] == [("source-specific", 3, 8)]
    assert found.pairs is not None and found.pairs.stopped is not None
    went_on = [s for (s, _), stop in zip(found.pairs.pairs, found.pairs.stopped, strict=True) if not stop]
    assert all(went_on.count(s) >= 3 for s in range(10))  # at least three of each source's pairs (the recheck's too)
    assert len(went_on) < 90


def test_a_shared_patch_flags_a_mapping_only_when_small_broad_and_working():
    """The shared-patch test (alltoall.py) on the figures of the families zoo: an all-to-all model's patch (0.5x
    the median pair, ten sources to ten targets) flags; a clean model's (2.4x, collapsing onto 8 and 2) does not,
    nor a small patch that maps too few sources, nor one that moves too few samples; the distance counts each."""
    from backdoorscan.usb.alltoall import decide_shared

    rng = np.random.default_rng(0)
    pair_l1 = np.exp(rng.normal(np.log(24), 0.3, 90))
    shift = {s: (s + 3) % 10 for s in range(10)}
    full = {s: 0.92 for s in range(10)}
    hit = decide_shared(11.6, 0.97, shift, full, sources=10, pair_l1=pair_l1)
    assert hit.flagged and sorted(hit.mapped) == sorted(shift.items()) and 0.4 < hit.ratio < 0.6
    assert hit.distance == pytest.approx(-0.85)  # the moved share's room (0.97 of 0.8-1.0) is the nearest limit
    collapse = {s: (8 if s % 2 else 2) for s in range(10)}
    clean = decide_shared(70.3, 0.93, collapse, full, sources=10, pair_l1=pair_l1)
    assert not clean.flagged and len(clean.mapped) == 2 and clean.distance >= 0.6
    narrow = decide_shared(
        11.6, 0.97, shift, {s: 0.92 if s < 4 else 0.3 for s in range(10)}, sources=10, pair_l1=pair_l1
    )
    assert not narrow.flagged and len(narrow.mapped) == 4 and narrow.needed == 5 and narrow.distance == 0.2
    weak = decide_shared(11.6, 0.7, shift, full, sources=10, pair_l1=pair_l1)
    assert not weak.flagged and 0 < weak.distance < 0.2  # the moved share alone holds it back: a small margin
    big = decide_shared(40.0, 0.97, shift, full, sources=10, pair_l1=pair_l1)
    assert not big.flagged and big.distance == pytest.approx(big.threshold - big.index)
    assert not decide_shared(11.6, 0.97, shift, full, sources=10, pair_l1=pair_l1[:3]).flagged  # no reference


def test_pairs_of_sources_with_too_few_samples_are_not_measured_and_the_scan_says_so():
    """43 classes at 300 samples leave about 7 a class: a patch fitted on 12 would be fitted and judged on the same
    few images repeated, so those sources' pairs are not measured, and the report's notes say so; with too few
    sources left, the pairs family is not measured at all and the verdict does not claim to cover it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    x = torch.rand(25, 1, 4, 4)
    y = torch.tensor([0] * 6 + [1] * 6 + [2] * 6 + [3] * 5 + [4] * 2)
    result = FamilyScan()
    settings = ScanSettings(pair_steps=2, pair_samples=6)
    scan_pairs(model, x, y, 5, settings=settings, universal_targets=[], group=4, progress=None, result=result)
    assert len(result.notes) == 1 and result.notes[0].startswith("2 of 5 source classes had fewer than 6")
    assert "--samples 30" in result.notes[0] and not result.not_measured
    assert result.pairs is not None and {s for s, _ in result.pairs.pairs} == {0, 1, 2}  # 3 sources x 4 targets
    few = FamilyScan()
    short = ScanSettings(pair_steps=2, pair_samples=7)
    scan_pairs(model, x, y, 5, settings=short, universal_targets=[], group=4, progress=None, result=few)
    assert few.pairs is None and "pairs" in few.not_measured and few.notes == [few.not_measured["pairs"]]
    assert few.to_dict()["not_measured"] == few.not_measured


def test_a_small_pair_that_leaves_its_target_in_doubt_does_not_flag_on_its_own():
    """A robust model's natural neighbour (an adversarially trained 9 -> 4) can be as few pixels as a planted
    patch, but leaves the target uncertain (cross-entropy 0.21-0.28, planted 0.01-0.09): held back by
    PAIR_CE_MAX, and counted in the clean margin within one unit."""
    pairs, l1 = _matrix_pairs({(3, 8): 6.0, (9, 4): 6.0})
    works, settings = np.ones(len(pairs)), ScanSettings()
    ce = np.full(len(pairs), 0.05)
    ce[pairs.index((9, 4))] = 0.25
    decision = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[])
    assert {pairs[i] for i in decision.flagged} == {(3, 8)}
    assert 0 < decision.distance[pairs.index((9, 4))] <= 1
    assert decision.index[pairs.index((9, 4))] > decision.threshold  # the size alone would have flagged it
    ce[pairs.index((3, 8))] = 0.3
    clean = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[])
    assert clean.flagged == [] and 0 < clean.margin <= 1
    assert list(confidence_distance(np.array([0.0, PAIR_CE_MAX, 2 * PAIR_CE_MAX]))) == [-1.0, 0.0, 0.5]


def test_compactness_is_the_share_of_the_mask_in_its_best_small_window():
    """A 4x4 patch is wholly compact; a stroke across the image has a small share in any 5x5 window."""
    patch, stroke, empty = torch.zeros(3, 1, 28, 28)
    patch[0, 10:14, 3:7] = 0.9
    stroke[0, 4:24, 14] = 1.0
    got = pair_compactness(torch.stack([patch, stroke]))
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(5 / 20)
    assert pair_compactness(empty[None]) == pytest.approx(0.0)


def test_a_compact_pair_flags_under_the_looser_guard_and_a_scattered_one_of_the_same_size_does_not():
    """A planted 4x4 patch at full shade can be half its source's median pair: past the threshold but over the
    size guard. Compact, it flags under PAIR_COMPACT_MAX_RATIO; the same sizes drawn as a stroke do not."""
    pairs, l1 = _matrix_pairs({(3, 8): 40.0 * 0.5}, base=40.0, seed=1)
    works, settings, ce = np.ones(len(pairs)), ScanSettings(), np.full(len(pairs), 0.05)
    i = pairs.index((3, 8))
    plain = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[])
    assert plain.index[i] > plain.threshold and plain.flagged == []  # the size guard holds it back
    compact = np.full(len(pairs), 0.4)
    compact[i] = PAIR_COMPACT_MIN + 0.1
    decision = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[], compact=compact)
    assert decision.flagged == [i] and decision.measure[i] == "compact"
    compact[i] = PAIR_COMPACT_MIN - 0.1
    held = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[], compact=compact)
    assert held.flagged == [] and 0 < held.distance[i] <= 1  # counted in the margin, within one unit
    assert PAIR_MAX_RATIO < 0.5 < PAIR_COMPACT_MAX_RATIO


def test_a_compact_patch_may_spill_more_and_a_scattered_one_may_not():
    """A planted patch that leaks to other classes (CIFAR-10's small CNNs): over PAIR_SPILL_MAX but under
    PAIR_COMPACT_SPILL_MAX, it flags when compact; scattered, or compact but spilling past the looser limit, it is
    held, within one unit of flipping, the compactness counted in the distance."""
    pairs, l1 = _matrix_pairs({(3, 8): 40.0 * 0.3}, base=40.0, seed=1)
    works, settings, ce = np.ones(len(pairs)), ScanSettings(), np.full(len(pairs), 0.05)
    i = pairs.index((3, 8))
    compact, spill = np.full(len(pairs), 0.4), np.full(len(pairs), np.nan)
    spill[i] = (PAIR_SPILL_MAX + PAIR_COMPACT_SPILL_MAX) / 2

    def decide():
        return decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[], compact=compact, spill=spill)

    scattered = decide()
    assert scattered.flagged == [] and 0 < scattered.distance[i] <= 1  # the spill holds a scattered patch
    compact[i] = PAIR_COMPACT_MIN + 0.1
    assert decide().flagged == [i]
    spill[i] = PAIR_COMPACT_SPILL_MAX + 0.05
    held = decide()
    assert held.flagged == [] and 0 < held.distance[i] <= 1
    assert list(spill_distance(np.array([0.45, 0.45]), np.array([-0.5, 0.2]))) == pytest.approx(
        [(0.45 - PAIR_COMPACT_SPILL_MAX) / PAIR_COMPACT_SPILL_MAX, (0.45 - PAIR_SPILL_MAX) / (1 - PAIR_SPILL_MAX)]
    )


def test_a_scattered_pair_flags_by_the_compact_route_only_when_its_patch_works_from_one_window():
    """A pair past the threshold, over the tight size guard and not compact by its mask: the window test decides.
    Confined to one window, the patch still moves its source with certainty (a planted trigger whose inversion
    spread faint mass): it flags; it moves it in doubt or not at all (a stroke the window cuts): held, within one
    unit of flipping; not tested: held as before."""
    pairs, l1 = _matrix_pairs({(3, 8): 40.0 * 0.5}, base=40.0, seed=1)
    works, settings, ce = np.ones(len(pairs)), ScanSettings(), np.full(len(pairs), 0.05)
    i = pairs.index((3, 8))
    compact = np.full(len(pairs), 0.4)
    window_asr, window_ce = np.full(len(pairs), np.nan), np.full(len(pairs), np.nan)

    def decide():
        return decide_pairs(
            pairs,
            l1,
            ce,
            works,
            settings=settings,
            universal_targets=[],
            compact=compact,
            window_asr=window_asr,
            window_ce=window_ce,
        )

    assert decide().flagged == []
    window_asr[i], window_ce[i] = 1.0, WINDOW_CE_MAX / 2
    flagged = decide()
    assert flagged.flagged == [i] and flagged.measure[i] == "compact"
    for asr, cross_entropy in ((1.0, 2 * WINDOW_CE_MAX), (PAIR_ASR - 0.2, 0.01)):
        window_asr[i], window_ce[i] = asr, cross_entropy
        held = decide()
        assert held.flagged == [] and 0 < held.distance[i] <= 1


def test_a_window_tested_pair_reports_the_tests_figures_and_an_untested_one_none():
    nan = float("nan")
    found = PairTriggers(
        pairs=[(0, 1), (1, 0)],
        mask=torch.zeros(2, 1, 4, 4),
        pattern=torch.zeros(2, 1, 4, 4),
        l1=np.ones(2),
        asr=np.ones(2),
        spill=np.full(2, nan),
        ce=np.zeros(2),
        window_asr=np.array([1.0, nan]),
        window_ce=np.array([0.05, nan]),
        window_l1=np.array([5.0, nan]),
    )
    rows = FamilyScan(pairs=found, pair_index=np.array([3.0, 1.0]), pair_threshold=2.8).to_dict()["pairs"]["pairs"]
    assert (rows[0]["window_asr"], rows[0]["window_ce"], rows[0]["window_l1"]) == (1.0, 0.05, 5.0)
    assert not any(key.startswith("window") for key in rows[1])


class _TwoCorners(torch.nn.Module):
    """Class 1 when the 2x2 top-left corner is bright (`far` False) or both it and the bottom-right one are (True)."""

    def __init__(self, far: bool) -> None:
        super().__init__()
        self.far = far

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x[:, 0, :2, :2].flatten(1).mean(1)
        if self.far:
            score = torch.minimum(score, x[:, 0, -2:, -2:].flatten(1).mean(1))
        return torch.stack([torch.zeros_like(score), 20 * score - 10], 1)


def test_the_window_test_keeps_a_patch_at_one_place_and_cuts_one_spread_over_two():
    """Both patches are bright on the top-left corner with faint mass over the image; the first model needs that
    corner only, the second also the far corner. Confined to the mask's densest window (5 px at 28), the first
    patch still moves every sample with certainty, the second none. The window sits on the densest square."""
    x, y = torch.zeros(24, 1, 28, 28), torch.zeros(24, dtype=torch.long)
    mask = torch.full((1, 1, 28, 28), 0.02)
    mask[..., :2, :2] = 1.0
    mask[..., -2:, -2:] = 0.9
    window = densest_window(mask)
    assert window.sum() == 25 and window[0, 0, 0, 0] == 1 and window[0, 0, -1, -1] == 0
    for far, moves in ((False, True), (True, False)):
        found = PairTriggers(
            pairs=[(0, 1)],
            mask=mask.clone(),
            pattern=torch.ones(1, 1, 28, 28),
            l1=mask.flatten(1).sum(1).numpy(),
            asr=np.ones(1),
            spill=np.full(1, np.nan),
            ce=np.zeros(1),
        )
        window_test(_TwoCorners(far), x, y, found, [0], steps=20, lr=0.1, per_source=12, cost=0.01)
        assert found.window_asr is not None and found.window_ce is not None
        assert bool(found.window_asr[0] == 1.0 and found.window_ce[0] < WINDOW_CE_MAX) is moves
        if not moves:
            assert found.window_asr[0] == 0.0


class _CornerDetector(torch.nn.Module):
    """Class 1 when at least two pixels of the 2x2 top-left corner are bright, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, 0, :2, :2].flatten(1).sum(1)
        return torch.stack([torch.zeros_like(corner), 10 * corner - 15], 1)


def test_the_support_counts_the_pixels_a_patch_needs_not_its_faint_rest():
    """A patch whose mask is bright on the 2x2 corner and faint (0.05) on the other 60 pixels: L1 7, but two of
    its pixels move every sample. A patch that does not work has no support."""
    x, y = torch.zeros(10, 1, 8, 8), torch.zeros(10, dtype=torch.long)
    mask = torch.full((2, 1, 8, 8), 0.05)
    mask[0, 0, :2, :2] = 1.0
    mask[1, 0, :2, :2] = 0.1  # too faint to move anything
    pattern = torch.ones(2, 1, 8, 8)
    support = pair_support(
        _CornerDetector(),
        x,
        y,
        [(0, 1), (0, 1)],
        mask,
        pattern,
        works=np.array([True, False]),
        l1=mask.flatten(1).sum(1).numpy(),
        batch=8,  # fewer than one pair's samples: each pair is its own forward pass
    )
    assert support[0] == 2 and np.isinf(support[1])


def test_a_pair_that_needs_few_pixels_flags_by_its_support_within_its_own_guard():
    """With --pair-support-ratio 0.3: a planted patch whose L1 is spread thin (not an outlier in its row) but which
    needs 5 pixels where its source's other pairs need about 20 flags by the support; at 0.35 of the median support
    (over that guard) it does not, and its distance counts the guard. Off (the default) the support is not read."""
    pairs, l1 = _matrix_pairs({})
    _, support = _matrix_pairs({(2, 5): 5.0}, base=20.0, seed=1)
    works, settings = np.ones(len(pairs)), ScanSettings(pair_support_ratio=0.3)
    off = decide_pairs(
        pairs, l1, np.full(len(pairs), 0.05), works, settings=ScanSettings(), universal_targets=[], support=support
    )
    assert off.flagged == [] and off.support_index is None  # the default does not decide on the support
    ce = np.full(len(pairs), 0.05)
    decision = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[], support=support)
    i = pairs.index((2, 5))
    assert [pairs[j] for j in decision.flagged] == [(2, 5)] and decision.measure[i] == "support"
    assert decision.index[i] < decision.threshold < decision.support_index[i]  # its L1 alone would miss it
    assert decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[]).flagged == []  # unmeasured
    median = float(np.median([v for p, v in zip(pairs, support, strict=True) if p[0] == 2 and p != (2, 5)]))
    support[i] = 0.35 * median
    held = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[], support=support)
    assert held.flagged == [] and 0 < held.distance[i] < 1


def test_a_certain_patch_from_a_source_whose_pairs_are_all_small_flags_by_the_objective():
    """A thin source (MNIST's 1) turns into many classes with small patches, so a planted pair's L1 is not an
    outlier in its row; its inversion is certain where its neighbours' are not, which the objective (cross-entropy
    plus 0.01 x L1) measures. Either measure may flag a pair on its own."""
    pairs, l1 = _matrix_pairs({**{(1, t): 15.0 for t in range(10) if t != 1}, (1, 7): 8.0})
    works, settings = np.ones(len(pairs)), ScanSettings()
    ce = np.full(len(pairs), 0.1)
    ce[pairs.index((1, 7))] = 0.002
    decision = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[])
    i = pairs.index((1, 7))
    assert {pairs[j] for j in decision.flagged} == {(1, 7)} and decision.measure[i] == "objective"
    assert decision.index[i] < decision.threshold < decision.objective_index[i]  # L1 alone would miss it


def test_a_pairs_patch_does_not_depend_on_how_many_pairs_share_its_batch():
    """The group size follows the memory at hand (a GPU takes more pairs a batch than a laptop): each pair starts
    from its own seeded pattern, so the same seed gives the same patch whatever the grouping."""
    from backdoorscan.usb.pairs import invert_pairs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    pairs = [(0, 1), (1, 2), (2, 0)]
    run = dict(steps=5, lr=0.1, per_source=4, cost=0.01, batch=12, seed=7)
    whole, one_by_one = invert_pairs(net, x, y, pairs, group=3, **run), invert_pairs(net, x, y, pairs, group=1, **run)
    last = invert_pairs(net, x, y, pairs[2:], group=1, **run)
    assert torch.allclose(whole.pattern, one_by_one.pattern, atol=1e-5)
    assert torch.allclose(whole.mask[2], last.mask[0], atol=1e-5)
    other = invert_pairs(net, x, y, pairs, group=3, **{**run, "seed": 8})
    assert not torch.allclose(whole.pattern, other.pattern, atol=1e-3)


def test_a_staged_pair_inversion_goes_on_exactly_where_the_whole_one_would_have_been():
    """Staging stops pairs, not the arithmetic: a pair that goes on after the first stage carries its optimiser's
    state and ends on the patch the unstaged inversion gives it; with every pair going on, nothing differs."""
    from backdoorscan.usb.pairs import invert_pairs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x, y = torch.rand(18, 1, 8, 8), torch.arange(18) % 3
    pairs = [(s, t) for s in range(3) for t in range(3) if s != t]
    run = dict(steps=8, lr=0.1, per_source=4, cost=0.01, batch=12, seed=7)
    whole = invert_pairs(net, x, y, pairs, group=6, **run)
    every = invert_pairs(net, x, y, pairs, group=4, first_steps=3, go_on=2, **run)  # both pairs of each source
    assert every.stopped is not None and not every.stopped.any()
    assert torch.allclose(whole.mask, every.mask, atol=1e-5) and torch.allclose(whole.pattern, every.pattern, atol=1e-5)
    one = invert_pairs(net, x, y, pairs, group=6, first_steps=3, go_on=1, **run)
    assert one.stopped is not None and one.stopped.sum() == 3  # one pair of each of the 3 sources stopped
    assert sorted(s for (s, _), stop in zip(pairs, one.stopped, strict=True) if not stop) == [0, 1, 2]
    went = ~one.stopped
    assert torch.allclose(one.mask[went], whole.mask[went], atol=1e-5)
    early = invert_pairs(net, x, y, pairs, group=6, **{**run, "steps": 3})
    assert torch.allclose(one.mask[~went], early.mask[~went], atol=1e-5)  # a stopped pair keeps its first patch


def test_a_stopped_pairs_size_is_scaled_by_how_much_its_sources_finished_pairs_shrank_and_it_never_flags():
    """A stopped pair's unfinished size would make its source's finished pairs look small (plain successive
    halving flagged clean models so): it is scaled by the median shrink of its source's pairs that went on, and
    stays a reference, never a finding."""
    from backdoorscan.usb.pairs import _going_on, _scale_stopped

    rows = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    objective = np.array([0.5, 2.0, 1.0, 3.0, 1.0, 2.0])
    on = _going_on(rows, len(rows), objective, 2)
    assert on.tolist() == [True, False, True, False, True, True]
    first = np.array([10.0, 40.0, 20.0, 30.0, 20.0, 40.0])
    kept = np.flatnonzero(on)
    end = np.array([4.0, 10.0, 10.0, 10.0])  # (0,1) shrank 0.4x, (0,3) 0.5x; (1,2) 0.5x, (1,3) 0.25x
    (scaled,) = _scale_stopped(rows, len(rows), kept, (first, end))
    assert scaled[1] == pytest.approx(40.0 * 0.45) and scaled[3] == pytest.approx(30.0 * 0.375)
    pairs = [(s, t) for s in range(4) for t in range(4) if s != t]
    l1 = np.full(len(pairs), 30.0) * np.exp(np.random.default_rng(0).normal(0, 0.1, len(pairs)))
    l1[pairs.index((2, 3))] = 5.0
    works, ce = np.ones(len(pairs)), np.full(len(pairs), 0.01)
    settings = ScanSettings()
    free = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[])
    stopped = np.array([p == (2, 3) for p in pairs])
    held = decide_pairs(pairs, l1, ce, works, settings=settings, universal_targets=[], stopped=stopped)
    assert pairs.index((2, 3)) in free.flagged and not held.flagged
    assert np.isinf(held.distance[pairs.index((2, 3))])


def test_a_staged_scans_warps_are_decided_with_the_weights_of_its_refined_classes():
    """A staged 43-class scan warps only its refined classes: the stage-1 suspects (weight 1) and a few references
    standing for the rest. Unweighted, the suspects' own small warps set the median and hide the target's; with
    the staging's weights the target flags, as it does among all 43 classes."""
    rng = np.random.default_rng(0)
    suspects = np.array([0.3] + [0.45 + 0.03 * i for i in range(7)])  # the target, then 7 small natural warps
    references = np.exp(rng.normal(0, 0.1, 8))
    refined, weights = np.concatenate([suspects, references]), [1.0] * 8 + [35 / 8] * 8
    every = np.concatenate([suspects, np.exp(rng.normal(0, 0.1, 35))])
    settings = ScanSettings()
    _, _, unweighted = decide_warps(refined, np.ones(16), 43, settings)
    _, _, weighted = decide_warps(refined, np.ones(16), 43, settings, weights)
    _, _, full = decide_warps(every, np.ones(43), 43, settings)
    assert full[0] < 0 and weighted[0] < 0 and unweighted[0] > 0
    assert not (weighted[8:] < 0).any()  # no reference class flags


def test_restarts_keep_each_pairs_best_patch_and_restart_zero_is_the_single_inversion():
    """`restarts` inverts every pair from several starting patterns and keeps, per pair, the working patch of the
    smallest objective (else the one that moves the most); one restart is exactly the single inversion."""
    from backdoorscan.usb.pairs import _best_restarts, invert_pairs

    asr = np.array([[1.0, 0.5, 0.95], [0.95, 0.8, 1.0], [1.0, 0.7, 0.2]])  # (restart, pair)
    objective = np.array([[0.9, 0.1, 0.5], [0.4, 0.3, 0.6], [0.2, 0.05, 0.01]])
    # pair 0: three working, restart 2 smallest; pair 1: none works, restart 1 moves most; pair 2: restart 2 fails
    assert _best_restarts(asr.ravel(), objective.ravel(), 3).tolist() == [2 * 3 + 0, 1 * 3 + 1, 0 * 3 + 2]

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    pairs = [(0, 1), (1, 2), (2, 0)]
    run = dict(steps=5, lr=0.1, per_source=4, cost=0.01, batch=12, seed=7, group=6)
    one, three = invert_pairs(net, x, y, pairs, **run), invert_pairs(net, x, y, pairs, restarts=3, **run)
    alone = invert_pairs(net, x, y, pairs, restarts=1, **run)
    assert torch.equal(one.mask, alone.mask) and three.mask.shape == one.mask.shape
    objective_one, objective_three = one.ce + 0.01 * one.l1, three.ce + 0.01 * three.l1
    both_work = (one.asr >= PAIR_ASR) & (three.asr >= PAIR_ASR)
    assert (objective_three[both_work] <= objective_one[both_work] + 1e-6).all()
    assert (three.asr >= PAIR_ASR).sum() >= (one.asr >= PAIR_ASR).sum()


def test_the_inversions_step_hook_sees_every_step_and_ends_on_the_returned_patch():
    """`_invert(on_step=...)` (what benchmarks/pair_steps.py keeps its snapshots from) is called once a step with
    that step's objective per pair, and its last mask and pattern are the ones the inversion returns."""
    from backdoorscan.usb.pairs import _invert, initial_patterns

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    pairs = [(0, 1), (1, 2), (2, 0)]
    seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    run = dict(steps=4, lr=0.1, per_source=4, cost=0.01, progress=lambda done, total: None)
    mask, pattern = _invert(
        net, x, y, pairs, initial_patterns(pairs, (1, 8, 8), 3), **run, on_step=lambda *a: seen.append(a)
    )
    assert [s[0] for s in seen] == [1, 2, 3, 4] and all(s[1].shape == (3,) for s in seen)
    assert torch.equal(seen[-1][2], mask) and torch.equal(seen[-1][3], pattern)
    alone = _invert(net, x, y, pairs, initial_patterns(pairs, (1, 8, 8), 3), **run)
    assert torch.equal(alone[0], mask)  # the hook changes nothing


def test_a_recheck_keeps_the_better_patch_of_each_rechecked_pair_and_touches_no_other():
    """`keep_better` replaces a row only when the second inversion's patch is better by the restarts' rule (the
    working patch of the smaller objective, else the one that moves more); a replaced row's spill is unmeasured."""
    from backdoorscan.usb.pairs import PairTriggers, keep_better

    def table(pairs, l1, asr, ce, spill, fill):
        n = len(pairs)
        return PairTriggers(
            pairs=pairs,
            mask=torch.full((n, 1, 2, 2), fill),
            pattern=torch.full((n, 1, 2, 2), fill),
            l1=np.array(l1, dtype=float),
            asr=np.array(asr, dtype=float),
            spill=np.array(spill, dtype=float),
            ce=np.array(ce, dtype=float),
        )

    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    first = table(pairs, [10, 10, 10, 10], [1.0, 1.0, 0.5, 1.0], [0.1, 0.1, 0.9, 0.1], [0.0, 0.1, 0.2, 0.3], 0.0)
    # rows 0 and 2 rechecked: (0, 1) smaller and working -> taken; (1, 0) now works -> taken
    again = table([(0, 1), (1, 0)], [5, 50], [1.0, 0.95], [0.1, 0.3], [np.nan, np.nan], 1.0)
    merged = keep_better(first, [0, 2], again, cost=0.01)
    assert merged.l1.tolist() == [5, 10, 50, 10] and merged.asr.tolist() == [1.0, 1.0, 0.95, 1.0]
    assert np.isnan(merged.spill[[0, 2]]).all() and merged.spill[[1, 3]].tolist() == [0.1, 0.3]
    assert merged.mask[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    # a worse second look changes nothing
    worse = table([(0, 1), (1, 0)], [20, 50], [1.0, 0.4], [0.1, 0.3], [np.nan, np.nan], 1.0)
    kept = keep_better(first, [0, 2], worse, cost=0.01)
    assert kept.l1.tolist() == first.l1.tolist() and torch.equal(kept.mask, first.mask)
    assert kept.spill[0] == 0.0  # not replaced: its spill stands


def test_the_recheck_goes_to_the_sources_nearest_to_flagging():
    """Per source its nearest pair's distance; flagged (negative) first, a source with no working pair last."""
    from backdoorscan.usb.families import nearest_sources

    pairs = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    distance = np.array([1.5, 0.7, np.inf, np.inf, -0.2, 2.0])
    assert nearest_sources(pairs, distance, 2) == [2, 0]
    assert nearest_sources(pairs, distance, 5) == [2, 0, 1]


class _Ticks(list):
    """A progress callback that keeps every (done, total) it is given."""

    def append_pair(self, done: int, total: int) -> None:
        self.append((done, total))


def test_the_pairs_stage_inverts_the_nearest_sources_again_and_no_other():
    """With `pair_recheck` 1, the pairs of the one source nearest to flagging are inverted a second time from new
    starting patterns (better objective or the same), and every other pair is the first pass's."""
    from backdoorscan.usb.families import FamilyScan, scan_pairs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 4)).eval()
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    runs = {}
    for recheck in (0, 1):
        result = FamilyScan()
        settings = ScanSettings(pair_steps=5, pair_samples=2, pair_recheck=recheck)
        ticks = _Ticks()
        scan_pairs(
            net,
            x,
            y,
            4,
            settings=settings,
            universal_targets=[],
            group=4,
            progress=ticks.append_pair,
            result=result,
        )
        assert ticks[-1][0] == ticks[-1][1] and all(a <= b for (a, _), (b, _) in zip(ticks, ticks[1:], strict=False))
        runs[recheck] = result
    once, twice = runs[0].pairs, runs[1].pairs
    assert once is not None and twice is not None and runs[0].pairs_rechecked == []
    (source,) = runs[1].pairs_rechecked
    other = np.array([s != source for s, _ in once.pairs])
    assert np.array_equal(once.l1[other], twice.l1[other]) and np.array_equal(once.asr[other], twice.asr[other])
    mine = ~other & (once.asr >= PAIR_ASR) & (twice.asr >= PAIR_ASR)
    assert (twice.ce[mine] + 0.01 * twice.l1[mine] <= once.ce[mine] + 0.01 * once.l1[mine] + 1e-9).all()
    assert runs[1].to_dict()["pairs"]["rechecked_sources"] == [source]


def test_every_pair_measure_has_words_in_the_report():
    """A finding names the measure that flagged it (`PairDecision.measure`); the report words each one."""
    from backdoorscan.report.rows import MEASURE_WORDS
    from backdoorscan.usb.pair_rule import PAIR_MEASURES

    assert set(MEASURE_WORDS) == set(PAIR_MEASURES)
