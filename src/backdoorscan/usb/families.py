"""One verdict over every backdoor family the scan covers: USB's universal triggers, source-specific and all-to-all
pairs (`pairs.py`), and warps (`warp.py`).

Each family measures its own candidates (classes, pairs) and flags those whose size is an outlier by the same
one-sided MAD anomaly index as USB's, with the same guards (a working trigger, at most `max_ratio` of the median
size). The verdict is "backdoor" when any family flags; the findings say which family fired and name a target, a
(source, target) pair, or a mapping. The margin counts every criterion between the verdict and its flip: for a
clean verdict, the smallest distance of any candidate of any family to being flagged (the threshold *and* the
size guard, in anomaly-index units); for a backdoor verdict, the largest margin among the families that fired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn as nn

from .alltoall import SHARED_MAX_RATIO, SHARED_MOVED, SHARED_TOOK, SharedDecision, SharedPatch, shared_test
from .decide import anomaly_index, class_threshold, family_margin, flip_distance, size_ratio, spread
from .pair_rule import PairDecision, decide_pairs, pair_family
from .pairs import (
    PAIR_ASR,
    PAIRS_REPORTED,
    PairTriggers,
    blend,
    candidate_pairs,
    invert_pairs,
    keep_better,
    measure_reliance,
    measure_spill,
    pair_compactness,
    window_test,
)
from .warp import Warps, apply_warp, invert_warps

WINDOW_FIGURES = ("window_asr", "window_ce", "window_l1")  # a tested pair's report fields (`PairTriggers`)


@dataclass
class Finding:
    """One flagged candidate: which family, the target, the source for a pair, and its index over the threshold."""

    family: str  # "universal", "source-specific", "all-to-all", "warp"
    target: int
    source: int | None
    index: float
    threshold: float
    size: float  # L1 (pixels) of a pair's patch, mean displacement (pixels) of a warp, the class's L1 (universal)
    measure: str | None = None  # a pair's: the size measure whose index is reported (one of PAIR_MEASURES)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "target": self.target,
            "source": self.source,
            "index": round(self.index, 4),
            "threshold": round(self.threshold, 4),
            "size": round(self.size, 4),
            **({"measure": self.measure} if self.measure else {}),
        }


@dataclass
class FamilyScan:
    """What the families beyond USB measured, and what they flagged."""

    pairs: PairTriggers | None = None
    pair_index: np.ndarray | None = None
    pair_threshold: float | None = None
    pair_objective_index: np.ndarray | None = None  # the index of the inversion's objective (its own flags)
    pair_support_index: np.ndarray | None = None  # the index of the pixels each patch needs (its own flags)
    shared: SharedPatch | None = None  # the all-to-all test by one shared patch (alltoall.py)
    shared_decision: SharedDecision | None = None
    pairs_rechecked: list[int] = field(default_factory=list)  # sources whose pairs were inverted a second time
    warps: Warps | None = None
    warp_index: np.ndarray | None = None
    warp_threshold: float | None = None
    findings: list[Finding] = field(default_factory=list)
    margins: dict[str, float] = field(default_factory=dict)  # per family: distance of its verdict from a flip
    notes: list[str] = field(default_factory=list)  # how the samples limited a family (joined to the scan's notes)
    not_measured: dict[str, str] = field(default_factory=dict)  # family -> why the samples did not let it measure
    images: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # file stem -> (C, H, W) in [0, 1]

    def to_dict(self) -> dict:
        out: dict = {
            "findings": [f.to_dict() for f in self.findings],
            "margins": {k: round(v, 4) for k, v in self.margins.items()},
            "not_measured": dict(self.not_measured),
        }
        if self.pairs is not None and self.pair_index is not None:
            order = np.argsort(-self.pair_index)
            out["pairs"] = {
                "threshold": round(float(self.pair_threshold or 0), 4),
                "measured": len(self.pairs.pairs),
                "rechecked_sources": list(self.pairs_rechecked),
                "pairs": [
                    {
                        "source": self.pairs.pairs[i][0],
                        "target": self.pairs.pairs[i][1],
                        "l1": round(float(self.pairs.l1[i]), 3),
                        "asr": round(float(self.pairs.asr[i]), 4),
                        "cross_entropy": round(float(self.pairs.ce[i]), 4),
                        **({"stopped": True} if self.pairs.stopped is not None and self.pairs.stopped[i] else {}),
                        "spill": _finite(self.pairs.spill[i]),
                        **({"reliance": _finite(self.pairs.reliance[i])} if self.pairs.reliance is not None else {}),
                        **({"compact": _finite(self.pairs.compact[i])} if self.pairs.compact is not None else {}),
                        # the window test's three figures, set together (`pairs.window_test`)
                        **(
                            {key: _finite(getattr(self.pairs, key)[i]) for key in WINDOW_FIGURES}
                            if self.pairs.window_asr is not None and np.isfinite(self.pairs.window_asr[i])
                            else {}
                        ),
                        "index": _finite(self.pair_index[i]),
                        **({"support": _finite(self.pairs.support[i])} if self.pairs.support is not None else {}),
                        **(
                            {"objective_index": _finite(self.pair_objective_index[i])}
                            if self.pair_objective_index is not None
                            else {}
                        ),
                        **(
                            {"support_index": _finite(self.pair_support_index[i])}
                            if self.pair_support_index is not None
                            else {}
                        ),
                    }
                    for i in order
                ],
            }
        if self.shared is not None and self.shared_decision is not None:
            d, sh = self.shared_decision, self.shared
            out["shared_patch"] = {
                "l1": round(sh.l1, 3),
                "reference_l1": _finite(d.reference),
                "ratio": _finite(d.ratio),
                "max_ratio": SHARED_MAX_RATIO,
                "moved": round(sh.moved, 4),
                "min_moved": SHARED_MOVED,
                "sources": [
                    {"source": src, "target": sh.targets[src], "share": round(sh.shares[src], 4)}
                    for src in sorted(sh.shares)
                ],
                "mapping": [list(p) for p in d.mapped],
                "sources_needed": d.needed,
                "flagged": d.flagged,
            }
        if self.warps is not None and self.warp_index is not None:
            out["warps"] = {
                "threshold": round(float(self.warp_threshold or 0), 4),
                "classes": [
                    {
                        "class": t,
                        "displacement_px": round(float(d), 4),
                        "asr": round(float(a), 4),
                        "index": round(float(i), 4),
                    }
                    for t, d, a, i in zip(
                        self.warps.targets, self.warps.displacement, self.warps.asr, self.warp_index, strict=True
                    )
                ],
            }
        return out


def _finite(value: float) -> float | None:
    """A figure for JSON: rounded, None where it is not finite (a pair whose patch never worked)."""
    return round(float(value), 4) if np.isfinite(value) else None


def scan_pairs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    *,
    settings,
    universal_targets: list[int],
    group: int,
    progress: Callable[[int, int], None] | None,
    result: FamilyScan,
) -> None:
    """The pairs family: invert, index, flag, and name a source-specific pair or an all-to-all mapping."""

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    # a pair is evidence only when its source has as many clean samples as its patch is fitted on: with fewer,
    # the patch is fitted and judged on the same few images repeated (43 classes at 300 samples: about 7 each, and
    # a clean GTSRB model was flagged that way). Such sources are not measured at all (up to 0.6.1 they were, at
    # the whole stage's cost, for figures that could not flag), and the scan says the family did not cover them.
    pairs = candidate_pairs(k, y, logits, min_samples=settings.pair_samples)
    counts = torch.bincount(y.cpu(), minlength=k)
    present = [c for c in range(k) if int(counts[c])]
    short = [c for c in present if int(counts[c]) < settings.pair_samples]
    enough = f"give at least {settings.pair_samples} samples a class (--samples {settings.pair_samples * k})"
    if len(pairs) < 4:
        result.not_measured["pairs"] = (
            f"too few source classes had {settings.pair_samples} clean samples ({len(short)} of {len(present)} had "
            f"fewer): source-specific and all-to-all backdoors were not measured; {enough}"
        )
        result.notes.append(result.not_measured["pairs"])
        return
    if short:
        result.notes.append(
            f"{len(short)} of {len(present)} source classes had fewer than {settings.pair_samples} clean samples: "
            f"their pairs were not measured, so a source-specific or all-to-all backdoor from them is not "
            f"covered; {enough}"
        )
    per_group = max(1, group * settings.batch_size // settings.pair_samples)
    invert = partial(
        invert_pairs,
        model,
        x,
        y,
        steps=settings.pair_steps,
        lr=settings.lr,
        per_source=settings.pair_samples,
        cost=settings.pair_cost,
        group=per_group,
        batch=group * settings.batch_size,
        seed=settings.seed,
        first_steps=settings.pair_first_steps,
        go_on=settings.pair_go_on,
        support=settings.pair_support_ratio > 0,
    )
    # progress in pair-inversions: the first pass, then the recheck (at most `pair_recheck` sources' pairs)
    per_source = max(sum(1 for p in pairs if p[0] == s) for s in {p[0] for p in pairs})
    first = len(pairs) * settings.pair_restarts
    whole = first + settings.pair_recheck * per_source
    found = invert(pairs, restarts=settings.pair_restarts, progress=_share(progress, 0, first, whole, settings))
    decision = _decide_measured(model, x, y, pairs, found, settings, universal_targets)
    rechecked: list[int] = []
    if settings.pair_recheck:
        rechecked = nearest_sources(pairs, decision.distance, settings.pair_recheck)
        rows = [i for i, (s, _) in enumerate(pairs) if s in rechecked]
        again = invert(
            [pairs[i] for i in rows],
            restarts=1,
            first_restart=settings.pair_restarts,
            progress=_share(progress, first, len(rows), whole, settings),
        )
        found = keep_better(found, rows, again, settings.pair_cost)
        decision = _decide_measured(model, x, y, pairs, found, settings, universal_targets)
    if progress is not None:
        progress(whole * settings.pair_steps, whole * settings.pair_steps)
    index, flagged = decision.index, decision.flagged
    family = pair_family(pairs, flagged)
    for i in flagged:  # reported by the measure nearest to flagging it
        result.findings.append(
            Finding(
                family,
                pairs[i][1],
                pairs[i][0],
                decision.index_by_measure(i),
                float(decision.threshold),
                float(found.l1[i]),
                decision.measure[i],
            )
        )
    for i in flagged:  # the found patch, and a sample of the source stamped with it
        s, t = pairs[i]
        mask, pattern = found.mask[i].cpu(), found.pattern[i].cpu()
        sample = x[(y == s).nonzero()[0, 0]].cpu()
        result.images[f"pair_{s}_to_{t}"] = (mask * pattern).clamp(0, 1)
        result.images[f"pair_stamped_{s}_to_{t}"] = blend(sample, mask, pattern)
    shared, verdict = _shared_patch(model, x, y, pairs, found, settings=settings, result=result)
    # the family's margin over the pairs and the shared patch as one more candidate (last position)
    distance = np.append(decision.distance, verdict.distance)
    margin = family_margin(distance, flagged + ([len(pairs)] if verdict.flagged else []))
    result.pairs, result.pair_index, result.pair_threshold = found, index, decision.threshold
    result.pair_objective_index = decision.objective_index
    result.pair_support_index = decision.support_index
    result.shared, result.shared_decision = shared, verdict
    result.pairs_rechecked = rechecked
    result.margins["pairs"] = margin


def _decide_measured(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pairs: list[tuple[int, int]],
    found: PairTriggers,
    settings,
    universal_targets: list[int],
) -> PairDecision:
    """The pairs' decision with compactness, spill and reliance: decided once, spill and reliance measured where
    they are not yet for every pair that would flag and the PAIRS_REPORTED of the highest index (the ones a report
    names), then decided with them."""
    decide = partial(
        decide_pairs,
        pairs,
        found.l1,
        found.ce,
        found.asr,
        settings=settings,
        universal_targets=universal_targets,
        support=found.support,
        stopped=found.stopped,
    )
    found.compact = pair_compactness(found.mask)
    decision = decide(compact=found.compact)
    finished = [int(i) for i in np.argsort(-decision.index) if found.stopped is None or not found.stopped[i]]
    top = [i for i in finished[:PAIRS_REPORTED] if np.isfinite(decision.index[i])]
    named = sorted(set(decision.flagged) | set(top))

    def measure(which: list[int]) -> None:
        measure_spill(model, x, y, found, [i for i in which if np.isnan(found.spill[i])])
        measure_reliance(
            model, x, y, found, [i for i in which if found.reliance is None or np.isnan(found.reliance[i])]
        )

    measure(named)
    decision = decide(spill=found.spill, reliance=found.reliance, compact=found.compact)
    # the pairs that only their mask's spread holds back from the compact route get the window test (0.16.0)
    spread = decide(spill=found.spill, reliance=found.reliance, compact=np.ones(len(pairs)))
    candidates = [i for i in spread.flagged if i not in decision.flagged]
    measure(candidates)
    spread = decide(spill=found.spill, reliance=found.reliance, compact=np.ones(len(pairs)))
    untested = [i for i in spread.flagged if i not in decision.flagged]
    window_test(
        model,
        x,
        y,
        found,
        [i for i in untested if found.window_asr is None or np.isnan(found.window_asr[i])],
        steps=settings.pair_steps,
        lr=settings.lr,
        per_source=settings.pair_samples,
        cost=settings.pair_cost,
    )
    return decide(
        spill=found.spill,
        reliance=found.reliance,
        compact=found.compact,
        window_asr=found.window_asr,
        window_ce=found.window_ce,
    )


def nearest_sources(pairs: list[tuple[int, int]], distance: np.ndarray, count: int) -> list[int]:
    """The `count` sources whose nearest pair is closest to flagging (flagged pairs first), ties by class: the ones
    a second inversion is spent on. A source with no working pair is nearest last."""
    nearest: dict[int, float] = {}
    for (s, _), d in zip(pairs, distance, strict=True):
        nearest[s] = min(nearest.get(s, np.inf), float(d))
    return sorted(sorted(nearest), key=lambda s: nearest[s])[:count]


def _share(
    progress: Callable[[int, int], None] | None, start: int, part: int, whole: int, settings
) -> Callable[[int, int], None] | None:
    """Progress of an inversion of `part` pairs that begins after `start` of the stage's `whole`, in pair-steps
    over the whole stage: one rising count across the first pass and the recheck."""
    if progress is None:
        return None
    steps = settings.pair_steps
    return lambda done, total: progress((start * steps) + (part * steps * done) // max(total, 1), whole * steps)


def _shared_patch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pairs: list[tuple[int, int]],
    found: PairTriggers,
    *,
    settings,
    result: FamilyScan,
) -> tuple[SharedPatch, SharedDecision]:
    """The all-to-all test by one shared patch (alltoall.py) on the pairs' sources, against the pairs' sizes; a
    mapping it flags is reported pair by pair (those the pairs already named are not repeated)."""
    sources = sorted({s for s, _ in pairs})
    shared, verdict = shared_test(model, x, y, sources, found.l1[found.asr >= PAIR_ASR], settings=settings)
    if shared.moved < SHARED_TOOK:
        result.notes.append(
            f"the all-to-all test's shared patch moved {shared.moved:.0%} of the samples off their labels (L1 "
            f"{shared.l1:.1f} px): its inversion did not take hold on this model, so an all-to-all backdoor is "
            "covered only by the pairs flagged one by one"
        )
    if verdict.flagged:
        named = {(f.source, f.target) for f in result.findings}
        where = {p: i for i, p in enumerate(pairs)}  # the report names these pairs: their spill is measured too
        measure_spill(model, x, y, found, [where[p] for p in verdict.mapped if p in where and p not in named])
        for s, t in verdict.mapped:
            if (s, t) not in named:
                result.findings.append(Finding("all-to-all", t, s, verdict.index, verdict.threshold, shared.l1))
        mask, pattern = shared.mask.cpu(), shared.pattern.cpu()
        result.images["all_to_all_patch"] = (mask * pattern).clamp(0, 1)
        for s, t in verdict.mapped[:PAIRS_REPORTED]:
            sample = x[(y == s).nonzero()[0, 0]].cpu()
            result.images[f"all_to_all_stamped_{s}_to_{t}"] = blend(sample, mask, pattern)
    return shared, verdict


def decide_warps(
    displacement: np.ndarray, asr: np.ndarray, k: int, settings, weights: list[float] | None = None
) -> tuple[np.ndarray, float, np.ndarray]:
    """Per warped target: its log anomaly index, the threshold for `k` classes, and its distance from flagging
    (negative: flagged), by USB's rule on the warps' mean displacements (index, size guard, success)."""
    index = anomaly_index(displacement, "log", weights)
    threshold = class_threshold(settings.threshold, k, settings.threshold_classes)
    distance = flip_distance(
        index,
        size_ratio(displacement, weights),
        asr,
        threshold=threshold,
        asr_min=settings.asr_min,
        max_ratio=settings.max_ratio,
        sigma=spread(displacement, weights),
    )
    return index, threshold, distance


def scan_warps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: list[int],
    k: int,
    *,
    settings,
    group: int,
    progress: Callable[[int, int], None] | None,
    result: FamilyScan,
    weights: list[float] | None = None,
) -> None:
    """The warp family: a smooth warp per target; an outlier-small warp that works is a warping backdoor. On a
    staged scan `targets` are the refined classes and `weights` how many classes each stands for in the median and
    spread, as in USB's own decision (None: every class once)."""
    found = invert_warps(
        model,
        x,
        y,
        targets,
        steps=settings.warp_steps,
        lr=settings.warp_lr,
        per_class=settings.batch_size,
        cost=settings.warp_cost,
        grid=settings.warp_grid,
        group=group,
        progress=progress,
    )
    index, threshold, distance = decide_warps(found.displacement, found.asr, k, settings, weights)
    flagged = [i for i in range(len(targets)) if distance[i] < 0]
    result.findings += [
        Finding("warp", targets[i], None, float(index[i]), threshold, float(found.displacement[i])) for i in flagged
    ]
    fields = found.fields((x.shape[-2], x.shape[-1])).norm(dim=1, keepdim=True).cpu()  # (T, 1, H, W) pixels
    scale = max(float(fields.max()), 1e-6)
    for i, t in enumerate(targets):  # how far each pixel moves (white: the most of any class), and an example
        sample = x[(y != t).nonzero()[0, 0]]
        result.images[f"warp_field_{t}"] = fields[i] / scale
        result.images[f"warped_{t}"] = apply_warp(sample[None], found.control[i : i + 1])[0, 0].cpu()
    result.warps, result.warp_index, result.warp_threshold = found, index, threshold
    result.margins["warp"] = family_margin(distance, flagged)
