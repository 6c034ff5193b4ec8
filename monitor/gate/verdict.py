"""What the canary judge is given and what it answers — its thresholds, each metric's samples,
the per-metric findings and the verdict — as records that serialise to the gate's JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from monitor.gate.mannwhitney import FloatArray, MannWhitneyResult, json_float

__all__ = [
    "JUDGE_NAME",
    "Classification",
    "Direction",
    "GroupScore",
    "JudgeConfig",
    "MetricKind",
    "MetricResult",
    "MetricSamples",
    "SampleStats",
    "Verdict",
    "VerdictName",
]

MetricKind = Literal["latency", "error_ratio"]
Direction = Literal["increase", "decrease", "either"]
Classification = Literal["pass", "high", "low", "nodata"]
VerdictName = Literal["pass", "marginal", "fail", "inconclusive"]

JUDGE_NAME = "hopwatch-aca-judge/1"


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
            "mean": json_float(self.mean),
            "median": json_float(self.median),
            "min": json_float(self.minimum),
            "max": json_float(self.maximum),
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
            "effect_size": json_float(self.effect_size),
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
            "score": json_float(self.score),
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
            "score": json_float(self.score),
            "reasons": list(self.reasons),
            "thresholds": {
                "pass": self.config.pass_threshold,
                "marginal": self.config.marginal_threshold,
            },
            "groups": [g.to_dict() for g in self.groups],
            "metrics": [m.to_dict() for m in self.metrics],
            "config": self.config.model_dump(mode="json"),
        }
