"""The USB / Neural Cleanse decision: a one-sided MAD anomaly index over per-class perturbation sizes."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from ..core.choices import Scale, SizeEvidence, check_choice

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
# the smallest spread an index is measured against, in log-size units (a relative spread of 1 % on the linear
# scale): the searches are stochastic, so sizes closer than this are not told apart. Without it a stage whose
# sizes all sit at the search's bound (every L-inf UAP at --delta) has a MAD of 0, and a class a hair below the
# bound got an anomaly index of 1e11
RESOLUTION = 0.01


Weights = np.ndarray | list[float] | None


def weighted_median(values: np.ndarray, weights: Weights = None) -> float:
    """The median of `values`, each counted `weights` times (np.median when the weights are equal or None).

    The staged scan refines a stratified sample of the classes: every suspect counts once and every reference
    stands for (K - suspects) / references classes, so this estimates the median over all K classes.
    """
    values = np.asarray(values, dtype=np.float64)
    if weights is None or np.ptp(np.asarray(weights, dtype=np.float64)) == 0:
        return float(np.median(values))
    order = np.argsort(values, kind="stable")
    v, w = values[order], np.asarray(weights, dtype=np.float64)[order]
    cum, half = np.cumsum(w), w.sum() / 2
    tol = 1e-9 * w.sum()
    lower = v[np.searchsorted(cum, half - tol)]  # first value whose cumulative weight reaches half
    upper = v[min(np.searchsorted(cum, half + tol, side="right"), len(v) - 1)]  # first one past half
    return float((lower + upper) / 2)


def anomaly_index(norms: np.ndarray | list[float], scale: Scale, weights: Weights = None) -> np.ndarray:
    """(median - s_t) / (1.4826 * MAD) per class over sizes s (log L1 or L1): large and positive when unusually small.

    Log scale (the scan's default) measures how many times smaller a class is than the others: reversed-trigger sizes
    of clean classes spread multiplicatively (on CIFAR-10 from 200 to 480), which inflates a linear MAD and hides
    a target 10x below the median; linear is Neural Cleanse's and USB's original index.
    """
    check_choice("scale", scale, Scale)
    values = np.asarray(norms, dtype=np.float64)
    if scale == "log":  # one index unit is `spread`, the unit the margins convert the size guard with
        values = np.log(np.maximum(values, 1e-12))
        return np.asarray((weighted_median(values, weights) - values) / spread(norms, weights))
    median = weighted_median(values, weights)
    mad = weighted_median(np.abs(values - median), weights) * MAD_TO_SIGMA
    return np.asarray((median - values) / max(mad, RESOLUTION * max(abs(median), 1e-12)))


def _log_mad(sizes: np.ndarray | list[float], weights: Weights = None) -> float:
    """1.4826 (weighted) MAD of log sizes, unfloored."""
    logs = np.log(np.maximum(np.asarray(sizes, dtype=np.float64), 1e-12))
    return weighted_median(np.abs(logs - weighted_median(logs, weights)), weights) * MAD_TO_SIGMA


def varies(norms: np.ndarray | list[float], weights: Weights = None) -> bool:
    """Whether per-class sizes spread by more than the resolution (log scale): a stage whose sizes do not (every
    UAP stopped at the --delta bound) measured no class as smaller than another, and is no evidence."""
    return _log_mad(norms, weights) >= RESOLUTION


def decided_evidence(
    evidence: SizeEvidence, uap_norms: np.ndarray | list[float] | None, weights: Weights = None
) -> SizeEvidence:
    """The size(s) a decision reads: `evidence`, but the refined L1 alone when there are no UAP norms (Neural
    Cleanse) or, for "combined", when they do not vary. One rule for the index, the margin and the notes."""
    if uap_norms is None or (evidence == "combined" and not varies(uap_norms, weights)):
        return "refined"
    return evidence


def class_evidence(
    l1: np.ndarray | list[float],
    uap_norms: np.ndarray | list[float] | None,
    evidence: SizeEvidence,
    scale: Scale,
    weights: Weights = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly index and size ratio per class, from the refined triggers' L1, Alg. 1's UAP norms, or both.

    "combined" averages the two stages' anomaly indices (each against its own spread over the classes) and takes
    the geometric mean of their size ratios: a blended trigger that the refinement cannot shrink (it spans the
    image) still stands out in its UAP, and a naturally easy class whose UAP is only a little small needs a small
    refined trigger too. Without UAP norms (Neural Cleanse), or when they do not vary (`varies`), it is the
    refined L1's.
    """
    check_choice("evidence", evidence, SizeEvidence)
    evidence = decided_evidence(evidence, uap_norms, weights)
    if evidence == "refined" or uap_norms is None:
        return anomaly_index(l1, scale, weights), size_ratio(l1, weights)
    if evidence == "uap":
        return anomaly_index(uap_norms, scale, weights), size_ratio(uap_norms, weights)
    index = (anomaly_index(l1, scale, weights) + anomaly_index(uap_norms, scale, weights)) / 2
    return index, np.sqrt(size_ratio(l1, weights) * size_ratio(uap_norms, weights))


def size_ratio(norms: np.ndarray | list[float], weights: Weights = None) -> np.ndarray:
    """Each class's perturbation size relative to the median class (weighted as in `weighted_median`)."""
    norms = np.asarray(norms, dtype=np.float64)
    return norms / max(weighted_median(norms, weights), 1e-12)


def flag_classes(
    norms: np.ndarray | list[float],
    asr: np.ndarray | list[float],
    *,
    threshold: float,
    asr_min: float,
    max_ratio: float,
    scale: Scale,
) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly index per class and which classes are flagged, from one per-class size (see `flag`)."""
    index = anomaly_index(norms, scale)
    return index, flag(index, size_ratio(norms), asr, threshold=threshold, asr_min=asr_min, max_ratio=max_ratio)


def flag(
    index: np.ndarray,
    ratio: np.ndarray,
    asr: np.ndarray | list[float],
    *,
    threshold: float,
    asr_min: float,
    max_ratio: float,
) -> np.ndarray:
    """Which classes are flagged: index above `threshold`, and past the guards (see `guards`)."""
    return (np.asarray(index) > threshold) & guards(ratio, asr, asr_min=asr_min, max_ratio=max_ratio)


def guards(ratio: np.ndarray, asr: np.ndarray | list[float], *, asr_min: float, max_ratio: float) -> np.ndarray:
    """Classes that could be flagged: a working reversed trigger (ASR >= asr_min), at most `max_ratio` times the
    median size. The size guard keeps a tight cluster of clean classes (a tiny MAD) from turning a merely smaller
    class into an outlier: backdoor targets are several times smaller."""
    return (np.asarray(asr, dtype=np.float64) >= asr_min) & (np.asarray(ratio, dtype=np.float64) <= max_ratio)


def class_threshold(threshold: float, classes: int, at: int) -> float:
    """The anomaly-index threshold for a model of `classes` classes: `threshold` up to `at` classes, raised beyond.

    A clean class's index is about standard normal, and the largest of K of them grows with K (about 1.5 for 10
    classes, 2.2 for 43, 3.2 for 1,000), so a fixed threshold flags more clean models the more classes they have.
    The raised threshold keeps the chance that some clean class crosses it what it is at `at` classes (a
    Bonferroni correction scaled to `at`): 2.0 at 10 classes becomes 2.56 at 43, 2.84 at 100, 3.51 at 1,000.
    `at` 0: never raised (the papers' fixed threshold).
    """
    if at <= 0 or classes <= at:
        return threshold
    normal = NormalDist()
    return normal.inv_cdf(1 - (1 - normal.cdf(threshold)) * at / classes)


def name_targets(index: np.ndarray, flagged: np.ndarray, *, threshold: float, share: float) -> np.ndarray:
    """Which flagged classes are named as backdoor targets: those whose margin over the threshold is at least
    `share` of the largest flagged margin (0: every flagged class).

    The verdict depends on the flagged classes alone; this only names them. A trigger's target stands far out; a
    second class just over the threshold beside it is more likely the clean tail (on 43 classes a sampled
    median and MAD move such classes by a unit), and two targets of one attack stand out alike.
    """
    index, flagged = np.asarray(index, dtype=np.float64), np.asarray(flagged, dtype=bool)
    if not flagged.any():
        return flagged
    top = float(np.max(index[flagged])) - threshold
    return flagged & (index - threshold >= share * top)


def decision_margin(index: np.ndarray, flagged: np.ndarray, candidates: np.ndarray, *, threshold: float) -> float:
    """How far the verdict is from flipping, in anomaly-index units (positive: robust).

    With flagged classes (pass the named targets, `name_targets`): the smallest of their indices above the
    threshold. Without: the threshold above the largest index among the candidates (classes whose trigger works
    and is small enough to be flagged, see `guards`); with no candidate at all, the threshold itself.
    """
    index = np.asarray(index, dtype=np.float64)
    if np.any(flagged):
        return float(np.min(index[np.asarray(flagged)]) - threshold)
    pool = index[np.asarray(candidates)]
    return float(threshold - max(float(np.max(pool)) if pool.size else 0.0, 0.0))


def spread(sizes: np.ndarray | list[float], weights: Weights = None) -> float:
    """The robust spread (1.4826 MAD) of log sizes, weighted and floored at RESOLUTION exactly as in
    `anomaly_index`: one anomaly-index unit, in log-size units (the staged scan's classes carry weights)."""
    return max(float(_log_mad(sizes, weights)), RESOLUTION)


# distances from a flip, shared by every family's decision (usb/pair_rule.py, usb/families.py, the pipeline)


def flip_distance(
    index: np.ndarray,
    ratio: np.ndarray,
    asr: np.ndarray,
    *,
    threshold: float,
    asr_min: float,
    max_ratio: float,
    sigma: float,
) -> np.ndarray:
    """Per candidate, how far (in anomaly-index units) it is from being flagged: the larger of its distance to the
    threshold and to the size guard (shrinking a size by a factor f raises its index by -log f / sigma and scales
    its ratio by f); infinite for a candidate whose trigger does not work."""
    to_threshold = threshold - np.asarray(index, dtype=np.float64)
    to_guard = np.log(np.maximum(np.asarray(ratio, dtype=np.float64), 1e-12) / max_ratio) / sigma
    distance = np.maximum(to_threshold, to_guard)
    return np.where(np.asarray(asr) >= asr_min, distance, np.inf)


def share_distance(share: np.ndarray, limit: float) -> np.ndarray:
    """A share criterion (at most `limit` of some samples) as a distance from flagging, in [-1, 1] (NaN, not
    measured: -inf, no constraint): the share of the room below `limit` that is left (negative), or of the room
    above it that is used. A share has no anomaly-index units, so this is a convention; it keeps a pair that the
    criterion alone holds back, or alone lets through, within one unit of flipping in the margin, never far from it."""
    room = np.where(share > limit, 1 - limit, limit)
    return np.where(np.isnan(share), -np.inf, (share - limit) / room)


def family_margin(distance: np.ndarray, flagged: list[int]) -> float:
    """A family's margin: how far its most robust finding is past flagging (positive), or how far its closest
    candidate is from it (positive as well: both count toward the verdict's robustness)."""
    if flagged:
        return float(-np.min(distance[flagged]))
    finite = distance[np.isfinite(distance)]
    return float(np.min(finite)) if finite.size else float("inf")
