"""`scan_model`: load -> targeted UAPs (Alg. 1) -> refinement (Alg. 2) -> decision, returned as a `ModelScan`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .batching import auto_class_group, bytes_per_sample, in_class_groups, memory_budget
from .choices import Form
from .decide import class_evidence, class_threshold, flag, name_targets
from .device import DEFAULT_DEVICE
from .errors import ExitCode
from .evidence import Evidence, check_search
from .loading import InputSpec, ModelSource, Prepared, prepare
from .perturb import norm_of, targeted_uaps
from .refine import refine
from .safety.limits import Limits, available_memory
from .seeding import seeded
from .settings import ScanSettings
from .staging import Staging, plan
from .triggers import Refined, stamp
from .usb.families import FamilyScan, flip_distance, scan_pairs, scan_warps, spread

Progress = Callable[[str, int, int], None]


@dataclass
class ClassResult:
    """The figures for one candidate target class."""

    cls: int
    name: str | None
    uap_success: float
    uap_norm: float
    l1_norm: float
    size_ratio: float  # the decision's size (settings.evidence) / its median over the classes
    anomaly_index: float  # of the decision's size
    asr: float
    flagged: bool  # over the threshold and past the guards: the verdict is "backdoor" when any class is
    target: bool = False  # flagged and named a backdoor target (decide.name_targets)
    role: str = "all"  # why it was refined: "all", or in a staged scan "suspect" / "reference"
    stage1_rank: int | None = None  # its rank in stage 1 (0: most suspect); None without a stage 1
    weight: float = 1.0  # how many classes it stands for in the median and MAD

    @property
    def flag_word(self) -> str:
        """The tables' flagged column: "target", "weaker" (flagged, not named: decide.name_targets) or empty."""
        return "target" if self.target else "weaker" if self.flagged else ""


@dataclass
class ModelScan:
    """The outcome of a scan: verdict, per-class figures, what was scanned, and the reversed triggers."""

    verdict: str  # "backdoor", "clean" or "inconclusive" (the scan could not measure the model; see `reasons`)
    target_classes: list[int]
    classes: list[ClassResult]
    settings: ScanSettings
    model: dict
    data: dict
    input: InputSpec
    device: str
    timings: dict[str, float]
    # one row per entry of `classes` (the refined classes; all K unless the scan was staged):
    triggers: torch.Tensor = field(repr=False)  # (N, C, H, W) pattern / trigger
    masks: torch.Tensor = field(repr=False)  # (N, C, H, W)
    stamped: torch.Tensor = field(repr=False)  # (N, C, H, W) a clean sample with each reversed trigger
    uaps: torch.Tensor = field(repr=False)  # (N, C, H, W) the targeted UAPs of Alg. 1
    margin: float | None = None  # anomaly-index units between the verdict and its flip, over every family
    threshold: float | None = None  # the anomaly-index threshold used for this model's K (decide.class_threshold)
    form: Form = "blend"  # how `triggers` and `masks` are stamped (see triggers.py)
    evidence: Evidence = field(default_factory=Evidence)
    batching: dict = field(default_factory=dict)  # classes per batch and the memory figures that chose it
    staging: Staging | None = None  # which classes were refined and why (None when the scan stopped early)
    families: FamilyScan | None = None  # pairs and warps (usb/families.py); None when only universal triggers
    sandbox: dict | None = None  # the confinement layers the scanning process held (safety/confine.py)

    @property
    def reasons(self) -> list[str]:
        """Why the verdict is inconclusive (empty otherwise)."""
        return self.evidence.reasons

    @property
    def threshold_note(self) -> str:
        """A line on the threshold, when it was raised for this model's number of classes (else empty)."""
        if self.threshold is None or self.threshold == self.settings.threshold:
            return ""
        k = self.staging.num_classes if self.staging is not None else len(self.classes)
        return (f"threshold {self.threshold:.2f} for {k} classes ({self.settings.threshold:g} up to "
                f"{self.settings.threshold_classes}, raised so a clean model is as likely to cross it)")

    @property
    def exit_code(self) -> int:
        """0 when clean, 1 when a backdoor is suspected, 3 when inconclusive."""
        return int({"backdoor": ExitCode.BACKDOOR, "inconclusive": ExitCode.INCONCLUSIVE}.get(self.verdict,
                                                                                               ExitCode.CLEAN))

    def to_dict(self) -> dict:
        """The JSON report (schema `backdoorscan.model-scan/1`)."""
        return {
            "schema": "backdoorscan.model-scan/1",
            "tool": {"name": "backdoorscan", "version": __version__},
            "verdict": self.verdict,
            "target_classes": self.target_classes,
            "margin": None if self.margin is None else round(self.margin, 4),
            "threshold": None if self.threshold is None else round(self.threshold, 4),
            "reasons": self.reasons,
            "evidence": self.evidence.checks,
            "model": self.model,
            "data": self.data,
            "input": {"channels": self.input.channels, "height": self.input.height, "width": self.input.width,
                      "mean": self.input.mean, "std": self.input.std,
                      "model_size": list(self.input.model_size) if self.input.model_size else None},
            "settings": asdict(self.settings),
            "classes": [{"class": c.cls, **{k: v for k, v in asdict(c).items() if k != "cls"}} for c in self.classes],
            "device": self.device,
            "batching": self.batching,
            "staging": None if self.staging is None else self.staging.to_dict(),
            "timings": self.timings,
            "families": {"covered": list(self.settings.covers),
                         **(self.families.to_dict() if self.families is not None else {})},
            "sandbox": self.sandbox,
        }


def scan_model(model: str | Path | nn.Module | ModelSource, data: str | Path, *,
               settings: ScanSettings | None = None, device: str | torch.device = DEFAULT_DEVICE,
               progress: Progress | None = None, limits: Limits | None = None) -> ModelScan:
    """Scan one classifier for a backdoor with USB (or Neural Cleanse) and return the verdict and figures.

    `model` is a checkpoint path, a module, or a `ModelSource` saying how to load and feed it. The verdict is
    `inconclusive` when the evidence checks show the scan could not measure the model.
    """
    settings = settings or ScanSettings()
    with seeded(settings.seed):
        return _scan_model(model, data, settings=settings, device=device, progress=progress, limits=limits)


def _scan_model(model: str | Path | nn.Module | ModelSource, data: str | Path, *, settings: ScanSettings,
                device: str | torch.device, progress: Progress | None, limits: Limits | None) -> ModelScan:
    """`scan_model`'s steps, run with torch's generators seeded (and restored afterwards by the caller)."""
    t0 = time.perf_counter()
    ready = prepare(ModelSource.of(model), data, samples=settings.samples, seed=settings.seed, device=device,
                    limits=limits)
    timings = {"load": time.perf_counter() - t0}
    if not ready.evidence.ok:
        return _inconclusive(ready, data, settings, timings, t0)
    net, s, dev, k = ready.model, ready.samples, ready.device, ready.num_classes
    y = ready.predictions  # the paper's Err counts changes of f(x), so "other classes" are by prediction
    group, batching = class_group(net, s.x, k, settings, dev, limits)
    t = time.perf_counter()
    staging = plan(net, s.x, y, k, settings, group,
                   None if progress is None else lambda done, total: progress("stage1", done, total))
    if staging.mode == "staged":
        timings["stage1"] = time.perf_counter() - t
    targets = torch.tensor(staging.refined, device=dev)
    n = len(targets)
    groups = -(-n // group)

    def report(phase: str, sl: slice) -> Callable[[int, int], None] | None:
        """Progress of one class group as a share of the whole phase, so one bar (and its ETA) spans all groups."""
        if progress is None:
            return None
        first = min(sl.start // group, groups - 1)
        return lambda done, total: progress(phase, first * total + done, groups * total)

    t = time.perf_counter()
    if settings.method == "usb":
        uap_parts = in_class_groups(
            lambda sl: targeted_uaps(net, s.x, y, targets[sl], p=settings.norm, delta=settings.delta,
                                     theta=settings.theta, max_passes=settings.max_passes, stall=settings.stall,
                                     overshoot=settings.overshoot, max_iter=settings.deepfool_iter,
                                     progress=report("uap", sl)), n, group)
        v = torch.cat([u.v for u in uap_parts])
        success = torch.cat([u.success for u in uap_parts])
        timings["uap"] = time.perf_counter() - t
        t = time.perf_counter()
        parts = in_class_groups(
            lambda sl: refine(net, s.x, y, targets[sl], v[sl], success[sl] < settings.theta, form=settings.form,
                              steps=settings.steps, lr=settings.lr, betas=settings.betas,
                              batch=settings.batch_size, w0=settings.w0, mask_cost=settings.mask_cost,
                              init_cost=settings.init_cost, progress=report("refine", sl)), n, group)
        timings["refine"] = time.perf_counter() - t
    else:
        from .baselines.nc import neural_cleanse

        v = torch.zeros(n, *s.x.shape[1:], device=dev)
        success = torch.full((n,), float("nan"), device=dev)
        parts = in_class_groups(
            lambda sl: neural_cleanse(net, s.x, y, targets[sl], steps=settings.steps, lr=settings.lr,
                                      batch=settings.batch_size, init_cost=settings.init_cost,
                                      progress=report("nc", sl)), n, group)
        timings["nc"] = time.perf_counter() - t
    refined = Refined.concat(parts)
    check_search(ready.evidence, success if settings.method == "usb" else None, refined.asr, settings.asr_min)
    l1, asr = refined.l1.cpu().numpy(), refined.asr.cpu().numpy()
    uap_norms = norm_of(v, settings.norm).cpu().numpy()
    index, ratio = class_evidence(l1, uap_norms, settings.decided_on, settings.scale, staging.weights)
    rule = {"asr_min": settings.asr_min, "max_ratio": settings.max_ratio}
    threshold = class_threshold(settings.threshold, k, settings.threshold_classes)
    flagged = flag(index, ratio, asr, threshold=threshold, **rule)
    named = name_targets(index, flagged, threshold=threshold, share=settings.target_share)
    names = ready.labels
    classes = [ClassResult(cls=c, name=names[c] if names else None, uap_success=_num(success[i]),
                           uap_norm=float(uap_norms[i]), l1_norm=float(l1[i]), size_ratio=float(ratio[i]),
                           anomaly_index=float(index[i]), asr=float(asr[i]), flagged=bool(flagged[i]),
                           target=bool(named[i]),
                           role=staging.roles[i], stage1_rank=staging.rank(c), weight=staging.weights[i])
               for i, c in enumerate(staging.refined)]
    universal = [c.cls for c in classes if c.target]
    families = FamilyScan()
    if ready.evidence.ok:
        families = _other_families(net, s.x, y, k, settings, group, staging.refined, universal, progress, timings)
    families.margins["universal"] = _universal_margin(index, named, ratio, asr, l1, uap_norms, threshold, settings)
    found = [f.target for f in families.findings if f.target not in universal]
    targets_found = list(dict.fromkeys(universal + found)) if ready.evidence.ok else []
    fired = any(flagged) or bool(families.findings)
    verdict = "inconclusive" if not ready.evidence.ok else "backdoor" if fired else "clean"
    timings["total"] = time.perf_counter() - t0
    return ModelScan(
        verdict=verdict, target_classes=targets_found, classes=classes, evidence=ready.evidence,
        settings=settings, model=ready.model_info(), input=ready.spec, device=str(dev),
        data={"path": str(data), "samples": int(s.x.shape[0]), "labels_from": s.labels_from,
              "resized": s.resize_note},
        timings={key: round(val, 3) for key, val in timings.items()},
        triggers=refined.trigger.cpu(), masks=refined.mask.cpu(),
        stamped=_examples(s.x, y, staging.refined, refined).cpu(), uaps=v.cpu(), form=refined.form,
        batching=batching, staging=staging, threshold=threshold, families=families,
        margin=_overall_margin(families.margins, fired, any(flagged), families) if ready.evidence.ok else None)


def _other_families(net: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, settings: ScanSettings, group: int,
                    refined: list[int], universal: list[int], progress: Progress | None,
                    timings: dict[str, float]) -> FamilyScan:
    """The pairs and warp families (usb/families.py), each timed, on the scan's samples and predictions."""
    result = FamilyScan()
    covers = settings.covers

    def report(phase: str) -> Callable[[int, int], None] | None:
        return None if progress is None else lambda done, total: progress(phase, done, total)

    if "pairs" in covers:
        t = time.perf_counter()
        scan_pairs(net, x, y, k, settings=settings, universal_targets=universal, group=group,
                   progress=report("pairs"), result=result)
        timings["pairs"] = time.perf_counter() - t
    if "warp" in covers:
        t = time.perf_counter()
        scan_warps(net, x, y, refined, k, settings=settings, group=group, progress=report("warp"), result=result)
        timings["warp"] = time.perf_counter() - t
    return result


def _universal_margin(index: np.ndarray, named: np.ndarray, ratio: np.ndarray, asr: np.ndarray, l1: np.ndarray,
                      uap_norms: np.ndarray, threshold: float, settings: ScanSettings) -> float:
    """USB's margin: past the threshold for named targets; otherwise the closest class's distance to being flagged,
    counting the size guard as well as the threshold (both in anomaly-index units)."""
    if np.any(named):
        return float(np.min(index[np.asarray(named)]) - threshold)
    if settings.decided_on == "combined":  # shrinking both sizes by f moves the mean index by the mean of the rates
        sigma = 2 / (1 / spread(l1) + 1 / spread(uap_norms))
    else:
        sigma = spread(uap_norms if settings.decided_on == "uap" else l1)
    distance = flip_distance(index, ratio, asr, threshold=threshold, asr_min=settings.asr_min,
                             max_ratio=settings.max_ratio, sigma=sigma)
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


def class_group(model: nn.Module, x: torch.Tensor, k: int, settings: ScanSettings, device: torch.device,
                limits: Limits | None) -> tuple[int, dict]:
    """Classes per batch: `settings.class_group` when given, else as many as the memory budget holds."""
    per_class_samples = settings.batch_size  # the refinement's (and NC's) batch; Alg. 1 takes one sample a step
    if settings.class_group is not None:
        return min(settings.class_group, k), {"class_group": min(settings.class_group, k), "chosen_by": "setting"}
    per_sample = bytes_per_sample(model, x)
    budget = memory_budget(device, None if limits is None else limits.max_memory, available_memory())
    group = auto_class_group(per_sample, per_class_samples, k, budget)
    return group, {"class_group": group, "chosen_by": "memory", "bytes_per_sample": per_sample}


def _inconclusive(ready: Prepared, data: str | Path, settings: ScanSettings, timings: dict,
                  t0: float) -> ModelScan:
    """The scan stopped before its search: what was measured, and no classes."""
    c, h, w = ready.spec.shape
    empty = torch.zeros(0, c, h, w)
    timings["total"] = time.perf_counter() - t0
    samples = 0 if ready.samples is None else int(ready.samples.x.shape[0])
    return ModelScan(verdict="inconclusive", target_classes=[], classes=[], settings=settings,
                     model=ready.model_info(), input=ready.spec, device=str(ready.device),
                     data={"path": str(data), "samples": samples,
                           "labels_from": None if ready.samples is None else ready.samples.labels_from},
                     timings={key: round(val, 3) for key, val in timings.items()}, triggers=empty, masks=empty,
                     stamped=empty, uaps=empty, evidence=ready.evidence, form=settings.trigger_form)


def _num(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def _examples(x: torch.Tensor, y: torch.Tensor, classes: list[int], refined: Refined) -> torch.Tensor:
    """For each refined class t, the first clean sample not predicted as t, stamped with t's reversed trigger."""
    out = []
    for j, t in enumerate(classes):
        others = (y != t).nonzero()
        i = int(others[0]) if len(others) else 0
        out.append(stamp(x[i:i + 1], refined.trigger[j:j + 1], refined.mask[j:j + 1], refined.form)[0, 0])
    return torch.stack(out)
