"""Turns run results (fresh from a burst, or read back from the store) into the judge's samples.

Per link (hop): the latency of each passed hop — its own part (`own_latency_s`) where the
probe reports one: a waiting hop timed from its trigger's start contains the hops before it,
and judged on that figure it would be blamed for their slowdown — and one error observation
per hop that ran
(failed = 1, passed = 0; skipped and aborted hops are not counted, since a broken link is
counted once, on the hop that broke). Per flow: the end-to-end duration of each successful run
and one error observation per finished run (failure = 1, success = 0; aborted runs are the
monitor's own shutdown, not the target's doing, and are left out). A window read from the
store leaves out runs made in a maintenance window: planned work on the target would otherwise
be judged as the canary's doing (or hide it). A burst runs now and counts what it ran.

Metric names: ``hop.<step>.latency``, ``hop.<step>.error_ratio``, ``flow.duration`` and
``flow.error_ratio``; each carries ``flow`` (and ``step``) labels. ``flow.error_ratio`` is
critical by default: a canary that breaks the flow more often than stable fails outright.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from monitor.gate.verdict import MetricKind, MetricSamples
from monitor.results import RunResult

__all__ = [
    "DEFAULT_CRITICAL",
    "FLOW_DURATION",
    "FLOW_ERROR_RATIO",
    "LinkObservations",
    "RunSummaryLike",
    "StepSamplesLike",
    "VariantObservations",
    "from_runs",
    "from_store",
    "hop_metric",
    "metric_samples",
]

FLOW_DURATION = "flow.duration"
FLOW_ERROR_RATIO = "flow.error_ratio"
DEFAULT_CRITICAL: frozenset[str] = frozenset({FLOW_ERROR_RATIO})


def hop_metric(step: str, what: str) -> str:
    """`hop.<step>.latency` or `hop.<step>.error_ratio`: the name names the hop in every reason."""
    return f"hop.{step}.{what}"


@dataclass(slots=True)
class LinkObservations:
    """What one hop did over a set of runs of one variant."""

    kind: str
    latencies: list[float] = field(default_factory=list)  # seconds, passed hops only
    errors: list[float] = field(default_factory=list)  # 1.0 failed, 0.0 passed


@dataclass(slots=True)
class VariantObservations:
    """One flow variant's observations, links in the flow's step order."""

    flow: str
    variant: str
    links: dict[str, LinkObservations] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)  # seconds, successful runs only
    run_errors: list[float] = field(default_factory=list)  # 1.0 failure, 0.0 success

    @property
    def runs(self) -> int:
        """Finished runs counted (aborted ones are not)."""
        return len(self.run_errors)

    def link(self, step: str, kind: str) -> LinkObservations:
        found = self.links.get(step)
        if found is None:
            found = self.links[step] = LinkObservations(kind)
        return found

    def add_hop(
        self,
        step: str,
        kind: str,
        status: str,
        latency_s: float | None,
        own_latency_s: float | None = None,
    ) -> None:
        if status == "passed":
            link = self.link(step, kind)
            link.errors.append(0.0)
            judged = own_latency_s if own_latency_s is not None else latency_s
            if judged is not None:
                link.latencies.append(judged)
        elif status == "failed":
            self.link(step, kind).errors.append(1.0)
        else:
            # Skipped hops come after a broken link (already counted there); aborted ones are
            # the monitor stopping. Neither says anything about the target, but the link is
            # listed so the judge reports it (as nodata) rather than forgetting it.
            self.link(step, kind)

    def add_run(self, outcome: str, duration_s: float) -> None:
        if outcome == "success":
            self.run_errors.append(0.0)
            self.durations.append(duration_s)
        elif outcome == "failure":
            self.run_errors.append(1.0)


def from_runs(results: Iterable[RunResult], flow: str, variant: str) -> VariantObservations:
    """Observations of `flow`/`variant` among `results` (others are ignored)."""
    observed = VariantObservations(flow, variant)
    for run in results:
        if run.flow != flow or run.variant != variant:
            continue
        observed.add_run(run.outcome, run.duration_s)
        for step in run.hops:
            observed.add_hop(step.name, step.kind, step.status, step.latency_s, step.own_latency_s)
    return observed


class StepSamplesLike(Protocol):
    """What the store's `samples()` gives per hop (monitor.store.StepSamples satisfies it)."""

    @property
    def kind(self) -> str: ...

    @property
    def latency_s(self) -> Sequence[float | None]: ...

    @property
    def status(self) -> Sequence[str]: ...

    @property
    def own_latency_s(self) -> Sequence[float | None]: ...


class RunSummaryLike(Protocol):
    """What the store's `list_runs()` gives per run (monitor.store.RunSummary satisfies it)."""

    @property
    def duration_s(self) -> float: ...

    @property
    def outcome(self) -> str: ...

    @property
    def maintenance(self) -> bool: ...


def from_store(
    flow: str,
    variant: str,
    steps: Mapping[str, StepSamplesLike],
    runs: Iterable[RunSummaryLike],
    hops: Sequence[tuple[str, str]] = (),
) -> VariantObservations:
    """Observations from the store's per-hop samples and run summaries of one window.

    `hops` are the flow's (step, kind) pairs from the config: they come first and in the
    flow's order, even without a sample, so a quiet window shows every hop (as nodata);
    hops the store knows but the config no longer has follow in the store's order. Runs in a
    maintenance window are left out (the store's `samples()` leaves out their hops).
    """
    observed = VariantObservations(flow, variant)
    for step, kind in hops:
        observed.link(step, kind)
    for run in runs:
        if not run.maintenance:
            observed.add_run(run.outcome, run.duration_s)
    for name, sample in steps.items():
        own = sample.own_latency_s or [None] * len(sample.status)
        for status, latency, mine in zip(sample.status, sample.latency_s, own, strict=True):
            observed.add_hop(name, sample.kind, status, latency, mine)
    return observed


def metric_samples(
    canary: VariantObservations,
    baseline: VariantObservations,
    critical: Collection[str] = DEFAULT_CRITICAL,
) -> list[MetricSamples]:
    """The judge's input for one flow: per hop latency and error ratio, then the flow's own.

    A hop seen on only one side still yields metrics (with no samples on the other side), so
    the judge reports it as nodata instead of the gate silently dropping it.
    """
    flow = canary.flow
    steps = list(baseline.links) + [s for s in canary.links if s not in baseline.links]
    empty = LinkObservations(kind="")
    metrics: list[MetricSamples] = []
    for step in steps:
        ours, theirs = canary.links.get(step, empty), baseline.links.get(step, empty)
        labels = {"flow": flow, "step": step, "kind": ours.kind or theirs.kind}
        pairs: tuple[tuple[MetricKind, list[float], list[float]], ...] = (
            ("latency", ours.latencies, theirs.latencies),
            ("error_ratio", ours.errors, theirs.errors),
        )
        for kind, c_side, b_side in pairs:
            name = hop_metric(step, kind)
            metrics.append(
                MetricSamples(
                    name=name,
                    kind=kind,
                    canary=list(c_side),
                    baseline=list(b_side),
                    critical=name in critical,
                    labels=labels,
                )
            )
    flow_labels = {"flow": flow}
    metrics.append(
        MetricSamples(
            name=FLOW_DURATION,
            kind="latency",
            canary=list(canary.durations),
            baseline=list(baseline.durations),
            critical=FLOW_DURATION in critical,
            labels=flow_labels,
        )
    )
    metrics.append(
        MetricSamples(
            name=FLOW_ERROR_RATIO,
            kind="error_ratio",
            canary=list(canary.run_errors),
            baseline=list(baseline.run_errors),
            critical=FLOW_ERROR_RATIO in critical,
            labels=flow_labels,
        )
    )
    return metrics
