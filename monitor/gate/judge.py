"""The canary judge: compares canary and baseline samples per metric and scores them into a verdict.

Modelled on Kayenta's NetflixACAJudge (kayenta-judge, `NetflixACAJudge.scala`):

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

from collections.abc import Mapping, Sequence

import numpy as np

from monitor.gate.mannwhitney import FloatArray, MannWhitneyResult, Samples, as_array, mann_whitney
from monitor.gate.verdict import (
    Classification,
    Direction,
    GroupScore,
    JudgeConfig,
    MetricResult,
    MetricSamples,
    SampleStats,
    Verdict,
    VerdictName,
)

__all__ = [
    "classify_error_ratio",
    "classify_latency",
    "clean_samples",
    "judge",
    "remove_outliers",
]

CLASSIFICATIONS: tuple[Classification, ...] = ("pass", "high", "low", "nodata")


# --- cleaning ---------------------------------------------------------------------------------


def remove_outliers(values: Samples) -> FloatArray:
    """Drop values beyond max(P99, Q3+3*IQR) or below min(P1, Q1-3*IQR), as Kayenta's detector."""
    data = as_array(values)
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
    data = as_array(values)
    kept = data[np.isfinite(data)]
    if outliers:
        kept = remove_outliers(kept)
    return kept, int(data.size - kept.size)


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
