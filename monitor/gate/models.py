"""What a caller asks the canary gate and what it answers: one request and one result shape for
`hopwatch gate`, Argo Rollouts and Flagger, so that each caller only maps the verdict.

Verdicts and what callers make of them:

* ``pass`` — exit 0, Flagger 200;
* ``marginal`` — the score is between the thresholds: not good enough to take more traffic, so
  exit 1 and Flagger 412, unless the request says ``allow_marginal`` (then exit 0 / 200 with a
  warning among the reasons);
* ``fail`` — exit 1, Flagger 412;
* ``inconclusive`` — too few samples to tell: exit 3, Flagger 412 (Flagger has no "wait").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from monitor.gate.samples import DEFAULT_CRITICAL
from monitor.gate.verdict import JudgeConfig, Verdict, VerdictName
from probes.durations import Duration

__all__ = [
    "EXIT_CODES",
    "MAX_BURST",
    "MAX_CONCURRENCY",
    "FlowGate",
    "GateError",
    "GateRequest",
    "GateResult",
    "SourceUnavailable",
]

MAX_BURST = 1000  # runs per variant and flow; a gate is a check, not a load test
MAX_CONCURRENCY = 64
EXIT_CODES: dict[VerdictName, int] = {"pass": 0, "marginal": 1, "fail": 1, "inconclusive": 3}
Source = Literal["burst", "window"]


class GateError(ValueError):
    """The request cannot be answered as asked (unknown flow, no source, …): the caller's to fix."""


class SourceUnavailable(RuntimeError):
    """The samples could not be gathered (the store did not answer): nothing was judged."""


def _names(value: Any) -> Any:
    # Query strings and Flagger metadata carry lists as "a,b"; the CLI repeats the option.
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        return tuple(p.strip() for item in value for p in str(item).split(",") if p.strip())
    return value


Names = Annotated[tuple[str, ...], BeforeValidator(_names)]


class GateRequest(BaseModel):
    """What to compare and how; the field names are the query parameters and Flagger metadata
    keys (the CLI spells them as options: --flow, --min-samples, …)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flow: Names = Field(
        default=(),
        description="Flows to judge (repeat, or comma-separated); default every flow that has "
        "both variants.",
    )
    canary: str = Field(
        default="canary", min_length=1, description="Canary variant; default canary."
    )
    baseline: str = Field(
        default="stable", min_length=1, description="Baseline variant; default stable."
    )
    window: Duration | None = Field(
        default=None, description="Judge the store's runs of this last stretch of time, e.g. 10m."
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        le=MAX_BURST,
        description="Run each flow this many times per variant now (after one warm-up run each).",
    )
    concurrency: int = Field(
        default=8, ge=1, le=MAX_CONCURRENCY, description="Burst runs in flight at once; default 8."
    )
    min_samples: int | None = Field(
        default=None,
        ge=1,
        description="Samples needed per variant for every metric (latency and error ratio); "
        "default the judge's (10 latencies, 20 error observations).",
    )
    allow_marginal: bool = Field(
        default=False, description="Let a marginal verdict pass (with a warning); default false."
    )
    critical: Names = Field(
        default=tuple(sorted(DEFAULT_CRITICAL)),
        description="Metrics whose failure fails the gate outright; default flow.error_ratio.",
    )
    location: str | None = Field(
        default=None, description="Window only: runs from this location; default all."
    )
    until: float | None = Field(
        default=None, description="Window only: its end, unix seconds; default now."
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig, description="The judge's thresholds; default its defaults."
    )

    @model_validator(mode="after")
    def _one_source(self) -> GateRequest:
        if (self.window is None) == (self.burst is None):
            raise ValueError("give exactly one of window (e.g. 10m) or burst (runs per variant)")
        if self.window is not None and self.window <= 0:
            raise ValueError("window must be longer than 0")
        if self.canary == self.baseline:
            raise ValueError(f"canary and baseline are both {self.canary!r}")
        return self

    @property
    def source(self) -> Source:
        return "burst" if self.burst is not None else "window"

    def judge_config(self) -> JudgeConfig:
        if self.min_samples is None:
            return self.judge
        data = self.judge.model_dump()
        data.update(min_samples=self.min_samples, min_error_samples=self.min_samples)
        return JudgeConfig.model_validate(data)


@dataclass(frozen=True, slots=True)
class FlowGate:
    """One flow's verdict and how many runs of each variant it rests on."""

    flow: str
    verdict: Verdict
    canary_runs: int
    baseline_runs: int

    def to_dict(self) -> dict[str, Any]:
        v = self.verdict.to_dict()
        return {
            "flow": self.flow,
            "verdict": v["verdict"],
            "score": v["score"],
            "reasons": v["reasons"],
            "samples": {"canary": self.canary_runs, "baseline": self.baseline_runs},
            "groups": v["groups"],
        }


@dataclass(frozen=True, slots=True)
class GateResult:
    """The gate's answer, the same for the CLI, Argo Rollouts and Flagger."""

    request: GateRequest
    verdict: VerdictName
    score: float | None
    reasons: list[str]
    flows: list[FlowGate]
    since: float | None  # window only
    until: float | None
    elapsed_s: float

    @property
    def passed(self) -> bool:
        """Whether the canary may take more traffic."""
        return self.verdict == "pass" or (
            self.verdict == "marginal" and self.request.allow_marginal
        )

    @property
    def exit_code(self) -> int:
        """0 pass (or allowed marginal), 1 fail or marginal, 3 inconclusive."""
        return 0 if self.passed else EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        config = self.request.judge_config()
        return {
            "verdict": self.verdict,
            "passed": self.passed,
            "score": self.score,
            "reasons": list(self.reasons),
            "source": self.request.source,
            "canary": self.request.canary,
            "baseline": self.request.baseline,
            "window_s": self.request.window,
            "burst": self.request.burst,
            "since": self.since,
            "until": self.until,
            "samples": {
                "canary": sum(f.canary_runs for f in self.flows),
                "baseline": sum(f.baseline_runs for f in self.flows),
            },
            "flows": [f.to_dict() for f in self.flows],
            "metrics": [m.to_dict() for f in self.flows for m in f.verdict.metrics],
            "thresholds": {"pass": config.pass_threshold, "marginal": config.marginal_threshold},
            "config": config.model_dump(mode="json"),
            "elapsed_s": round(self.elapsed_s, 3),
        }
