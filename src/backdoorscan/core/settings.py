"""Every knob of the two pipelines, written once: defaults, allowed values (as `Literal` types) and checks.

A field with `help` is also a command-line option: the CLI builds `--samples`, `--form` and the rest from these
dataclasses, with these defaults and these choices. Settings are checked when they are made, so a library caller
gets the same refusal (exit 2 on the command line) as a user of the CLI. Free of torch, like `choices`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .choices import (
    Families,
    FilterMethod,
    Form,
    MaskCost,
    Method,
    Norm,
    Refine,
    Scale,
    SizeEvidence,
    Solver,
    check_choice,
)
from .errors import ScanError


def setting(default: Any, help: str | None = None) -> Any:
    """A settings field; with `help` it is also a CLI option of that name."""
    return field(default=default, metadata={"help": help} if help else {})


@cache
def _literals(cls: type) -> dict[str, Any]:
    return {name: tp for name, tp in get_type_hints(cls).items() if get_origin(tp) is Literal}


@dataclass(frozen=True)
class CommonSettings:
    """What both pipelines share: the clean-sample draw and the DeepFool steps inside the UAP solvers."""

    samples: int = setting(300, "Clean samples drawn (class-balanced) to compute the perturbations from.")
    seed: int = setting(0, "Seed for the sample draw; the same seed gives the same report.")
    overshoot: float = setting(0.02)  # DeepFool's step is scaled by 1 + overshoot to cross the boundary
    deepfool_iter: int = setting(10)  # DeepFool steps per sample, as in the UAP reference code

    def __post_init__(self) -> None:
        for name, tp in get_type_hints(type(self)).items():
            _check_type(name, getattr(self, name), tp)
        for name, literal in _literals(type(self)).items():  # type: ignore[arg-type]
            check_choice(name.replace("_", " "), getattr(self, name), literal)
        self._check_ranges()

    def _check_ranges(self) -> None:
        _at_least_one(self, "samples", "deepfool_iter")
        if self.overshoot < 0:
            raise ScanError("overshoot must not be negative")


@dataclass(frozen=True)
class ScanSettings(CommonSettings):
    """Every knob of a model scan; the defaults are the USB paper's where it gives one."""

    method: Method = setting("usb", "usb (the paper's method) or nc (Neural Cleanse baseline).")
    norm: Norm = setting("l2", "UAP norm ball.")
    delta: float = setting(10.0, "UAP radius (pixels in [0, 1]).")
    theta: float = setting(0.6, "Targeted success rate at which a class's UAP is done.")
    max_passes: int = setting(5, "Passes over the samples in Alg. 1 at most.")
    stall: float = setting(0.02)  # Alg. 1: a class whose success rate rose less than this over a pass stops
    steps: int = setting(500, "Refinement steps (Alg. 2).")
    lr: float = setting(0.1, "Adam learning rate of the refinement.")
    betas: tuple[float, float] = setting((0.5, 0.9))  # Adam's, as in the authors' code
    batch_size: int = setting(16, "Samples per refinement step and class.")
    form: Form = setting("blend", "Trigger stamping: blend ((1-m)x + m p) or paper ((x + t) m).")
    w0: float = setting(10.0)  # CE weight of the fallback loss for classes whose UAP failed
    mask_cost: MaskCost = setting(
        "adaptive",
        "Alg. 2's size penalty: adaptive (the USB authors' code: a per-class L1 weight raised while the "
        "trigger works, the smallest working trigger kept) or fixed (Eq. (1): the mask's mean L1).",
    )
    init_cost: float = setting(1e-3)  # the starting L1 weight of Neural Cleanse and of --mask-cost adaptive
    evidence: SizeEvidence = setting(
        "combined",
        "Decide on the refined triggers' L1, Alg. 1's UAP norms, or both "
        "(combined: mean anomaly index). Neural Cleanse: its L1.",
    )
    threshold: float = setting(
        2.0,
        "Anomaly index above which a class is flagged, in a model of at most "
        "--threshold-classes classes (raised for more; see docs/method.md).",
    )
    threshold_classes: int = setting(
        10,
        "Classes up to which --threshold holds as given; beyond, it is raised so "
        "that a clean model is as likely to cross it (0: never raised).",
    )
    target_share: float = setting(
        0.5,
        "Flagged classes named as targets: those whose margin over the threshold "
        "is at least this share of the largest (0: every flagged class).",
    )
    scale: Scale = setting("log", "Anomaly index over log L1 (log) or L1 (linear, as in the papers).")
    asr_min: float = setting(0.5, "Share of clean samples a flagged class's trigger must move.")
    max_ratio: float = setting(
        0.5, "Largest size / median size a flagged class may have (combined: geometric mean of the two stages')."
    )
    refine: Refine = setting(
        "staged",
        "Classes refined by Alg. 1 + 2: staged (stage-1 suspects and reference "
        "classes; every class when there are few) or all (the paper's full scan).",
    )
    suspects: int = setting(6, "Staged scan: classes with the smallest stage-1 UAPs, refined as suspects.")
    references: int = setting(
        10, "Staged scan: further classes refined, at evenly spaced stage-1 ranks, to estimate the median and MAD."
    )
    class_group: int | None = setting(
        None, "Classes per batch (default: as many as the memory budget holds; halved on GPU out-of-memory)."
    )
    families: Families = setting(
        "all",
        "Backdoor families the scan covers: all (USB's universal triggers, "
        "source-specific pairs, all-to-all mappings, warps), universal+warp, or universal "
        "(USB as published).",
    )
    pair_steps: int = setting(100, "Pairs stage: Adam steps of each (source, target) patch inversion.")
    pair_first_steps: int = setting(
        50,
        "Pairs stage: steps every pair runs before the pairs smallest against their source go on to --pair-steps "
        "(0: every pair runs them all). The others stay as references, their sizes scaled to what the pairs that "
        "went on reached (docs/method.md).",
    )
    pair_go_on: int = setting(3, "Pairs stage: pairs of each source that go on after --pair-first-steps.")
    pair_samples: int = setting(12)  # pairs stage: clean samples of the source per pair
    pair_cost: float = setting(0.01)  # pairs stage: weight of the mask's L1 (pixels) against the cross-entropy
    pair_restarts: int = setting(
        1,
        "Pairs stage: starting patterns each pair is inverted from, keeping the best patch (the cost of the "
        "inversions times this). The decision sits near the inversion's noise for some planted pairs "
        "(docs/results.md).",
    )
    pair_recheck: int = setting(
        1,
        "Pairs stage: the sources nearest to flagging whose pairs are all inverted once more from new starting "
        "patterns, the better patch of each pair kept (0: none). The planted pair's source was the nearest in 94 of "
        "99 stored tables; no pair from a source in second place or beyond was named (benchmarks/recheck_ranks.py).",
    )
    pair_support_ratio: float = setting(
        0.0,
        "Pairs stage: also flag a pair whose patch needs at most this share of its source's median pixels (the "
        "support; 0: not measured). 0.3 found more source-specific backdoors and flagged one more clean model "
        "(docs/results.md).",
    )
    warp_steps: int = setting(60, "Warp stage: Adam steps of each target's warp inversion.")
    warp_lr: float = setting(0.02)  # warp stage: Adam's learning rate on the control grid
    warp_cost: float = setting(1.0)  # warp stage: weight of the mean squared displacement (pixels^2)
    warp_grid: int = setting(4)  # warp stage: control points per side (WaNet's k)

    @property
    def covers(self) -> tuple[str, ...]:
        """The families this scan measures (Neural Cleanse: its universal triggers only)."""
        if self.method != "usb" or self.families == "universal":
            return ("universal",)
        return ("universal", "warp") if self.families == "universal+warp" else ("universal", "pairs", "warp")

    @property
    def decided_on(self) -> SizeEvidence:
        """The per-class size this scan decides on (Neural Cleanse has no UAP stage: its refined L1)."""
        return self.evidence if self.method == "usb" else "refined"

    @property
    def trigger_form(self) -> Form:
        """How this scan's reversed triggers are stamped (Neural Cleanse always blends)."""
        return self.form if self.method == "usb" else "blend"

    def _check_ranges(self) -> None:
        super()._check_ranges()
        _at_least_one(
            self,
            "steps",
            "batch_size",
            "max_passes",
            "suspects",
            "references",
            "pair_steps",
            "pair_samples",
            "pair_restarts",
            "warp_steps",
            "warp_grid",
        )
        if self.threshold_classes < 0 or not 0 <= self.target_share <= 1:
            raise ScanError("threshold classes must not be negative and target share must be in [0, 1]")
        if self.class_group is not None and self.class_group < 1:
            raise ScanError("class group must be at least 1")
        if not 0 < self.theta <= 1 or not 0 <= self.asr_min <= 1:
            raise ScanError("theta must be in (0, 1] and asr min in [0, 1]")
        if self.pair_recheck < 0:
            raise ScanError(f"pair recheck must not be negative, not {self.pair_recheck}")
        if self.pair_first_steps < 0 or self.pair_go_on < 0:
            raise ScanError("pair first steps and pair go on must not be negative")
        if not 0 <= self.pair_support_ratio < 1:
            raise ScanError(f"pair support ratio must be in [0, 1), not {self.pair_support_ratio:g}")
        if self.max_ratio <= 0 or self.delta <= 0 or self.lr <= 0 or self.warp_lr <= 0:
            raise ScanError("max ratio, delta, lr and warp lr must be positive")
        if not self.threshold > 0:  # an anomaly index above 0 is merely smaller than the median: every model
            raise ScanError(f"threshold must be positive (the anomaly index, in MADs), not {self.threshold:g}")
        if self.pair_cost < 0 or self.warp_cost < 0 or self.init_cost < 0:
            raise ScanError("pair cost, warp cost and init cost must not be negative")


@dataclass(frozen=True)
class FilterSettings(CommonSettings):
    """Knobs of the screening; defaults follow Xue et al. where they give one."""

    method: FilterMethod = setting(
        "uap",
        "uap (Xue et al.), strip (baseline) or erase (erase the patch triggers a model scan named, --triggers: "
        "source-specific and all-to-all ones, which a UAP does not catch; not warps).",
    )
    epsilon: float | None = setting(
        None, "L-inf radius of the UAP; default: the smallest that reaches the fooling rate."
    )
    fooling_rate: float = setting(0.9, "Share of clean predictions the UAP must change.")
    solver: Solver = setting("pgd", "UAP solver: pgd (stochastic, batched) or deepfool (the UAP algorithm).")
    max_passes: int = setting(10, "Passes over the clean samples at most.")
    batch_size: int = setting(256, "Images per screening batch.")
    strip_frr: float = setting(0.1, "STRIP: false rejection rate on clean samples.")
    strip_blends: int = setting(32)  # STRIP: clean images blended with each screened one
    class_survival: float = setting(
        0.2,
        "A class whose clean samples survive the UAP more often than this is "
        "dominant: screened also with its own UAP and a margin (1: never).",
    )
    margin_share: float = setting(
        0.1, "Share of a dominant class's clean samples above the survival margin that counts as a trigger."
    )
    concentration: float = setting(0.5)  # share of all flags on one class above which it is named the target
    erase_grow: int = setting(
        3,
        "erase: the most pixels a patch's region is grown by (always 1), as far as erasing it moves at most a "
        "tenth more of the target's own clean samples off it (1: never further).",
    )

    def _check_ranges(self) -> None:
        super()._check_ranges()
        _at_least_one(self, "batch_size", "max_passes", "strip_blends", "erase_grow")
        if self.epsilon is not None and not 0 < self.epsilon <= 1:
            raise ScanError("epsilon must be in (0, 1] (pixels are in [0, 1])")
        if not 0 <= self.class_survival <= 1 or not 0 < self.margin_share < 1:
            raise ScanError("class survival must be in [0, 1] and margin share in (0, 1)")
        if not 0 < self.fooling_rate <= 1 or not 0 < self.strip_frr < 1:
            raise ScanError("fooling rate must be in (0, 1] and strip frr in (0, 1)")


def _check_type(name: str, value: Any, tp: Any) -> None:
    """A value from a manifest or a library caller must have its field's type (an int is a float; no bools)."""
    args = get_args(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return  # checked by check_choice with the allowed values in the message
    if type(None) in args:
        if value is None:
            return
        tp = next(a for a in args if a is not type(None))
        origin, args = get_origin(tp), get_args(tp)
    label = name.replace("_", " ")
    if origin is tuple:
        if not isinstance(value, (tuple, list)) or len(value) != len(args):
            raise ScanError(f"{label} must be {len(args)} numbers, not {value!r}"[:160])
        for item in value:
            _check_type(name, item, args[0])
        return
    ok = (
        isinstance(value, int) and not isinstance(value, bool)
        if tp is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is float
        else isinstance(value, tp)
        if isinstance(tp, type)
        else True
    )
    if not ok:
        raise ScanError(f"{label} must be {getattr(tp, '__name__', tp)}, not {type(value).__name__} {value!r}"[:160])


def _at_least_one(settings: CommonSettings, *names: str) -> None:
    for name in names:
        if getattr(settings, name) < 1:
            raise ScanError(f"{name.replace('_', ' ')} must be at least 1")
