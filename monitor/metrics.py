"""The Prometheus metrics of DESIGN.md's contract, and the sink that turns run results into them.

Instruments live on an injected registry (a fresh one per test); label children are cached
because `labels()` is costly on the probing path at 10,000 flows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from monitor import __version__
from monitor.config import Flow
from monitor.results import RunResult
from probes import PROBES
from probes.errors import REASONS

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

METRIC_NAMES: dict[str, str] = {
    "hopwatch_runs_total": "counter",
    "hopwatch_run_duration_seconds": "histogram",
    "hopwatch_step_duration_seconds": "histogram",
    "hopwatch_step_failures_total": "counter",
    "hopwatch_cleanup_failures_total": "counter",
    "hopwatch_link_up": "gauge",
    "hopwatch_flow_up": "gauge",
    "hopwatch_last_success_timestamp_seconds": "gauge",
    "hopwatch_http_phase_duration_seconds": "histogram",
    "hopwatch_arrivals_total": "counter",
    "hopwatch_event_loop_lag_seconds": "histogram",
    "hopwatch_scheduler_lag_seconds": "histogram",
    "hopwatch_sink_errors_total": "counter",
    "hopwatch_build_info": "gauge",
    "hopwatch_gate_verdicts_total": "counter",  # monitor/gate/service.py
    "hopwatch_gate_score": "gauge",
}


class Metrics:
    """Every instrument hopwatch exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        flow = ["flow", "variant", "location"]
        step = ["flow", "step", "kind", "variant", "location"]
        self.runs = Counter("hopwatch_runs", "Runs by outcome.", [*flow, "outcome"],
                            registry=registry)  # fmt: skip
        self.run_duration = Histogram(
            "hopwatch_run_duration_seconds", "End-to-end duration of a run.", flow,
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.step_duration = Histogram(
            "hopwatch_step_duration_seconds", "Per-hop latency.", step,
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.step_failures = Counter(
            "hopwatch_step_failures", "Broken links by reason.", [*step, "reason"],
            registry=registry,
        )  # fmt: skip
        self.cleanup_failures = Counter(
            "hopwatch_cleanup_failures", "Cleanup steps that failed (not hops).",
            ["flow", "step", "variant", "location"], registry=registry,
        )  # fmt: skip
        self.link_up = Gauge(
            "hopwatch_link_up", "1 if the hop passed in the last run, else 0.",
            ["flow", "step", "variant", "location"], registry=registry,
        )  # fmt: skip
        self.flow_up = Gauge("hopwatch_flow_up", "1 if the last run succeeded.", flow,
                             registry=registry)  # fmt: skip
        self.last_success = Gauge(
            "hopwatch_last_success_timestamp_seconds", "Unix time of the last good run.", flow,
            registry=registry,
        )  # fmt: skip
        self.http_phase = Histogram(
            "hopwatch_http_phase_duration_seconds", "HTTP phase timings.",
            ["flow", "step", "phase"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.arrivals = Counter(
            "hopwatch_arrivals", "Webhooks and messages by outcome.", ["source", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.loop_lag = Histogram(
            "hopwatch_event_loop_lag_seconds", "How late the monitor's event loop wakes up.",
            buckets=LAG_BUCKETS, registry=registry,
        )  # fmt: skip
        self.scheduler_lag = Histogram(
            "hopwatch_scheduler_lag_seconds", "How late runs start against their schedule.",
            buckets=LAG_BUCKETS, registry=registry,
        )  # fmt: skip
        self.sink_errors = Counter(
            "hopwatch_sink_errors", "Results a sink failed to take.", ["sink"], registry=registry
        )
        build = Info("hopwatch_build", "Build information.", registry=registry)
        build.info({"version": __version__})


class MetricsSink:
    """Turns each RunResult into metric updates; label children are looked up once."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def init_series(self, flows: Sequence[Flow], location: str, max_links: int = 2000) -> None:
        """Create every flow's run counters and each link's failure counters at 0, so the first
        failure is an increase that rate() and alerts see (up to `max_links`, to bound memory)."""
        links = sum(len(f.steps) * len(f.variants) for f in flows)
        for flow in flows:
            loc = flow.location or location
            for variant in flow.variants:
                for outcome in ("success", "failure", "aborted"):
                    self._child(self.m.runs, flow.name, variant, loc, outcome)
                if links > max_links:
                    continue
                for step in flow.cleanup:
                    self._child(self.m.cleanup_failures, flow.name, step.name, variant, loc)
                for step in flow.steps:
                    for reason in getattr(PROBES[step.kind], "reasons", REASONS):
                        self._child(
                            self.m.step_failures, flow.name, step.name, step.kind, variant, loc,
                            reason,
                        )  # fmt: skip

    def submit(self, result: RunResult) -> None:
        f, v, loc = result.flow, result.variant, result.location
        exemplar = {"trace_id": result.trace_id} if result.trace_id else None
        self._child(self.m.runs, f, v, loc, result.outcome).inc()
        if result.outcome == "aborted":
            return  # a run cut short by shutdown says nothing about the target
        self._child(self.m.run_duration, f, v, loc).observe(result.duration_s, exemplar)
        up = result.outcome == "success"
        self._child(self.m.flow_up, f, v, loc).set(1 if up else 0)
        if up:
            self._child(self.m.last_success, f, v, loc).set(result.started_at + result.duration_s)
        for step in result.steps:
            if step.cleanup:
                if step.status == "failed":
                    self._child(self.m.cleanup_failures, f, step.name, v, loc).inc()
                continue
            self._child(self.m.link_up, f, step.name, v, loc).set(1 if step.passed else 0)
            if step.status == "failed":
                reason = step.reason or "error"
                self._child(self.m.step_failures, f, step.name, step.kind, v, loc, reason).inc()
            if step.status in ("passed", "failed") and step.latency_s is not None:
                child = self._child(self.m.step_duration, f, step.name, step.kind, v, loc)
                child.observe(step.latency_s, exemplar)
            for phase, seconds in step.phases.items():
                self._child(self.m.http_phase, f, step.name, phase).observe(seconds)


async def watch_event_loop(metrics: Metrics, interval: float = 0.25) -> None:
    """Measure how late the loop wakes up: a monitor too busy to measure says so."""
    loop = asyncio.get_running_loop()
    while True:
        planned = loop.time() + interval
        await asyncio.sleep(interval)
        metrics.loop_lag.observe(max(0.0, loop.time() - planned))
