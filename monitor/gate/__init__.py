"""Canary gating: judge canary against stable on the same flows and answer pass, fail or wait.

`service` gathers the samples (a burst now, or the store's window) and answers in the shapes of
`models`; `samples` turns runs into the judge's samples; `judge` classifies and scores them
(its records in `verdict`, its Mann-Whitney statistics in `mannwhitney`); `routes` serves the
gate to Argo Rollouts and Flagger, `command` to the CLI.
"""

from monitor.gate.judge import judge
from monitor.gate.mannwhitney import MannWhitneyResult, mann_whitney, mann_whitney_ci
from monitor.gate.verdict import (
    Classification,
    Direction,
    GroupScore,
    JudgeConfig,
    MetricKind,
    MetricResult,
    MetricSamples,
    SampleStats,
    Verdict,
    VerdictName,
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
