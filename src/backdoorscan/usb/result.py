"""What a model scan returns: the verdict, the per-class figures, and the JSON report they make."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .. import __version__
from ..core.choices import Form
from ..core.errors import ExitCode
from ..core.settings import ScanSettings
from ..loading import InputSpec
from ..loading.evidence import Evidence
from ..report.trigger_file import TriggerFile
from .families import FamilyScan
from .staging import Staging


@dataclass
class ClassResult:
    """The figures for one candidate target class."""

    cls: int
    name: str | None
    uap_success: float | None  # None for Neural Cleanse (no Alg. 1)
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
    form: Form = "blend"  # how `triggers` and `masks` are stamped (see perturb/triggers.py)
    evidence: Evidence = field(default_factory=Evidence)
    batching: dict = field(default_factory=dict)  # classes per batch and the memory figures that chose it
    staging: Staging | None = None  # which classes were refined and why (None when the scan stopped early)
    families: FamilyScan | None = None  # pairs and warps (usb/families.py); None when only universal triggers
    sandbox: dict | None = None  # the confinement layers the scanning process held (safety/confine.py)

    @property
    def covered(self) -> list[str]:
        """The families the verdict speaks for: those asked for that the samples let the scan measure."""
        missing = self.families.not_measured if self.families is not None else {}
        return [f for f in self.settings.covers if f not in missing]

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
        return (
            f"threshold {self.threshold:.2f} for {k} classes ({self.settings.threshold:g} up to "
            f"{self.settings.threshold_classes}, raised so a clean model is as likely to cross it)"
        )

    @property
    def exit_code(self) -> int:
        """0 when clean, 1 when a backdoor is suspected, 3 when inconclusive."""
        return int(
            {"backdoor": ExitCode.BACKDOOR, "inconclusive": ExitCode.INCONCLUSIVE}.get(self.verdict, ExitCode.CLEAN)
        )

    def found_triggers(self) -> TriggerFile | None:
        """Every trigger the verdict names, for the screen's erasure rule (`report/trigger_file.py`); None when the
        scan names none. A universal target's region is its mask (the trigger times the mask in the paper's form,
        which masks the whole image); a pair's its patch's mask; a warp is its control grid."""
        if self.verdict != "backdoor":
            return None
        regions: list[torch.Tensor] = []
        targets: list[int] = []
        sources: list[int] = []
        kinds: list[str] = []

        def add(region: torch.Tensor, family: str, target: int, source: int | None) -> None:
            region = region.detach().float().cpu().abs().mean(0, keepdim=True)
            regions.append(region / region.max().clamp_min(1e-12))
            kinds.append(family)
            targets.append(int(target))
            sources.append(-1 if source is None else int(source))

        for i, c in enumerate(self.classes):
            if c.target:
                region = self.triggers[i] * self.masks[i] if self.form == "paper" else self.masks[i]
                add(region, "universal", c.cls, None)
        warps, warp_targets = [], []
        fam = self.families
        if fam is not None:
            # a mapping the shared patch flagged is undone by that one patch: each pair's own patch too would give
            # a clean input of every target a second chance to be moved (on held-out batch 12, FRR 6-12 % against
            # 1-6 % with the shared patch alone, the same triggered inputs caught)
            shared = (
                fam.shared_decision.mapped if fam.shared_decision is not None and fam.shared_decision.flagged else []
            )
            pairs = fam.pairs
            where = {p: i for i, p in enumerate(pairs.pairs)} if pairs is not None else {}
            for f in fam.findings:
                if f.family == "warp" and fam.warps is not None and f.target in fam.warps.targets:
                    warps.append(fam.warps.control[fam.warps.targets.index(f.target)].detach().float().cpu())
                    warp_targets.append(f.target)
                elif pairs is not None and f.source is not None and (f.source, f.target) not in shared:
                    row = where.get((f.source, f.target))
                    if row is not None:
                        add(pairs.mask[row], f.family, f.target, f.source)
            if fam.shared is not None:
                for s, t in shared:
                    add(fam.shared.mask, "shared", t, s)
        if not regions and not warps:
            return None
        h, w = self.input.height, self.input.width
        return TriggerFile(
            regions=torch.stack(regions) if regions else torch.zeros(0, 1, h, w),
            targets=targets,
            sources=sources,
            families=kinds,
            warps=torch.stack(warps) if warps else torch.zeros(0, 2, 1, 1),
            warp_targets=warp_targets,
            model_sha256=self.model.get("sha256"),
        )

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
            "notes": self.evidence.notes,
            "evidence": self.evidence.checks,
            "model": self.model,
            "data": self.data,
            "input": {
                "channels": self.input.channels,
                "height": self.input.height,
                "width": self.input.width,
                "mean": self.input.mean,
                "std": self.input.std,
                "model_size": list(self.input.model_size) if self.input.model_size else None,
            },
            "settings": asdict(self.settings),
            "classes": [{"class": c.cls, **{k: v for k, v in asdict(c).items() if k != "cls"}} for c in self.classes],
            "device": self.device,
            "batching": self.batching,
            "staging": None if self.staging is None else self.staging.to_dict(),
            "timings": self.timings,
            "families": {
                "covered": self.covered,
                **(self.families.to_dict() if self.families is not None else {}),
            },
            "sandbox": self.sandbox,
        }
