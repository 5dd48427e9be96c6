"""How sure the report's numbers are: intervals for error rates, paired tests for differences between models.

The paper reports point estimates on 50,000 validation images, where a 0.5-point difference is 250 images; a small
profile has a few hundred, where most differences between models are a handful of images. So every number in the
report carries its uncertainty, computed from the saved per-image posteriors (nothing is re-evaluated):
- `wilson`: the Wilson score 95% interval of an error rate (good coverage at small n and near 0 or 100%).
- `mcnemar`: the exact two-sided McNemar test of two models scored on the same images: under "no difference", the
  images exactly one of them gets right split 50/50 between them (a binomial test on those discordant images).
- `holm`: Holm's step-down adjustment of the p-values of one family of comparisons (one finding's).
- `paired_difference`: the difference of two error rates on the same images with the Bonett-Price adjusted-Wald
  95% interval (well behaved when the models disagree on few images, unlike the plain Wald interval).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vgg.errors import DataError

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


def wilson(wrong: int, count: int) -> tuple[float, float]:
    """95% interval of an error rate of `wrong` out of `count` images, in percent."""
    if count <= 0 or not 0 <= wrong <= count:
        raise DataError(f"error interval: expected 0 <= wrong <= count and count > 0, got {wrong} of {count}")
    rate = wrong / count
    centre = (rate + Z95**2 / (2 * count)) / (1 + Z95**2 / count)
    half = Z95 / (1 + Z95**2 / count) * math.sqrt(rate * (1 - rate) / count + Z95**2 / (4 * count**2))
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


@dataclass(frozen=True)
class Paired:
    """Two models on the same images: the images only `a` gets right, only `b` gets right, and McNemar's p."""

    only_a: int
    only_b: int
    count: int  # images
    p: float  # exact two-sided McNemar

    @property
    def difference(self) -> float:
        """err(a) − err(b) in percentage points: positive when b is better."""
        return 100 * (self.only_b - self.only_a) / self.count


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> Paired:
    """Exact two-sided McNemar test of models a and b from their per-image correctness (bool [N], same images)."""
    a, b = _paired_arrays(a_correct, b_correct)
    only_a, only_b = int(np.count_nonzero(a & ~b)), int(np.count_nonzero(b & ~a))
    return Paired(only_a=only_a, only_b=only_b, count=a.size, p=_binomial_two_sided(only_a, only_a + only_b))


def paired_difference(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[float, float, float]:
    """err(a) − err(b) in percentage points and its Bonett-Price 95% interval (Bonett & Price 2012, adjusted Wald
    for paired proportions: one pseudo-image added to each discordant cell)."""
    paired = mcnemar(a_correct, b_correct)
    n = paired.count
    wrong_a_only, wrong_b_only = (paired.only_b + 1) / (n + 2), (paired.only_a + 1) / (n + 2)
    centre = wrong_a_only - wrong_b_only
    half = Z95 * math.sqrt(max(wrong_a_only + wrong_b_only - centre**2, 0.0) / (n + 2))
    return paired.difference, 100 * max(-1.0, centre - half), 100 * min(1.0, centre + half)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given): reject those below α to keep the family-wise error at α."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _paired_arrays(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise DataError(f"paired test: expected two per-image correctness vectors of one length, got {a.shape} "
                        f"and {b.shape}")
    return a, b


def _binomial_two_sided(successes: int, trials: int) -> float:
    """P(X <= min(k, n-k)) * 2 for X ~ Binomial(n, 1/2), capped at 1: exact, in log space (n may be 50,000)."""
    if trials == 0:
        return 1.0
    low = min(successes, trials - successes)
    log_terms = [math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) - trials * math.log(2)
                 for i in range(low + 1)]
    top = max(log_terms)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(term - top) for term in log_terms))
