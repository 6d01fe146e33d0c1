"""`scan_model`: load -> stage 1 -> targeted UAPs (Alg. 1) -> refinement (Alg. 2) -> other families -> decision,
returned as a `ModelScan` (`result.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.choices import SizeEvidence
from ..core.device import DEFAULT_DEVICE
from ..core.seeding import seeded
from ..core.settings import ScanSettings
from ..loading import ModelSource, Prepared, prepare
from ..loading.evidence import check_search
from ..loading.samples import Batch
from ..perturb import norm_of, targeted_uaps
from ..perturb.triggers import Refined, stamp
from ..safety.limits import Limits, available_memory
from .batching import auto_class_group, bytes_per_sample, in_class_groups, memory_budget
from .decide import (
    Weights,
    class_evidence,
    class_threshold,
    decided_evidence,
    flag,
    flip_distance,
    name_targets,
    spread,
)
from .families import FamilyScan, scan_pairs, scan_warps
from .refine import refine
from .result import ClassResult, ModelScan
from .staging import Staging, choose_classes

Progress = Callable[[str, int, int], None]


def scan_model(
    model: str | Path | nn.Module | ModelSource,
    data: str | Path,
    *,
    settings: ScanSettings | None = None,
    device: str | torch.device = DEFAULT_DEVICE,
    progress: Progress | None = None,
    limits: Limits | None = None,
) -> ModelScan:
    """Scan one classifier for a backdoor with USB (or Neural Cleanse) and return the verdict and figures.

    `model` is a checkpoint path, a module, or a `ModelSource` saying how to load and feed it. The verdict is
    `inconclusive` when the evidence checks show the scan could not measure the model.
    """
    settings = settings or ScanSettings()
    with seeded(settings.seed):
        return _scan_model(model, data, settings=settings, device=device, progress=progress, limits=limits)


@dataclass
class _Scan:
    """What every step of one scan reads: the wrapped model, the samples and their predicted labels, the budget."""

    net: nn.Module
    x: torch.Tensor
    y: torch.Tensor  # predictions: the paper's Err counts changes of f(x), so "other classes" are by prediction
    k: int
    device: torch.device
    settings: ScanSettings
    group: int  # classes per batch
    progress: Progress | None
    timings: dict[str, float]

    def step(self, phase: str, sl: slice | None = None, total_classes: int = 0) -> Callable[[int, int], None] | None:
        """Progress of a phase; for one class group (`sl`), its share of the whole phase, so that one bar and its
        ETA span every group."""
        progress = self.progress
        if progress is None:
            return None
        if sl is None:
            return lambda done, total: progress(phase, done, total)
        groups = -(-total_classes // self.group)
        first = min(sl.start // self.group, groups - 1)
        return lambda done, total: progress(phase, first * total + done, groups * total)


@dataclass
class _Universal:
    """USB's (or Neural Cleanse's) per-class results and the decision over them."""

    v: torch.Tensor  # (N, C, H, W) Alg. 1's UAPs (zeros for NC)
    success: torch.Tensor  # (N,) their targeted success (NaN for NC)
    refined: Refined
    classes: list[ClassResult]
    threshold: float
    margin: float

    @property
    def targets(self) -> list[int]:
        return [c.cls for c in self.classes if c.target]

    @property
    def fired(self) -> bool:
        return any(c.flagged for c in self.classes)


def _scan_model(
    model: str | Path | nn.Module | ModelSource,
    data: str | Path,
    *,
    settings: ScanSettings,
    device: str | torch.device,
    progress: Progress | None,
    limits: Limits | None,
) -> ModelScan:
    """`scan_model`'s steps, run with torch's generators seeded (and restored afterwards by the caller)."""
    t0 = time.perf_counter()
    ready = prepare(
        ModelSource.of(model),
        data,
        samples=settings.samples,
        seed=settings.seed,
        device=device,
        limits=limits,
        per_class=settings.pair_samples if "pairs" in settings.covers else 0,
    )
    timings = {"load": time.perf_counter() - t0}
    if not ready.evidence.ok or ready.samples is None or ready.predictions is None:
        return _inconclusive(ready, data, settings, timings, t0)
    group, batching = class_group(ready.model, ready.samples.x, ready.num_classes, settings, ready.device, limits)
    run = _Scan(
        ready.model,
        ready.samples.x,
        ready.predictions,
        ready.num_classes,
        ready.device,
        settings,
        group,
        progress,
        timings,
    )
    staging = _stage_one(run)
    universal = _universal(run, staging, ready)
    families = FamilyScan()
    if ready.evidence.ok:  # the search's own evidence (check_search) can still end the scan here
        families = _other_families(run, staging.refined, staging.weights, universal.targets, ready.extra)
        ready.evidence.notes.extend(families.notes)
    families.margins["universal"] = universal.margin
    fired = universal.fired or bool(families.findings)
    found = [f.target for f in families.findings if f.target not in universal.targets]
    verdict = "inconclusive" if not ready.evidence.ok else "backdoor" if fired else "clean"
    timings["total"] = time.perf_counter() - t0
    s = ready.samples
    return ModelScan(
        verdict=verdict,
        target_classes=list(dict.fromkeys(universal.targets + found)) if ready.evidence.ok else [],
        classes=universal.classes,
        evidence=ready.evidence,
        settings=settings,
        model=ready.model_info(),
        input=ready.spec,
        device=str(run.device),
        data={"path": str(data), "samples": int(s.x.shape[0]), "labels_from": s.labels_from, "resized": s.resize_note},
        timings={key: round(val, 3) for key, val in timings.items()},
        triggers=universal.refined.trigger.cpu(),
        masks=universal.refined.mask.cpu(),
        stamped=_examples(run.x, run.y, staging.refined, universal.refined).cpu(),
        uaps=universal.v.cpu(),
        form=universal.refined.form,
        batching=batching,
        staging=staging,
        threshold=universal.threshold,
        families=families,
        margin=_overall_margin(families.margins, fired, universal.fired, families) if ready.evidence.ok else None,
    )


def _stage_one(run: _Scan) -> Staging:
    """Which classes the full search refines (all of them up to `suspects + references`)."""
    t = time.perf_counter()
    staging = choose_classes(run.net, run.x, run.y, run.k, run.settings, run.group, run.step("stage1"))
    if staging.mode == "staged":
        run.timings["stage1"] = time.perf_counter() - t
    return staging


def _universal(run: _Scan, staging: Staging, ready: Prepared) -> _Universal:
    """One universal trigger per refined class (Alg. 1 then Alg. 2, or Neural Cleanse), then USB's decision."""
    settings, x, y, dev = run.settings, run.x, run.y, run.device
    targets = torch.tensor(staging.refined, device=dev)
    n = len(targets)
    t = time.perf_counter()
    if settings.method == "usb":
        uap_parts = in_class_groups(
            lambda sl: targeted_uaps(
                run.net,
                x,
                y,
                targets[sl],
                p=settings.norm,
                delta=settings.delta,
                theta=settings.theta,
                max_passes=settings.max_passes,
                stall=settings.stall,
                overshoot=settings.overshoot,
                max_iter=settings.deepfool_iter,
                progress=run.step("uap", sl, n),
            ),
            n,
            run.group,
        )
        v = torch.cat([u.v for u in uap_parts])
        success = torch.cat([u.success for u in uap_parts])
        run.timings["uap"] = time.perf_counter() - t
        t = time.perf_counter()
        parts = in_class_groups(
            lambda sl: refine(
                run.net,
                x,
                y,
                targets[sl],
                v[sl],
                success[sl] < settings.theta,
                form=settings.form,
                steps=settings.steps,
                lr=settings.lr,
                betas=settings.betas,
                batch=settings.batch_size,
                w0=settings.w0,
                mask_cost=settings.mask_cost,
                init_cost=settings.init_cost,
                progress=run.step("refine", sl, n),
            ),
            n,
            run.group,
        )
        run.timings["refine"] = time.perf_counter() - t
    else:
        from ..baselines.nc import neural_cleanse

        v = torch.zeros(n, *x.shape[1:], device=dev)
        success = torch.full((n,), float("nan"), device=dev)
        parts = in_class_groups(
            lambda sl: neural_cleanse(
                run.net,
                x,
                y,
                targets[sl],
                steps=settings.steps,
                lr=settings.lr,
                batch=settings.batch_size,
                init_cost=settings.init_cost,
                progress=run.step("nc", sl, n),
            ),
            n,
            run.group,
        )
        run.timings["nc"] = time.perf_counter() - t
    refined = Refined.concat(parts)
    check_search(ready.evidence, success if settings.method == "usb" else None, refined.asr, settings.asr_min)
    l1, asr = refined.l1.cpu().numpy(), refined.asr.cpu().numpy()
    uap_norms = norm_of(v, settings.norm).cpu().numpy()
    decided = decided_evidence(settings.decided_on, uap_norms, staging.weights)
    index, ratio = class_evidence(l1, uap_norms, decided, settings.scale, staging.weights)
    if decided != settings.decided_on:
        ready.evidence.notes.append(
            f"Alg. 1's UAPs all came out the same size (every one at the {settings.norm} bound --delta "
            f"{settings.delta:g}?), so they told no class apart: the classes were decided on the refined triggers alone"
        )
    threshold = class_threshold(settings.threshold, run.k, settings.threshold_classes)
    flagged = flag(index, ratio, asr, threshold=threshold, asr_min=settings.asr_min, max_ratio=settings.max_ratio)
    named = name_targets(index, flagged, threshold=threshold, share=settings.target_share)
    names = ready.labels
    classes = [
        ClassResult(
            cls=c,
            name=names[c] if names else None,
            uap_success=_num(success[i]),
            uap_norm=float(uap_norms[i]),
            l1_norm=float(l1[i]),
            size_ratio=float(ratio[i]),
            anomaly_index=float(index[i]),
            asr=float(asr[i]),
            flagged=bool(flagged[i]),
            target=bool(named[i]),
            role=staging.roles[i],
            stage1_rank=staging.rank(c),
            weight=staging.weights[i],
        )
        for i, c in enumerate(staging.refined)
    ]
    margin = _universal_margin(index, named, ratio, asr, l1, uap_norms, threshold, settings, decided, staging.weights)
    return _Universal(v, success, refined, classes, threshold, margin)


def _other_families(
    run: _Scan, refined: list[int], weights: list[float], universal: list[int], extra: Batch | None = None
) -> FamilyScan:
    """The pairs and warp families (usb/families.py), each timed, on the scan's samples and predictions (the pairs
    also on `extra`, the samples read for classes the model seldom predicts); the warps on the refined classes, each
    weighted in the median as the staged scan weights it (`Staging.weights`)."""
    result = FamilyScan()
    settings = run.settings
    if "pairs" in settings.covers:
        t = time.perf_counter()
        x, y = run.x, run.y
        if extra is not None and extra.y is not None:
            x, y = torch.cat([x, extra.x]), torch.cat([y, extra.y])  # on the scan's device already (`prepare`)
        scan_pairs(
            run.net,
            x,
            y,
            run.k,
            settings=settings,
            universal_targets=universal,
            group=run.group,
            progress=run.step("pairs"),
            result=result,
        )
        run.timings["pairs"] = time.perf_counter() - t
    if "warp" in settings.covers:
        t = time.perf_counter()
        scan_warps(
            run.net,
            run.x,
            run.y,
            refined,
            run.k,
            settings=settings,
            group=run.group,
            weights=weights,
            progress=run.step("warp"),
            result=result,
        )
        run.timings["warp"] = time.perf_counter() - t
    return result


def _universal_margin(
    index: np.ndarray,
    named: np.ndarray,
    ratio: np.ndarray,
    asr: np.ndarray,
    l1: np.ndarray,
    uap_norms: np.ndarray,
    threshold: float,
    settings: ScanSettings,
    decided: SizeEvidence,
    weights: Weights = None,
) -> float:
    """USB's margin: past the threshold for named targets; otherwise the closest class's distance to being flagged,
    counting the size guard as well as the threshold (both in anomaly-index units) of the sizes `decided` on, each
    unit the spread the index itself was measured against (weighted in a staged scan)."""
    if np.any(named):
        return float(np.min(index[np.asarray(named)]) - threshold)
    if decided == "combined":  # shrinking both sizes by f moves the mean index by the mean of the rates
        sigma = 2 / (1 / spread(l1, weights) + 1 / spread(uap_norms, weights))
    else:
        sigma = spread(uap_norms if decided == "uap" else l1, weights)
    distance = flip_distance(
        index, ratio, asr, threshold=threshold, asr_min=settings.asr_min, max_ratio=settings.max_ratio, sigma=sigma
    )
    finite = distance[np.isfinite(distance)]
    return float(np.min(finite)) if finite.size else float(threshold)


def _overall_margin(margins: dict[str, float], fired: bool, universal_fired: bool, families: FamilyScan) -> float:
    """Backdoor: the most robust family that fired (all must flip for the verdict to); clean: the family closest
    to firing."""
    if fired:
        fired_families = {"universal"} if universal_fired else set()
        fired_families |= {"pairs" if f.source is not None else "warp" for f in families.findings}
        return float(max(margins[f] for f in fired_families if f in margins))
    finite = [m for m in margins.values() if np.isfinite(m)]
    return float(min(finite)) if finite else 0.0


def class_group(
    model: nn.Module, x: torch.Tensor, k: int, settings: ScanSettings, device: torch.device, limits: Limits | None
) -> tuple[int, dict]:
    """Classes per batch: `settings.class_group` when given, else as many as the memory budget holds."""
    per_class_samples = settings.batch_size  # the refinement's (and NC's) batch; Alg. 1 takes one sample a step
    if settings.class_group is not None:
        return min(settings.class_group, k), {"class_group": min(settings.class_group, k), "chosen_by": "setting"}
    per_sample = bytes_per_sample(model, x)
    budget = memory_budget(device, None if limits is None else limits.max_memory, available_memory())
    group = auto_class_group(per_sample, per_class_samples, k, budget)
    return group, {"class_group": group, "chosen_by": "memory", "bytes_per_sample": per_sample}


def _inconclusive(ready: Prepared, data: str | Path, settings: ScanSettings, timings: dict, t0: float) -> ModelScan:
    """The scan stopped before its search: what was measured, and no classes."""
    c, h, w = ready.spec.shape
    empty = torch.zeros(0, c, h, w)
    timings["total"] = time.perf_counter() - t0
    samples = 0 if ready.samples is None else int(ready.samples.x.shape[0])
    return ModelScan(
        verdict="inconclusive",
        target_classes=[],
        classes=[],
        settings=settings,
        model=ready.model_info(),
        input=ready.spec,
        device=str(ready.device),
        data={
            "path": str(data),
            "samples": samples,
            "labels_from": None if ready.samples is None else ready.samples.labels_from,
        },
        timings={key: round(val, 3) for key, val in timings.items()},
        triggers=empty,
        masks=empty,
        stamped=empty,
        uaps=empty,
        evidence=ready.evidence,
        form=settings.trigger_form,
    )


def _num(value: torch.Tensor) -> float | None:
    number = float(value)
    return None if np.isnan(number) else number


def _examples(x: torch.Tensor, y: torch.Tensor, classes: list[int], refined: Refined) -> torch.Tensor:
    """For each refined class t, the first clean sample not predicted as t, stamped with t's reversed trigger."""
    out = []
    for j, t in enumerate(classes):
        others = (y != t).nonzero()
        i = int(others[0]) if len(others) else 0
        out.append(stamp(x[i : i + 1], refined.trigger[j : j + 1], refined.mask[j : j + 1], refined.form)[0, 0])
    return torch.stack(out)
