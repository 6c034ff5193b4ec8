"""Canary gating: judge canary against stable on the same flows and answer pass, fail or wait."""

from monitor.gate.judge import (
    Classification,
    Direction,
    GroupScore,
    JudgeConfig,
    MannWhitneyResult,
    MetricKind,
    MetricResult,
    MetricSamples,
    SampleStats,
    Verdict,
    VerdictName,
    judge,
    mann_whitney,
    mann_whitney_ci,
)

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
    "judge",
    "mann_whitney",
    "mann_whitney_ci",
]
