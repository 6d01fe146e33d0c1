"""The erasure screen's file and rule: a scan's triggers file read back exactly, and refused when it does not fit
(another model, another size, unknown families, classes the model lacks, nothing in it); the rule erases a
patch, its region grown only as far as the target's clean samples allow. End to end on real models:
tests/test_scan.py (universal) and tests/test_families.py (a pair)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from backdoorscan.core.errors import ScanError
from backdoorscan.report.trigger_file import TriggerFile, load_triggers, save_triggers
from backdoorscan.screen.erase import FILL_DRAWS, GROW_ALLOWANCE, erase_flags, erase_rule

SHA = "ab" * 32


def _found(**change) -> TriggerFile:
    region = torch.zeros(2, 1, 8, 8)
    region[0, 0, 1:3, 1:3] = 1.0
    region[1, 0, 5:7, 5:7] = 0.8
    fields = {
        "regions": region,
        "targets": [3, 1],
        "sources": [-1, 2],
        "families": ["universal", "source-specific"],
        "warps": torch.full((1, 2, 4, 4), 0.05),
        "warp_targets": [0],
        "model_sha256": SHA,
    }
    return TriggerFile(**{**fields, **change})


def test_a_triggers_file_reads_back_exactly(tmp_path):
    save_triggers(tmp_path / "t.safetensors", _found())
    back = load_triggers(tmp_path / "t.safetensors", SHA, (8, 8), 4)
    assert back.targets == [3, 1] and back.sources == [-1, 2] and back.warp_targets == [0]
    assert torch.equal(back.regions, _found().regions) and torch.equal(back.warps, _found().warps)
    assert back.describe() == [
        {"family": "universal", "target": 3, "source": None},
        {"family": "source-specific", "target": 1, "source": 2},
        {"family": "warp", "target": 0, "source": None},
    ]


@pytest.mark.parametrize(
    "change,args,message",
    [
        ({}, ("cd" * 32, (8, 8), 4), "another model"),
        ({}, (SHA, (9, 8), 4), "do not fit"),
        ({}, (SHA, (8, 8), 3), "classes outside"),
        ({"families": ["universal", "os.system"]}, (SHA, (8, 8), 4), "families"),
        (
            {
                "regions": torch.zeros(0, 1, 8, 8),
                "targets": [],
                "sources": [],
                "families": [],
                "warps": torch.zeros(0, 2, 1, 1),
                "warp_targets": [],
            },
            (SHA, (8, 8), 4),
            "holds 0 triggers",
        ),
        ({"warps": torch.full((1, 2, 4, 4), float("nan"))}, (SHA, (8, 8), 4), "not finite"),
    ],
)
def test_a_triggers_file_that_does_not_fit_is_refused(tmp_path, change, args, message):
    save_triggers(tmp_path / "t.safetensors", _found(**change))
    with pytest.raises(ScanError, match=message):
        load_triggers(tmp_path / "t.safetensors", *args)


def test_a_file_that_is_not_a_triggers_file_is_refused(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ScanError, match="not a backdoorscan triggers file|not a triggers file"):
        load_triggers(tmp_path / "t.safetensors", SHA, (8, 8), 4)
    with pytest.raises(ScanError, match="not found"):
        load_triggers(tmp_path / "none.safetensors", SHA, (8, 8), 4)


class _Patchy(nn.Module):
    """Class 3 when the top-left 2x2 is bright, else class 1 (or 2 when the middle row is bright too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 4)
        out[:, 1] = 0.5
        out[:, 2] = x[:, 0, 4].mean(1) * 2
        out[:, 3] = x[:, 0, 1:3, 1:3].mean((1, 2))
        return out


def test_the_rule_erases_a_patch_with_what_its_source_looks_like_there():
    clean = torch.zeros(6, 1, 8, 8)
    clean[:, 0, 4, :] = 0.2  # class 1
    stamped = clean.clone()
    stamped[:, 0, 1:3, 1:3] = 1.0  # the patch: class 3
    x = torch.cat([clean, stamped])
    model = _Patchy()
    assert model(x).argmax(1).tolist() == [1] * 6 + [3] * 6
    found = _found(regions=_found().regions[:1], targets=[3], sources=[1], families=["source-specific"])
    rule = erase_rule(model, found, clean, torch.ones(6, dtype=torch.long))
    assert int(rule.areas.sum()) == 16  # the 2x2 region grown by a pixel (REGION_GROW) inside the image
    assert rule.fills.shape[:2] == (1, FILL_DRAWS) and torch.equal(rule.fills[0, 0], clean[0])  # the source's own
    before, after, flagged = erase_flags(model, x, rule)
    assert flagged.tolist() == [False] * 6 + [True] * 6 and after.tolist() == [1] * 12


class _Gray(nn.Module):
    """Class 3 when the 2x2 patch at rows and columns 1-2 is mid-grey (a dim planted patch), else class 1: half of
    class 1 draws a stroke there, half leaves it blank, so the class's mean there is the trigger."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 4)
        out[:, 1] = 0.5
        out[:, 3] = 1 - 4 * (x[:, 0, 1:3, 1:3].mean((1, 2)) - 0.5).abs()
        return out


def test_erasing_fills_with_real_source_samples_not_their_mean():
    """A class whose mean over the patch looks like the trigger: erasing with the mean leaves every triggered input
    on the target; with real samples of the source, most erasures move each off it, and no clean input of the
    source or the target is flagged."""
    clean = torch.zeros(8, 1, 8, 8)
    clean[::2, 0, 1:3, 1:3] = 1.0  # a stroke in half of class 1
    triggered = clean.clone()
    triggered[:, 0, 1:3, 1:3] = 0.5
    model = _Gray()
    assert model(clean).argmax(1).tolist() == [1] * 8 and model(triggered).argmax(1).tolist() == [3] * 8
    found = _found(regions=_found().regions[:1], targets=[3], sources=[1], families=["source-specific"])
    rule = erase_rule(model, found, clean, torch.ones(8, dtype=torch.long))
    by_mean = triggered * (1 - rule.areas[0]) + clean.mean(0) * rule.areas[0]
    assert model(by_mean).argmax(1).tolist() == [3] * 8  # the mean is the trigger: nothing would be flagged
    _, after, flagged = erase_flags(model, torch.cat([clean, triggered]), rule)
    assert flagged.tolist() == [False] * 8 + [True] * 8 and after.tolist() == [1] * 16


class _Planted(nn.Module):
    """Class 3 when the planted 3x3 patch (rows and columns 1-3) is bright, or the class's own 2x2 feature at
    `feature` is; else class 1."""

    def __init__(self, feature: tuple[int, int]) -> None:
        super().__init__()
        self.row, self.col = feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 4)
        out[:, 1] = 0.5
        own = x[:, 0, self.row : self.row + 2, self.col : self.col + 2].mean((1, 2))
        out[:, 3] = torch.maximum(x[:, 0, 1:4, 1:4].mean((1, 2)), own)
        return out


def _off_by_two(feature: tuple[int, int]) -> tuple[nn.Module, TriggerFile, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A model, a reversed patch that sits two pixels off the planted one (at (4, 4)), clean samples of class 1 and
    of the target 3 (its own feature bright), their labels, and inputs stamped with the planted patch."""
    model = _Planted(feature)
    region = torch.zeros(1, 1, 12, 12)
    region[0, 0, 4, 4] = 1.0
    found = _found(regions=region, targets=[3], sources=[1], families=["source-specific"])
    clean = torch.zeros(8, 1, 12, 12)
    clean[4:, 0, feature[0] : feature[0] + 2, feature[1] : feature[1] + 2] = 1.0
    labels = torch.tensor([1] * 4 + [3] * 4)
    stamped = torch.zeros(4, 1, 12, 12)
    stamped[:, 0, 1:4, 1:4] = 1.0
    assert model(clean).argmax(1).tolist() == labels.tolist() and model(stamped).argmax(1).tolist() == [3] * 4
    return model, found, clean, labels, stamped


def test_a_region_grows_to_cover_a_patch_reversed_off_where_the_targets_samples_allow_it():
    model, found, clean, labels, stamped = _off_by_two(feature=(9, 9))  # the target's feature far from the patch
    assert erase_rule(model, found, clean, labels).grow == [1]  # the library's default: the base region
    rule = erase_rule(model, found, clean, labels, grow=3)
    assert rule.grow == [3] and int(rule.areas.sum()) == 49  # a pixel grown by 3: 7x7
    _, after, flagged = erase_flags(model, torch.cat([clean, stamped]), rule)
    assert flagged.tolist() == [False] * 8 + [True] * 4 and after[8:].tolist() == [1] * 4


def test_a_region_does_not_grow_over_the_targets_own_features():
    model, found, clean, labels, stamped = _off_by_two(feature=(5, 5))  # two pixels' growth erases the 3s' feature
    rule = erase_rule(model, found, clean, labels, grow=3)
    assert rule.grow == [1]  # the base region: the screen then misses this patch, and no clean 3 is flagged
    _, _, flagged = erase_flags(model, torch.cat([clean, stamped]), rule)
    assert not flagged.any()


class _TwoFeatures(_Planted):
    """As `_Planted`, with the target's own feature at (9, 9) on most samples and at (5, 5) on some."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        out[:, 3] = torch.maximum(out[:, 3], x[:, 0, 5:7, 5:7].mean((1, 2)))
        return out


@pytest.mark.parametrize(("near", "grows"), [(1, True), (3, False)])
def test_a_region_may_grow_over_a_tenth_of_the_targets_samples_and_no_more(near, grows):
    """20 clean 3s, `near` of them with their feature where two pixels' growth erases it: 1 in 20 moved is within
    GROW_ALLOWANCE (0.1), 3 in 20 is not."""
    assert GROW_ALLOWANCE == 0.1
    model = _TwoFeatures((9, 9))
    region = torch.zeros(1, 1, 12, 12)
    region[0, 0, 4, 4] = 1.0
    found = _found(regions=region, targets=[3], sources=[1], families=["source-specific"])
    clean = torch.zeros(24, 1, 12, 12)
    clean[4:, 0, 9:11, 9:11] = 1.0
    clean[4 : 4 + near, 0, 9:11, 9:11] = 0.0
    clean[4 : 4 + near, 0, 5:7, 5:7] = 1.0
    labels = torch.tensor([1] * 4 + [3] * 20)
    assert model(clean).argmax(1).tolist() == labels.tolist()
    rule = erase_rule(model, found, clean, labels, grow=3)
    assert rule.grow == ([3] if grows else [1])
    stamped = torch.zeros(4, 1, 12, 12)
    stamped[:, 0, 1:4, 1:4] = 1.0
    _, _, flagged = erase_flags(model, torch.cat([clean, stamped]), rule)
    assert flagged[24:].all() == grows and int(flagged[4:24].sum()) == (near if grows else 0)
