"""What the store's queries return: the shapes the HTTP API serves and documents."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

StepStatusName = Literal["passed", "failed", "skipped", "aborted"]
RunOutcomeName = Literal["success", "failure", "aborted"]


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StepView(_View):
    """One hop of a stored run."""

    name: str
    kind: str
    status: StepStatusName
    started_at: float = Field(description="Unix seconds.")
    offset_s: float = Field(description="Seconds from the run's start.")
    latency_s: float | None
    own_latency_s: float | None = Field(
        default=None,
        description="The hop's own part of latency_s: for a waiting hop timed from an earlier "
        "step, from the previous step's end to the arrival; else latency_s.",
    )
    duration_s: float | None = Field(
        default=None, description="How long the step ran, waits included, whatever its outcome."
    )
    reason: str | None = Field(description="Why the hop failed, from the fixed vocabulary.")
    message: str | None
    phases: dict[str, float] = Field(description="HTTP phases in seconds: dns, connect, tls, ...")
    attributes: dict[str, Any]
    excerpt: str | None = Field(description="A bounded, redacted excerpt of a failing response.")
    cleanup: bool


class ArtifactInfo(_View):
    """Evidence a hop kept (a screenshot), without its bytes."""

    position: int = Field(description="The hop's position in its run (cleanup steps count).")
    name: str
    media_type: str
    size: int = Field(description="Bytes.")


class RunSummary(_View):
    """One run without its hops."""

    # Fields with a default are still always in the answer: required in the schema.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    run_id: str
    flow: str
    variant: str
    location: str
    correlation: str
    started_at: float = Field(description="Unix seconds.")
    duration_s: float
    outcome: RunOutcomeName
    broken_step: str | None
    reason: str | None
    trace_id: str | None
    replica: str | None = Field(
        default=None,
        description="The cluster replica that ran it; null when not run in a cluster.",
    )
    maintenance: bool = Field(
        default=False,
        description="It ran (in part) in a maintenance window: it opened no incident.",
    )


class RunDetail(RunSummary):
    """One run with every hop (cleanup steps included, flagged)."""

    steps: list[StepView]


class RunPage(_View):
    """Runs, newest first; pass `next_cursor` back as `cursor` for the next page."""

    runs: list[RunSummary]
    next_cursor: str | None


class IncidentView(_View):
    """A link broken from `opened_at` until `closed_at` (null while open)."""

    id: str
    flow: str
    variant: str
    location: str
    step: str
    status: Literal["open", "closed"]
    opened_at: float = Field(description="Unix seconds: start of the first failing run.")
    closed_at: float | None = Field(description="Unix seconds: start of the recovering run.")
    last_failure_at: float
    failures: int = Field(description="Failing runs counted in this incident.")
    flaps: int = Field(description="Times the incident reopened shortly after closing.")
    reason: str | None = Field(description="Reason of the first failure.")
    last_reason: str | None
    first_run_id: str
    last_failed_run_id: str
    closing_run_id: str | None
    close_reason: str | None = Field(
        default=None,
        description="Why it closed when not by a passing run: e.g. the link is no longer "
        "configured, or the hop is skipped after an earlier hop broke.",
    )


class IncidentPage(_View):
    """Incidents, most recently opened first; pass `next_cursor` back as `cursor`."""

    incidents: list[IncidentView]
    next_cursor: str | None


@dataclass(slots=True)
class StepSamples:
    """One link's raw per-run samples in time order, aligned lists (for the canary gate)."""

    step: str
    kind: str
    started_at: list[float] = field(default_factory=list)
    latency_s: list[float | None] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    own_latency_s: list[float | None] = field(default_factory=list)  # None: as latency_s

    def passed_latencies(self) -> list[float]:
        return [
            lat
            for lat, st in zip(self.latency_s, self.status, strict=True)
            if st == "passed" and lat is not None
        ]


@dataclass(slots=True)
class LinkPoint:
    """One point of a link's recent history (for sparklines)."""

    started_at: float
    latency_s: float | None
    status: str
