"""`filter_dataset`: one untargeted L-inf UAP from clean images, then the UAP-consistency rule over an input.

Classes whose clean samples survive that UAP (its dominant labels) get a UAP of their own and a survival margin
calibrated on their clean samples (`rule.UapRule`), so that surviving means carrying a trigger rather than
already having the UAP's label.

Sanitising a training set and screening single inputs are the same call: INPUT is a folder, an `.npz` or one
image. The input is streamed in chunks and never modified; `copy_to` writes copies sorted into kept/ and flagged/.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..baselines.strip import strip_entropy, strip_threshold
from ..core.device import DEFAULT_DEVICE
from ..core.errors import ExitCode, ScanError
from ..core.seeding import seeded
from ..core.settings import FilterSettings
from ..loading import ModelSource, Source, iter_images, open_source, prepare
from ..loading.evidence import Evidence
from ..loading.samples import FolderSource
from ..loading.setup import Prepared
from ..perturb import untargeted_uap
from ..perturb.uap import UntargetedUAP
from ..report.trigger_file import load_triggers
from ..report.uap_file import UapFile, load_uap, save_uap
from ..safety.limits import Limits
from ..safety.paths import ensure_outside
from .erase import EraseRule, erase_flags, erase_rule
from .rule import UapRule, survival_margins, uap_rule

Progress = Callable[[str, int, int], None]
MIN_CLASS_SAMPLES = 5  # clean samples of a class needed to calibrate its threshold
ERASE_CLEAN_MAX = 0.5  # erasure: the share of a target's clean samples it may flag before it says nothing


@dataclass
class ScreenedItem:
    """One screened image."""

    id: str
    label: int | None
    prediction: int
    prediction_perturbed: int | None  # None for STRIP
    score: float | None  # STRIP entropy; None for the UAP rule
    flagged: bool


@dataclass
class FilterResult:
    """Outcome of a screening: counts, per-class summary, every item, and the UAP that was used."""

    input: str
    method: str
    total: int
    flagged: int
    epsilon: float | None
    fooling_rate: float | None
    items: list[ScreenedItem]
    per_class: list[dict]
    suspected_target: int | None
    model: dict
    triggers: list[dict] = field(default_factory=list)  # --method erase: the scan's triggers it undid
    rule: UapRule | None = field(default=None, repr=False)  # the UAP, class UAPs and margins it screened with
    survival: torch.Tensor | None = field(default=None, repr=False)  # per class: clean survival rate of the UAP
    threshold: float | None = None
    skipped: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    evidence: Evidence = field(default_factory=Evidence)  # the checks behind "inconclusive", as for a model scan

    @property
    def verdict(self) -> str:
        """ "inconclusive" (the screen could not measure the model: see `reasons`), "flagged" or "clean"."""
        return "inconclusive" if self.evidence.failures else "flagged" if self.flagged else "clean"

    @property
    def reasons(self) -> list[str]:
        """Why the screen is inconclusive (empty otherwise)."""
        return self.evidence.reasons

    @property
    def exit_code(self) -> int:
        """0 when nothing is flagged, 1 otherwise, 3 when inconclusive (as `ModelScan.exit_code`)."""
        if self.verdict == "inconclusive":
            return int(ExitCode.INCONCLUSIVE)
        return int(ExitCode.BACKDOOR if self.flagged else ExitCode.CLEAN)

    def to_dict(self, items: bool = True) -> dict:
        """The JSON form (schema `backdoorscan.filter/1`)."""
        out = {
            "schema": "backdoorscan.filter/1",
            "verdict": self.verdict,
            "reasons": self.reasons,
            "notes": self.evidence.notes,
            "evidence": self.evidence.checks,
            "input": self.input,
            "method": self.method,
            "total": self.total,
            "flagged": self.flagged,
            "epsilon": self.epsilon,
            "fooling_rate": self.fooling_rate,
            "threshold": self.threshold,
            "dominant_classes": [] if self.rule is None else self.rule.dominant,
            "thresholds": None if self.rule is None else [round(float(t), 4) for t in self.rule.thresholds],
            "suspected_target": self.suspected_target,
            "triggers": self.triggers,
            "per_class": self.per_class,
            "model": self.model,
            "skipped": self.skipped,
            "timings": self.timings,
        }
        if items:
            out["items"] = [
                {
                    "id": i.id,
                    "label": i.label,
                    "prediction": i.prediction,
                    "prediction_perturbed": i.prediction_perturbed,
                    "score": i.score,
                    "flagged": i.flagged,
                }
                for i in self.items
            ]
        return out


def minimal_epsilon(
    model: nn.Module,
    x: torch.Tensor,
    settings: FilterSettings,
    hi: float = 1.0,
    rounds: int = 6,
    progress: Progress | None = None,
) -> UntargetedUAP:
    """Bisect the smallest L-inf radius whose UAP reaches the fooling rate (Xue et al.'s minimal perturbation)."""
    best = _uap(model, x, settings, hi, None)
    if best.fooling_rate < settings.fooling_rate:
        raise ScanError(
            f"no UAP with L-inf radius up to {hi} reaches fooling rate {settings.fooling_rate}",
            hint="lower --fooling-rate or give --epsilon",
        )
    lo = 0.0
    for r in range(rounds):
        mid = (lo + hi) / 2
        uap = _uap(model, x, settings, mid, None)
        if uap.fooling_rate >= settings.fooling_rate:
            best, hi = uap, mid
        else:
            lo = mid
        if progress is not None:
            progress("epsilon", r + 1, rounds)
    return best


def _uap(
    model: nn.Module, x: torch.Tensor, settings: FilterSettings, eps: float, progress: Callable[[int, int], None] | None
) -> UntargetedUAP:
    return untargeted_uap(
        model,
        x,
        epsilon=eps,
        p="linf",
        target_rate=settings.fooling_rate,
        max_passes=settings.max_passes,
        overshoot=settings.overshoot,
        max_iter=settings.deepfool_iter,
        solver=settings.solver,
        progress=progress,
    )


def filter_dataset(
    model: str | Path | nn.Module | ModelSource,
    clean: str | Path | None,
    inputs: str | Path,
    *,
    settings: FilterSettings | None = None,
    uap_file: str | Path | None = None,
    save_uap_to: str | Path | None = None,
    copy_to: str | Path | None = None,
    triggers: str | Path | None = None,
    device: str | torch.device = DEFAULT_DEVICE,
    progress: Progress | None = None,
    limits: Limits | None = None,
) -> FilterResult:
    """Screen every image of `inputs`: by default flagged when its prediction survives the UAP (Xue et al.); with
    `method="erase"`, when undoing one of the triggers a model scan named (`triggers`: its triggers.safetensors)
    moves it off that trigger's target (`erase.py`); with `method="strip"`, by STRIP's entropy.

    `model` is a checkpoint path, a module, or a `ModelSource`. Nothing is written inside `inputs` (copies and
    UAP files there are refused). The result is **inconclusive** (exit code 3, `reasons`), as a model scan's is,
    when the model cannot be measured (see `loading/evidence.py`) or no UAP reaches half the fooling-rate target:
    then survival says nothing about triggers.
    """
    settings = settings or FilterSettings()
    with seeded(settings.seed):
        return _filter_dataset(
            model,
            clean,
            inputs,
            settings=settings,
            uap_file=uap_file,
            save_uap_to=save_uap_to,
            copy_to=copy_to,
            triggers=triggers,
            device=device,
            progress=progress,
            limits=limits,
        )


@dataclass
class _Rule:
    """How inputs are judged: the UAP rule (with its radius, fooling rate and clean survival) or STRIP's threshold."""

    uap: UapRule | None = None
    epsilon: float | None = None
    fooling_rate: float | None = None
    survival: torch.Tensor | None = None  # per class: share of clean samples the rule flags
    strip_threshold: float | None = None
    generator: torch.Generator | None = None  # STRIP's blends
    erase: EraseRule | None = None  # a scan's triggers to undo
    triggers: list[dict] = field(default_factory=list)  # what they are, for the report


def _filter_dataset(
    model: str | Path | nn.Module | ModelSource,
    clean: str | Path | None,
    inputs: str | Path,
    *,
    settings: FilterSettings,
    uap_file: str | Path | None,
    save_uap_to: str | Path | None,
    copy_to: str | Path | None,
    triggers: str | Path | None,
    device: str | torch.device,
    progress: Progress | None,
    limits: Limits | None,
) -> FilterResult:
    """`filter_dataset`'s steps, run with torch's generators seeded (and restored afterwards by the caller)."""
    if (settings.method == "erase") != (triggers is not None):
        raise ScanError(
            "--method erase screens with the triggers a model scan named, and only it reads them",
            hint="give both --method erase and --triggers DIR/triggers.safetensors (`backdoorscan model --out DIR`)",
        )
    if clean is None and uap_file is None:
        raise ScanError("give clean samples to compute the UAP from, or a stored UAP")
    if clean is None and settings.method in ("strip", "erase"):
        raise ScanError(f"{settings.method} needs clean samples")
    for output in (copy_to, save_uap_to):
        ensure_outside(output, inputs)
    source = ModelSource.of(model)
    t0 = time.perf_counter()
    ready = prepare(
        source,
        clean if clean is not None else inputs,
        samples=settings.samples if clean is not None else 1,
        seed=settings.seed,
        device=device,
        limits=limits,
    )
    # Without clean samples (a stored UAP), only the checks that need no labelled clean data apply.
    applicable = {"single_logits_output", "input_gradient"} if clean is None else set(ready.evidence.checks)
    evidence = Evidence(
        checks={n: c for n, c in ready.evidence.checks.items() if n in applicable},
        failures={n: r for n, r in ready.evidence.failures.items() if n in applicable},
        notes=list(ready.evidence.notes) if clean is not None else [],
    )
    sha = ready.loaded.sha256 if ready.loaded is not None else None
    info = {"path": str(ready.loaded.path) if ready.loaded else None, "sha256": sha, "num_classes": ready.num_classes}
    if not evidence.ok or ready.samples is None:
        return _inconclusive(inputs, settings, info, evidence, t0)
    timings = {"load": time.perf_counter() - t0}
    t = time.perf_counter()
    if settings.method == "uap":
        rule = _uap_rule(
            ready.model,
            ready.samples.x,
            ready.num_classes,
            settings,
            uap_file,
            sha,
            ready.spec.shape,
            ready.device,
            progress,
            evidence,
        )
        if rule.uap is None:
            return _inconclusive(inputs, settings, info, evidence, t0)
        if save_uap_to is not None:
            save_uap(
                Path(save_uap_to),
                UapFile(
                    v=rule.uap.v,
                    thresholds=rule.uap.thresholds,
                    class_v=rule.uap.class_v,
                    epsilon=float(rule.epsilon or 0),
                    fooling_rate=float(rule.fooling_rate or 0),
                    model_sha256=sha,
                    survival=rule.survival,
                ),
            )
    elif settings.method == "erase":
        rule = _erase_rule(ready, Path(str(triggers)), sha, evidence, settings.erase_grow)
        if not evidence.ok:
            return _inconclusive(inputs, settings, info, evidence, t0)
    else:
        gen = torch.Generator().manual_seed(settings.seed)
        rule = _Rule(
            strip_threshold=strip_threshold(
                ready.model, ready.samples.x, settings.strip_frr, settings.strip_blends, gen
            ),
            survival=torch.full((ready.num_classes,), settings.strip_frr),
            generator=gen,
        )
    timings["prepare"] = time.perf_counter() - t
    t = time.perf_counter()
    images = open_source(inputs)
    items, skipped = _screen(
        ready.model, images, rule, ready.samples.x, settings, ready.spec.shape, ready.device, progress
    )
    if not items:
        raise ScanError("no readable images", path=inputs, hint="check that the files are images")
    timings["screen"] = time.perf_counter() - t
    per_class, target = summarise(items, rule.survival, settings.concentration)
    if ready.labels is not None:  # class names (--labels, a hub folder's, the clean folder's) beside the index
        for row in per_class:
            row["name"] = ready.labels[row["class"]] if 0 <= row["class"] < len(ready.labels) else None
    if copy_to is not None:
        copy_sorted(images, items, Path(copy_to))
    timings["total"] = time.perf_counter() - t0
    return FilterResult(
        input=str(inputs),
        method=settings.method,
        total=len(items),
        flagged=sum(i.flagged for i in items),
        epsilon=rule.epsilon,
        fooling_rate=rule.fooling_rate,
        items=items,
        per_class=per_class,
        suspected_target=target,
        triggers=rule.triggers,
        threshold=rule.strip_threshold,
        model={
            "path": str(ready.loaded.path) if ready.loaded else None,
            "sha256": sha,
            "num_classes": ready.num_classes,
        },
        rule=None if rule.uap is None else rule.uap.to("cpu"),
        skipped=skipped,
        survival=None if rule.uap is None or rule.survival is None else rule.survival.cpu(),
        timings={key: round(val, 3) for key, val in timings.items()},
    )


def _inconclusive(
    inputs: str | Path, settings: FilterSettings, model: dict, evidence: Evidence, t0: float
) -> FilterResult:
    """The screen stopped before judging any input: what was measured, and why not further."""
    return FilterResult(
        input=str(inputs),
        method=settings.method,
        total=0,
        flagged=0,
        epsilon=None,
        fooling_rate=None,
        items=[],
        per_class=[],
        suspected_target=None,
        model=model,
        evidence=evidence,
        timings={"total": round(time.perf_counter() - t0, 3)},
    )


def _uap_rule(
    net: nn.Module,
    x: torch.Tensor,
    k: int,
    settings: FilterSettings,
    uap_file: str | Path | None,
    sha: str | None,
    shape: tuple[int, int, int],
    dev: torch.device,
    progress: Progress | None,
    evidence: Evidence,
) -> _Rule:
    """The UAP rule: read from a stored UAP file (checked against this model), or computed and calibrated on x."""
    if uap_file is not None:
        stored = load_uap(Path(uap_file), sha, shape)
        if len(stored.thresholds) != k:
            raise ScanError(
                f"the UAP file has thresholds for {len(stored.thresholds)} classes; the model has {k}", path=uap_file
            )
        return _Rule(
            UapRule(stored.v, stored.thresholds, stored.class_v).to(dev),
            stored.epsilon,
            stored.fooling_rate,
            stored.survival,
        )
    step = None if progress is None else (lambda d, n: progress("uap", d, n))
    uap = (
        minimal_epsilon(net, x, settings, progress=progress)
        if settings.epsilon is None
        else _uap(net, x, settings, settings.epsilon, step)
    )
    evidence.record(
        "uap_fooling_rate",
        uap.fooling_rate >= 0.5 * settings.fooling_rate,
        f"the UAP changes only {uap.fooling_rate:.0%} of clean predictions (target {settings.fooling_rate:.0%}): "
        "survival would not tell triggers apart",
        fooling_rate=round(uap.fooling_rate, 4),
        epsilon=round(uap.epsilon, 4),
    )
    if not evidence.ok:
        return _Rule(None, uap.epsilon, uap.fooling_rate)
    rule = calibrate(net, x, uap.v, k, settings, uap.epsilon)
    return _Rule(rule, uap.epsilon, uap.fooling_rate, clean_survival(net, x, rule, k))


def _erase_rule(ready: Prepared, path: Path, sha: str | None, evidence: Evidence, grow: int) -> _Rule:
    """The erasure rule for a scan's triggers (checked against this model), with its flag rate on the clean
    samples per class; a target whose clean samples it mostly flags makes the screen inconclusive."""
    if ready.samples is None or ready.predictions is None:  # the caller stops earlier; this keeps the types honest
        raise ScanError("the erasure rule needs clean samples and the model's predictions of them")
    net, x, k = ready.model, ready.samples.x, ready.num_classes
    _, height, width = ready.spec.shape
    found = load_triggers(path, sha, (height, width), k)
    if found.warp_targets:
        evidence.notes.append(
            f"the scan's warp triggers (targets {', '.join(map(str, found.warp_targets))}) are not screened: "
            "reversing the warp the scan found does not undo a planted one (docs/results.md)"
        )
    evidence.record(
        "erase_patches",
        bool(found.targets),
        "the triggers file holds only warps, which erasing cannot undo: nothing to screen with",
        patches=len(found.targets),
    )
    if not found.targets:
        return _Rule(triggers=found.describe())
    rule = erase_rule(net, found, x, ready.predictions, grow).to(x.device)
    before, _, flagged = erase_flags(net, x, rule)
    rate, _ = class_flag_rates(before, flagged, k)  # 0 for a class no clean sample was predicted as
    targets = sorted(set(found.targets))
    worst = max(targets, key=lambda t: float(rate[t]))
    evidence.record(
        "erase_clean_flags",
        float(rate[worst]) <= ERASE_CLEAN_MAX,
        f"erasing the scan's patches moves {float(rate[worst]):.0%} of the clean samples of class {worst} off it: "
        "a flag would not tell a trigger from the class's own features",
        worst_class=worst,
        rate=round(float(rate[worst]), 4),
    )
    described = found.describe()  # patches first, then warps
    for entry, grow in zip(described, rule.grow, strict=False):
        entry["region_grow"] = grow
    return _Rule(erase=rule, survival=rate, triggers=described)


def _screen(
    net: nn.Module,
    images: Source,
    rule: _Rule,
    clean_x: torch.Tensor,
    settings: FilterSettings,
    shape: tuple[int, int, int],
    dev: torch.device,
    progress: Progress | None,
) -> tuple[list[ScreenedItem], list[str]]:
    """Every input judged by the rule, in batches; unreadable files listed, not screened."""
    items: list[ScreenedItem] = []
    skipped: list[str] = []
    done = 0
    for batch in iter_images(images, shape, settings.batch_size, skipped=skipped):
        x = batch.x.to(dev)
        scores: list[float | None]
        after_list: list[int | None]
        if rule.uap is not None:
            before, after, flags = uap_rule(net, x, rule.uap)
            scores, after_list = [None] * len(x), after.tolist()
        elif rule.erase is not None:
            before, after, flags = erase_flags(net, x, rule.erase)
            scores, after_list = [None] * len(x), after.tolist()
        else:
            with torch.no_grad():
                before = net(x).argmax(1)
            ent = strip_entropy(net, x, clean_x, settings.strip_blends, rule.generator)
            flags, scores, after_list = ent < float(rule.strip_threshold or 0), ent.tolist(), [None] * len(x)
        labels = batch.y.tolist() if batch.y is not None else [None] * len(x)
        for i, ident in enumerate(batch.ids):
            items.append(ScreenedItem(ident, labels[i], int(before[i]), after_list[i], scores[i], bool(flags[i])))
        done += len(x)
        if progress is not None:
            progress("screen", done, len(images))
    return items, skipped


def calibrate(
    model: nn.Module, x: torch.Tensor, v: torch.Tensor, k: int, settings: FilterSettings, epsilon: float
) -> UapRule:
    """The rule for UAP v: per dominant class, its own UAP and the margin that counts as a trigger.

    A class is dominant when more than `class_survival` of its clean samples (at least `MIN_CLASS_SAMPLES`)
    survive v. Its UAP is computed from those samples at the same radius; its margin is the one that only
    `margin_share` of them exceed. `class_survival` 1 is the paper's rule for every class.
    """
    before, _, margin = survival_margins(model, x, v)
    rule = UapRule(v, torch.zeros(k, device=x.device))
    for c in range(k):
        own = before == c
        if int(own.sum()) < MIN_CLASS_SAMPLES or float((margin[own] > 0).float().mean()) <= settings.class_survival:
            continue
        rule.class_v[c] = _uap(model, x[own], settings, epsilon, None).v
        rule.thresholds[c] = torch.quantile(margin[own], 1 - settings.margin_share).clamp_min(0)
    return rule


@torch.no_grad()
def clean_survival(model: nn.Module, x: torch.Tensor, rule: UapRule, k: int) -> torch.Tensor:
    """Per predicted class, the share of clean samples the screen flags: how many flags a class would get
    without any trigger."""
    before, _, flagged = uap_rule(model, x, rule)
    rate, seen = class_flag_rates(before, flagged, k)
    return torch.where(seen > 0, rate, torch.ones(k))


def class_flag_rates(before: torch.Tensor, flagged: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted class: the share of the samples predicted as it that a rule flags (0 where none is), and how
    many there are."""
    seen = torch.zeros(k).index_add_(0, before.cpu(), torch.ones(len(before)))
    kept = torch.zeros(k).index_add_(0, before.cpu(), flagged.float().cpu())
    return kept / seen.clamp_min(1), seen


def summarise(
    items: list[ScreenedItem], survival: torch.Tensor | None, concentration: float
) -> tuple[list[dict], int | None]:
    """Images, flags and flags expected without a trigger, per predicted class; and the likely target.

    The likely target is the class with the most flags beyond what clean data predicts, when it holds at least
    `concentration` of all flags: triggered inputs of every class pile up on the backdoor's target.
    """
    images = Counter(i.prediction for i in items)
    flags = Counter(i.prediction for i in items if i.flagged)
    rows = []
    for c in sorted(images):
        rate = float(survival[c]) if survival is not None and c < len(survival) else 0.0
        rows.append(
            {"class": c, "images": images[c], "flagged": flags.get(c, 0), "expected": round(images[c] * rate, 1)}
        )
    total = sum(flags.values())
    if total < 2:
        return rows, None
    top = max(rows, key=lambda r: r["flagged"] - r["expected"])
    excess = top["flagged"] - top["expected"]
    return rows, (int(top["class"]) if excess >= concentration * total else None)


def copy_sorted(source: Source, items: list[ScreenedItem], dest: Path) -> None:
    """Copies into dest/kept and dest/flagged: files keep their relative paths; .npz rows become two .npz files."""
    if isinstance(source, FolderSource):
        by_id = dict(zip(source.ids, source.files, strict=True))
        for item in items:
            target = dest / ("flagged" if item.flagged else "kept") / item.id
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(by_id[item.id], target)
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name, want in (("kept", False), ("flagged", True)):
        rows = np.array([int(i.id) for i in items if i.flagged == want], dtype=np.int64)
        blocks = [b for _, b in source.blocks(4096, rows)] if len(rows) else []
        x = np.concatenate(blocks) if blocks else np.zeros((0, *source.shape[1:]), dtype=source.dtype)
        arrays: dict[str, Any] = {"x": x, "index": rows}
        if source.y is not None:
            arrays["y"] = source.y[rows]
        np.savez_compressed(dest / f"{name}.npz", **arrays)
