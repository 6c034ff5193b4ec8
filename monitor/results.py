"""What a run produced: one RunResult with a StepResult per hop, handed to every sink."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from probes.errors import Artifact

StepStatus = Literal["passed", "failed", "skipped", "aborted"]
RunOutcome = Literal["success", "failure", "aborted"]


@dataclass(slots=True)
class StepResult:
    """One hop of one run. `latency_s` is the hop's latency as the probe defines it;
    `own_latency_s` the part of it that is this hop's own (for a waiting hop timed from an
    earlier step: from the previous step's end to the arrival; else `latency_s`);
    `duration_s` how long the step ran (a wait included, whatever its outcome)."""

    name: str
    kind: str
    status: StepStatus
    started_at: float  # unix seconds
    offset_s: float  # from the run's start, for waterfalls
    latency_s: float | None = None
    reason: str | None = None
    message: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    excerpt: str | None = None
    cleanup: bool = False
    tls_not_after: float | None = None  # the server certificate's expiry, unix seconds
    own_latency_s: float | None = None
    duration_s: float | None = None
    # Evidence of a failure (a screenshot): for the store and the run page only, never in
    # `to_dict` (the API, events, the results topic) nor in spans.
    artifacts: list[Artifact] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(slots=True)
class RunResult:
    """One execution of one flow for one variant at one location."""

    run_id: str
    flow: str
    variant: str
    location: str
    correlation: str
    started_at: float  # unix seconds
    duration_s: float
    outcome: RunOutcome
    steps: list[StepResult]
    trace_id: str | None = None
    replica: str | None = None  # the cluster member that ran it; None outside a cluster
    maintenance: bool = False  # it ran (in part) in a maintenance window: no incident, no SLO

    @property
    def broken(self) -> StepResult | None:
        """The broken link: the first non-cleanup step that failed."""
        for step in self.steps:
            if step.status == "failed" and not step.cleanup:
                return step
        return None

    @property
    def hops(self) -> list[StepResult]:
        return [s for s in self.steps if not s.cleanup]

    def to_dict(self) -> dict[str, Any]:
        broken = self.broken
        return {
            "run_id": self.run_id,
            "flow": self.flow,
            "variant": self.variant,
            "location": self.location,
            "correlation": self.correlation,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "outcome": self.outcome,
            "broken_step": broken.name if broken else None,
            "reason": broken.reason if broken else None,
            "trace_id": self.trace_id,
            "maintenance": self.maintenance,
            "steps": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "status": s.status,
                    "started_at": s.started_at,
                    "offset_s": s.offset_s,
                    "latency_s": s.latency_s,
                    "reason": s.reason,
                    "message": s.message,
                    "phases": s.phases,
                    "attributes": s.attributes,
                    "excerpt": s.excerpt,
                    "cleanup": s.cleanup,
                    "own_latency_s": s.own_latency_s,
                    "duration_s": s.duration_s,
                }
                for s in self.steps
            ],
        }
