"""The canary judge: compares canary and baseline samples per metric and scores them into a verdict.

Modelled on Kayenta's NetflixACAJudge (see shared/CONTRACTS.md, "Canary gating"):

* latency metrics: NaN removal, optional outlier removal, a Mann-Whitney U test with the
  Hodges-Lehmann estimate of the shift and its confidence interval, a tolerance band of
  ``tolerance * |estimate|`` and the mean ratio canary/baseline as effect size;
* error-ratio metrics: the canary's error ratio against the baseline's, with a minimum sample
  count and an allowed absolute increase;
* a score of ``100 * pass / (pass + high + low)`` per group, weighted across groups; a critical
  metric that fails makes the score 0; verdict pass / marginal / fail by thresholds, or
  inconclusive when there were too few samples to tell.

Everything here is pure and synchronous: the gate's collectors gather samples, this module judges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Classification",
    "Direction",
    "GroupScore",
    "JudgeConfig",
    "MannWhitneyResult",
    "MetricKind",
    "MetricResult",
    "MetricSamples",
    "SampleStats",
    "Verdict",
    "VerdictName",
    "classify_error_ratio",
    "classify_latency",
    "clean_samples",
    "judge",
    "mann_whitney",
    "mann_whitney_ci",
    "remove_outliers",
]

FloatArray = npt.NDArray[np.float64]
Samples = Sequence[float] | FloatArray
MetricKind = Literal["latency", "error_ratio"]
Direction = Literal["increase", "decrease", "either"]
Classification = Literal["pass", "high", "low", "nodata"]
VerdictName = Literal["pass", "marginal", "fail", "inconclusive"]

CLASSIFICATIONS: tuple[Classification, ...] = ("pass", "high", "low", "nodata")
JUDGE_NAME = "hopwatch-aca-judge/1"
# Above this many samples per side the pairwise differences (n*m of them) get costly, so a side
# is thinned to this many evenly spaced order statistics, which keeps its distribution's shape.
MAX_SAMPLES_PER_SIDE = 2000


class JudgeConfig(BaseModel):
    """Thresholds of the judge; the defaults are Kayenta's except where noted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    confidence: float = Field(
        0.98,
        gt=0.0,
        lt=1.0,
        description="Confidence level of the Mann-Whitney interval. Default 0.98 (Kayenta's).",
    )
    tolerance: float = Field(
        0.25,
        ge=0.0,
        description="The interval must clear tolerance * |estimate| to count. Default 0.25.",
    )
    allowed_increase: float = Field(
        1.1,
        ge=0.0,
        description=(
            "Latency is High only when mean(canary)/mean(baseline) >= this. Default 1.1 (a canary "
            "may be 10% slower on average before it fails; Kayenta's default 1.0 fails any "
            "significant increase, which makes gates on probe latencies flap)."
        ),
    )
    allowed_decrease: float = Field(
        0.9,
        ge=0.0,
        description="Latency is Low only when the mean ratio <= this. Default 0.9.",
    )
    min_samples: int = Field(
        10,
        ge=1,
        description="Latency samples needed on each side after cleaning, else nodata. Default 10.",
    )
    remove_outliers: bool = Field(
        True,
        description=(
            "Drop latency samples beyond max(P99, Q3+3*IQR) / min(P1, Q1-3*IQR) before judging. "
            "Default true. Never applied to error-ratio samples."
        ),
    )
    min_error_samples: int = Field(
        20,
        ge=1,
        description="Error-ratio observations needed on each side, else nodata. Default 20.",
    )
    allowed_error_increase: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description=(
            "Error ratio is High when canary ratio - baseline ratio > this (absolute, 0.05 = "
            "5 points). Default 0.05."
        ),
    )
    pass_threshold: float = Field(
        95.0, ge=0.0, le=100.0, description="Score >= this is pass. Default 95."
    )
    marginal_threshold: float = Field(
        75.0, ge=0.0, le=100.0, description="Score >= this (and < pass) is marginal. Default 75."
    )
    group_weights: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Weight in percent per metric group; groups not listed share what is left of 100 "
            "equally (Kayenta's rule). Weights are renormalised over the groups that have data. "
            "Default: all groups weigh the same."
        ),
    )

    @model_validator(mode="after")
    def _check_thresholds(self) -> JudgeConfig:
        if self.marginal_threshold > self.pass_threshold:
            raise ValueError(
                f"marginal_threshold {self.marginal_threshold} is above "
                f"pass_threshold {self.pass_threshold}"
            )
        negative = sorted(name for name, weight in self.group_weights.items() if weight < 0)
        if negative:
            raise ValueError(f"group_weights must not be negative: {', '.join(negative)}")
        return self


@dataclass(frozen=True, slots=True)
class MetricSamples:
    """One metric's samples from both sides.

    For ``latency`` each sample is one observed latency in ``unit`` (seconds by default, as
    StepResult.latency_s). For ``error_ratio`` each sample is one observation: 1.0 when it
    failed, 0.0 when it passed; the error ratio is their mean.
    """

    name: str
    kind: MetricKind
    canary: Sequence[float]
    baseline: Sequence[float]
    group: str | None = None  # None: the kind names the group
    critical: bool = False
    direction: Direction = "increase"
    unit: str = "s"
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "error_ratio":
            for side in (self.canary, self.baseline):
                if any(not (0.0 <= v <= 1.0) for v in side if not math.isnan(v)):
                    raise ValueError(f"{self.name}: error_ratio samples must lie in [0, 1]")

    @property
    def group_name(self) -> str:
        return self.group if self.group is not None else self.kind


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
            "p_value": _json_float(self.p_value),
            "lower": _json_float(self.lower),
            "upper": _json_float(self.upper),
            "estimate": _json_float(self.estimate),
            "confidence": self.confidence,
        }


@dataclass(frozen=True, slots=True)
class SampleStats:
    """What one side's samples looked like after cleaning (for error ratios, mean is the ratio)."""

    count: int
    removed: int  # NaNs and outliers dropped before judging
    mean: float | None
    median: float | None
    minimum: float | None
    maximum: float | None

    @classmethod
    def of(cls, values: FloatArray, removed: int) -> SampleStats:
        if values.size == 0:
            return cls(0, removed, None, None, None, None)
        return cls(
            count=int(values.size),
            removed=removed,
            mean=float(np.mean(values)),
            median=float(np.median(values)),
            minimum=float(np.min(values)),
            maximum=float(np.max(values)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "removed": self.removed,
            "mean": _json_float(self.mean),
            "median": _json_float(self.median),
            "min": _json_float(self.minimum),
            "max": _json_float(self.maximum),
        }


@dataclass(frozen=True, slots=True)
class MetricResult:
    """The judge's finding on one metric, with a reason a person can read."""

    name: str
    kind: MetricKind
    group: str
    critical: bool
    direction: Direction
    classification: Classification
    failed: bool  # classification goes the way `direction` forbids
    reason: str
    canary: SampleStats
    baseline: SampleStats
    effect_size: float | None  # mean(canary) / mean(baseline); None when undefined
    mann_whitney: MannWhitneyResult | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "group": self.group,
            "critical": self.critical,
            "direction": self.direction,
            "classification": self.classification,
            "failed": self.failed,
            "reason": self.reason,
            "canary": self.canary.to_dict(),
            "baseline": self.baseline.to_dict(),
            "effect_size": _json_float(self.effect_size),
            "mann_whitney": None if self.mann_whitney is None else self.mann_whitney.to_dict(),
            "labels": dict(self.labels),
        }


@dataclass(frozen=True, slots=True)
class GroupScore:
    """Score of one group of metrics; ``score`` is None when every metric in it had no data."""

    name: str
    score: float | None
    weight: float  # normalised share of the summary score, 0..1
    counts: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": _json_float(self.score),
            "weight": self.weight,
            "counts": dict(self.counts),
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judge's answer: what the gate returns to Argo Rollouts, Flagger or the CLI."""

    verdict: VerdictName
    score: float | None  # None when inconclusive for lack of any data
    reasons: list[str]
    metrics: list[MetricResult]
    groups: list[GroupScore]
    config: JudgeConfig

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge": JUDGE_NAME,
            "verdict": self.verdict,
            "score": _json_float(self.score),
            "reasons": list(self.reasons),
            "thresholds": {
                "pass": self.config.pass_threshold,
                "marginal": self.config.marginal_threshold,
            },
            "groups": [g.to_dict() for g in self.groups],
            "metrics": [m.to_dict() for m in self.metrics],
            "config": self.config.model_dump(mode="json"),
        }


# --- statistics -------------------------------------------------------------------------------


def _json_float(value: float | None) -> float | None:
    # JSON has no NaN or infinity; an undefined number is reported as null.
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _as_array(values: Samples) -> FloatArray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def remove_outliers(values: Samples) -> FloatArray:
    """Drop values beyond max(P99, Q3+3*IQR) or below min(P1, Q1-3*IQR), as Kayenta's detector."""
    data = _as_array(values)
    if data.size == 0:
        return data
    p1, q1, q3, p99 = np.percentile(data, [1.0, 25.0, 75.0, 99.0])
    iqr = q3 - q1
    upper = max(p99, q3 + 3.0 * iqr)
    lower = min(p1, q1 - 3.0 * iqr)
    kept: FloatArray = data[(data >= lower) & (data <= upper)]
    return kept


def clean_samples(values: Samples, *, outliers: bool) -> tuple[FloatArray, int]:
    """NaN (and infinity) removal, then optional outlier removal; returns what was kept and how
    many samples went."""
    data = _as_array(values)
    kept = data[np.isfinite(data)]
    if outliers:
        kept = remove_outliers(kept)
    return kept, int(data.size - kept.size)


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
    x = _as_array(canary)
    y = _as_array(baseline)
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
    x, y = _thin(_as_array(canary)), _thin(_as_array(baseline))
    lower, upper, estimate = mann_whitney_ci(x, y, confidence)
    from scipy.stats import mannwhitneyu

    p_value = float(mannwhitneyu(x, y, alternative="two-sided").pvalue)
    return MannWhitneyResult(p_value, lower, upper, estimate, confidence)


# --- classification ---------------------------------------------------------------------------


def _fails(classification: Classification, direction: Direction) -> bool:
    if classification == "high":
        return direction in ("increase", "either")
    if classification == "low":
        return direction in ("decrease", "either")
    return False


def _mean_ratio(canary: FloatArray, baseline: FloatArray) -> float | None:
    base = float(np.mean(baseline))
    if base == 0.0:
        return None  # Kayenta's ratio is NaN here and its threshold check is skipped
    return float(np.mean(canary)) / base


def _num(value: float) -> str:
    size = abs(value)
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt(value: float | None, unit: str, *, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if unit == "s":  # latencies are kept in seconds and read in milliseconds
        value, unit = value * 1000.0, "ms"
    text = _num(value)
    if signed and value >= 0:
        text = "+" + text
    return f"{text}{unit}"


def _word(classification: Classification) -> str:
    return "nodata" if classification == "nodata" else classification.capitalize()


def _result(
    metric: MetricSamples,
    classification: Classification,
    reason: str,
    sides: tuple[SampleStats, SampleStats],
    effect_size: float | None = None,
    mw: MannWhitneyResult | None = None,
) -> MetricResult:
    return MetricResult(
        name=metric.name,
        kind=metric.kind,
        group=metric.group_name,
        critical=metric.critical,
        direction=metric.direction,
        classification=classification,
        failed=_fails(classification, metric.direction),
        reason=f"{metric.name}: {reason}",
        canary=sides[0],
        baseline=sides[1],
        effect_size=effect_size,
        mann_whitney=mw,
        labels=metric.labels,
    )


def classify_latency(metric: MetricSamples, config: JudgeConfig) -> MetricResult:
    """High / Low / Pass / nodata for a latency metric, as Kayenta's Mann-Whitney classifier."""
    canary, canary_removed = clean_samples(metric.canary, outliers=config.remove_outliers)
    baseline, baseline_removed = clean_samples(metric.baseline, outliers=config.remove_outliers)
    sides = (SampleStats.of(canary, canary_removed), SampleStats.of(baseline, baseline_removed))
    if min(canary.size, baseline.size) < config.min_samples:
        reason = (
            f"{canary.size} canary and {baseline.size} baseline samples, "
            f"need {config.min_samples} each, nodata"
        )
        return _result(metric, "nodata", reason, sides)
    unit = metric.unit
    medians = (
        f"canary median {_fmt(sides[0].median, unit)} vs {_fmt(sides[1].median, unit)} baseline"
    )
    if (
        np.array_equal(np.sort(canary), np.sort(baseline))
        or np.unique(np.concatenate([canary, baseline])).size == 1
    ):
        return _result(metric, "pass", f"{medians}, identical samples, Pass", sides, 1.0)
    mw = mann_whitney(canary, baseline, config.confidence)
    ratio = _mean_ratio(canary, baseline)
    bound = config.tolerance * abs(mw.estimate)
    classification: Classification = "pass"
    if mw.lower > bound and (ratio is None or ratio >= config.allowed_increase):
        classification = "high"
    elif mw.upper < -bound and (ratio is None or ratio <= config.allowed_decrease):
        classification = "low"
    ratio_text = "n/a" if ratio is None else f"{ratio:.2f}"
    reason = (
        f"{medians}, {_fmt(mw.estimate, unit, signed=True)} "
        f"(CI {_fmt(mw.lower, unit)}..{_fmt(mw.upper, unit)}), mean ratio {ratio_text}, "
        f"{_word(classification)}"
    )
    return _result(metric, classification, reason, sides, ratio, mw)


def _percent(ratio: float) -> str:
    return f"{ratio * 100:.1f}%"


def classify_error_ratio(metric: MetricSamples, config: JudgeConfig) -> MetricResult:
    """High / Low / Pass / nodata for an error ratio: the canary's against the baseline's."""
    # Outlier removal would throw away the rare 1.0s, which are exactly the errors we look for.
    canary, canary_removed = clean_samples(metric.canary, outliers=False)
    baseline, baseline_removed = clean_samples(metric.baseline, outliers=False)
    sides = (SampleStats.of(canary, canary_removed), SampleStats.of(baseline, baseline_removed))
    if min(canary.size, baseline.size) < config.min_error_samples:
        reason = (
            f"{canary.size} canary and {baseline.size} baseline observations, "
            f"need {config.min_error_samples} each, nodata"
        )
        return _result(metric, "nodata", reason, sides)
    canary_ratio, baseline_ratio = float(np.mean(canary)), float(np.mean(baseline))
    increase = canary_ratio - baseline_ratio
    allowed = config.allowed_error_increase
    classification: Classification = "pass"
    if increase > allowed:
        classification = "high"
    elif increase < -allowed:
        classification = "low"
    reason = (
        f"canary error ratio {_percent(canary_ratio)} ({canary.sum():.0f}/{canary.size}) "
        f"vs {_percent(baseline_ratio)} ({baseline.sum():.0f}/{baseline.size}) baseline, "
        f"{increase * 100:+.1f} points (allowed +{allowed * 100:.1f}), {_word(classification)}"
    )
    return _result(metric, classification, reason, sides, _mean_ratio(canary, baseline))


def _classify(metric: MetricSamples, config: JudgeConfig) -> MetricResult:
    if metric.kind == "latency":
        return classify_latency(metric, config)
    return classify_error_ratio(metric, config)


# --- scoring ----------------------------------------------------------------------------------


def _group_weights(names: Sequence[str], weights: Mapping[str, float]) -> dict[str, float]:
    """Kayenta's rule (listed groups take their percentage, the others share the rest), then
    renormalised over the groups given, so groups without data do not drag the score down."""
    unlisted = [n for n in names if n not in weights]
    left = max(0.0, 100.0 - sum(weights.values()))
    raw = {n: weights[n] if n in weights else left / len(unlisted) for n in names}
    total = sum(raw.values())
    if total <= 0.0:
        return {n: 1.0 / len(names) for n in names}
    return {n: w / total for n, w in raw.items()}


def _score_groups(
    results: Sequence[MetricResult], config: JudgeConfig
) -> tuple[list[GroupScore], float | None]:
    by_group: dict[str, list[MetricResult]] = {}
    for result in results:
        by_group.setdefault(result.group, []).append(result)
    scores: dict[str, float | None] = {}
    counts: dict[str, dict[str, int]] = {}
    for name, members in by_group.items():
        scored = [r for r in members if r.classification != "nodata"]
        counts[name] = {c: sum(r.classification == c for r in members) for c in CLASSIFICATIONS}
        scores[name] = 100.0 * sum(not r.failed for r in scored) / len(scored) if scored else None
    with_data = [name for name, score in scores.items() if score is not None]
    weights = _group_weights(with_data, config.group_weights) if with_data else {}
    groups = [
        GroupScore(name, scores[name], weights.get(name, 0.0), counts[name]) for name in by_group
    ]
    if not with_data:
        return groups, None
    return groups, sum(weights[n] * (scores[n] or 0.0) for n in with_data)


def judge(metrics: Sequence[MetricSamples], config: JudgeConfig | None = None) -> Verdict:
    """Classify every metric, score the groups and decide pass / marginal / fail / inconclusive.

    A critical metric that fails makes the score 0 and the verdict fail. Otherwise the verdict is
    inconclusive when no metric had enough samples or a critical one had too few, since then
    the evidence that matters is missing; else it follows the score and the thresholds.
    """
    config = config or JudgeConfig()
    results = [_classify(metric, config) for metric in metrics]
    groups, score = _score_groups(results, config)
    critical_failures = [r for r in results if r.critical and r.failed]
    failing = [r.reason for r in results if r.failed]
    if critical_failures:
        names = ", ".join(r.name for r in critical_failures)
        reasons = [f"critical metric failed ({names}): score 0", *failing]
        return Verdict("fail", 0.0, reasons, results, groups, config)
    critical_nodata = [r for r in results if r.critical and r.classification == "nodata"]
    if score is None or critical_nodata:
        reasons = (
            [f"too few samples for a critical metric: {r.reason}" for r in critical_nodata]
            if critical_nodata
            else ["too few samples: no metric had enough data to judge"]
        )
        nodata = [r.reason for r in results if r.classification == "nodata" and not r.critical]
        return Verdict("inconclusive", score, reasons + nodata, results, groups, config)
    if score >= config.pass_threshold:
        verdict: VerdictName = "pass"
    elif score >= config.marginal_threshold:
        verdict = "marginal"
    else:
        verdict = "fail"
    reasons = [f"score {score:.1f}: {verdict}", *failing]
    return Verdict(verdict, score, reasons, results, groups, config)
