"""The all-to-all test: a mapping y -> pi(y) shows as several *disjoint* outlier-small pairs, one per source.

Flagging the pairs of a mapping one by one asks each to clear the threshold for 90 candidates, and a mapping's
pairs are individually only moderately small (on the families zoo: indices 2.3-3.4 against 2.80). Pooled, they are
unmistakable: a natural neighbour structure (MNIST's 4 -> 9 and 7 -> 9) shares targets, and a universal backdoor
shares one target, so neither yields many pairs with distinct sources *and* distinct targets. The statistic is the
`MAPPING_PAIRS`-th largest index among the greedy matching of working pairs (highest index first, each source and
each target used once); its threshold is that statistic's quantile under a null of independent standard-normal
indices on the same candidate pairs, at `MAPPING_FALSE_ALARM` (the issue's one clean model in 50). Clean indices
are lighter-tailed than that null, so the real false-alarm rate is lower.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

MAPPING_PAIRS = 4  # disjoint pairs a mapping must show
MAPPING_FALSE_ALARM = 0.02  # the null's exceedance at the threshold
NULL_TRIALS = 2000  # enough for a 98 % quantile (40 exceedances), under a second


def matching(pairs: list[tuple[int, int]], index: np.ndarray, excluded_targets: tuple[int, ...] = ()) -> list[int]:
    """Positions of the greedy matching: pairs by decreasing index (finite only), each source and target once."""
    used_sources: set[int] = set()
    used_targets: set[int] = set(excluded_targets)
    chosen = []
    for i in np.argsort(-np.asarray(index, dtype=np.float64), kind="stable"):
        s, t = pairs[int(i)]
        if not np.isfinite(index[i]) or s in used_sources or t in used_targets:
            continue
        used_sources.add(s)
        used_targets.add(t)
        chosen.append(int(i))
    return chosen


def statistic(
    pairs: list[tuple[int, int]], index: np.ndarray, excluded_targets: tuple[int, ...] = ()
) -> tuple[float, list[int]]:
    """The `MAPPING_PAIRS`-th index of the matching (-inf with fewer), and the matching's first pairs."""
    chosen = matching(pairs, index, excluded_targets)[:MAPPING_PAIRS]
    if len(chosen) < MAPPING_PAIRS:
        return float("-inf"), chosen
    return float(index[chosen[-1]]), chosen


@lru_cache(maxsize=64)
def threshold(pairs: tuple[tuple[int, int], ...]) -> float:
    """The statistic's (1 - MAPPING_FALSE_ALARM) quantile over standard-normal indices on these candidate pairs
    (seeded: the same candidates give the same threshold)."""
    rng = np.random.default_rng(0)
    plist = list(pairs)
    values = np.asarray([statistic(plist, rng.standard_normal(len(plist)))[0] for _ in range(NULL_TRIALS)])
    if not np.isfinite(values).all():  # the candidates hold no MAPPING_PAIRS disjoint pairs: no mapping to test
        return float("inf")
    return float(np.quantile(values, 1 - MAPPING_FALSE_ALARM))
