"""The Mann-Whitney U test and the Hodges-Lehmann shift with its confidence interval, computed as
Kayenta computes them, kept apart so the judge reads as decisions rather than arithmetic."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_SAMPLES_PER_SIDE",
    "FloatArray",
    "MannWhitneyResult",
    "Samples",
    "as_array",
    "json_float",
    "mann_whitney",
    "mann_whitney_ci",
]

FloatArray = npt.NDArray[np.float64]
Samples = Sequence[float] | FloatArray
# Above this many samples per side the pairwise differences (n*m of them) get costly, so a side
# is thinned to this many evenly spaced order statistics, which keeps its distribution's shape.
MAX_SAMPLES_PER_SIDE = 2000


def json_float(value: float | None) -> float | None:
    """`value` as JSON can carry it: JSON has no NaN or infinity, so an undefined number is null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def as_array(values: Samples) -> FloatArray:
    """`values` as a flat float64 array."""
    return np.asarray(values, dtype=np.float64).reshape(-1)


@dataclass(frozen=True, slots=True)
class MannWhitneyResult:
    """Mann-Whitney U test of canary vs baseline; the shift is canary minus baseline."""

    p_value: float
    lower: float
    upper: float
    estimate: float
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "p_value": json_float(self.p_value),
            "lower": json_float(self.lower),
            "upper": json_float(self.upper),
            "estimate": json_float(self.estimate),
            "confidence": self.confidence,
        }


def _tie_term(values: FloatArray) -> float:
    _, counts = np.unique(values, return_counts=True)
    t = counts.astype(np.float64)
    return float(np.sum(t**3 - t))


def _root(levels: FloatArray, g: FloatArray) -> float:
    """Where the non-increasing step function with value g[k] on (levels[k], levels[k+1]) crosses 0.

    This is the point R's ``uniroot`` (and Kayenta's Brent solver) converges to on the same
    function: the level at which the sign changes; on a stretch where g is exactly 0, its middle.
    """
    nonpositive = np.flatnonzero(g <= 0.0)
    if nonpositive.size == 0:
        return float(levels[-1])
    first = int(nonpositive[0])
    if g[first] < 0.0:
        return float(levels[first])
    # g is 0 on intervals first..end-1, which together span levels[first]..levels[end].
    negative = np.flatnonzero(g[first:] < 0.0)
    end = first + int(negative[0]) if negative.size else g.size
    return float((levels[first] + levels[end]) / 2.0)


def mann_whitney_ci(
    canary: Samples, baseline: Samples, confidence: float
) -> tuple[float, float, float]:
    """Confidence interval and Hodges-Lehmann estimate of the shift canary - baseline.

    The estimate is the median of all pairwise differences canary[i] - baseline[j]. The interval
    is Kayenta's (R's ``wilcox.test(conf.int=TRUE, exact=FALSE, correct=TRUE)``): the shifts mu
    at which the continuity- and tie-corrected normal score of U(mu) equals -/+ z_(1-alpha/2).
    U(mu) only changes at pairwise differences, so the roots are found exactly on the sorted
    differences instead of by an iterative solver; the result is always one of the differences.
    Holds all n*m differences in memory (:func:`mann_whitney` thins large samples first).
    Returns ``(lower, upper, estimate)``.
    """
    x = as_array(canary)
    y = as_array(baseline)
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples need at least one value")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("samples must be finite (clean them first)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    diffs = np.sort(np.subtract.outer(x, y).reshape(-1))
    estimate = float(np.median(diffs))
    levels, counts = np.unique(diffs, return_counts=True)
    if levels.size == 1:
        # Both samples are constant: every difference is the same and so is the interval.
        return estimate, estimate, estimate
    n, m, pairs = float(x.size), float(y.size), float(diffs.size)
    # Between two consecutive differences no canary value (shifted) ties a baseline value, so
    # the variance of U only sees the ties within each sample.
    ties = _tie_term(x) + _tie_term(y)
    sigma = math.sqrt(n * m / 12.0 * ((n + m + 1.0) - ties / ((n + m) * (n + m - 1.0))))
    # dz on the open interval after levels[k]: pairs with a difference above it, minus nm/2.
    above = pairs - np.cumsum(counts)[:-1].astype(np.float64)
    dz = above - pairs / 2.0
    corrected = (dz - 0.5 * np.sign(dz)) / sigma
    from scipy.stats import norm  # scipy costs ~0.6 s to import: only when judging

    z = float(norm.ppf(1.0 - (1.0 - confidence) / 2.0))
    lower = _root(levels, corrected - z)
    upper = _root(levels, corrected + z)
    return lower, upper, estimate


def _thin(values: FloatArray) -> FloatArray:
    if values.size <= MAX_SAMPLES_PER_SIDE:
        return values
    positions = np.linspace(0, values.size - 1, MAX_SAMPLES_PER_SIDE).round().astype(np.int64)
    thinned: FloatArray = np.sort(values)[positions]
    return thinned


def mann_whitney(canary: Samples, baseline: Samples, confidence: float) -> MannWhitneyResult:
    """The two-sided test (p-value from scipy) together with :func:`mann_whitney_ci`."""
    x, y = _thin(as_array(canary)), _thin(as_array(baseline))
    lower, upper, estimate = mann_whitney_ci(x, y, confidence)
    from scipy.stats import mannwhitneyu

    p_value = float(mannwhitneyu(x, y, alternative="two-sided").pvalue)
    return MannWhitneyResult(p_value, lower, upper, estimate, confidence)
