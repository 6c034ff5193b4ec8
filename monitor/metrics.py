"""The Prometheus metrics users build on (README, "Metrics"), and the sink that makes them.

Instruments live on an injected registry (a fresh one per test). The per-flow families are the
compact ones of monitor/metric_types.py (one list of floats per family instead of ~100 objects and
locks per flow, same exposition); the engine is single-threaded, so they take no locks. The
sink looks up one pre-built record per (flow, variant, location) per run instead of a label
lookup per update; the records of configured flows are built at start-up by `init_series`, so
they are in place before `gc.freeze()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitor import __version__
from monitor.config import Flow
from monitor.metric_types import CounterFamily, GaugeFamily, HistogramFamily
from monitor.metrics_settings import LATENCY_BUCKETS
from monitor.results import RunResult, StepResult
from probes.base import Reading, Shared

log = logging.getLogger(__name__)

# The phases keep the default latency buckets (monitor/metrics_settings.py), whatever a config
# gives the run and hop histograms: only flows that ask for them (`http_phases`) have them.
PHASE_BUCKETS = LATENCY_BUCKETS
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OUTCOMES = ("success", "failure", "aborted")
EXEMPLAR_TRACE_ID_MAX = 120  # OpenMetrics caps exemplar labels at 128 runes; "trace_id" is 8

METRIC_NAMES: dict[str, str] = {
    "hopwatch_runs_total": "counter",
    "hopwatch_run_duration_seconds": "histogram",
    "hopwatch_step_duration_seconds": "histogram",
    "hopwatch_step_own_duration_seconds": "histogram",
    "hopwatch_step_failures_total": "counter",
    "hopwatch_cleanup_failures_total": "counter",
    "hopwatch_link_up": "gauge",
    "hopwatch_link_skipped": "gauge",
    "hopwatch_flow_up": "gauge",
    "hopwatch_last_success_timestamp_seconds": "gauge",
    "hopwatch_http_phase_duration_seconds": "histogram",
    "hopwatch_tls_cert_expiry_timestamp_seconds": "gauge",
    "hopwatch_arrivals_total": "counter",
    "hopwatch_event_loop_lag_seconds": "histogram",
    "hopwatch_scheduler_lag_seconds": "histogram",
    "hopwatch_sink_errors_total": "counter",
    "hopwatch_build_info": "gauge",
    "hopwatch_gate_verdicts_total": "counter",  # monitor/gate/service.py
    "hopwatch_gate_score": "gauge",
    "hopwatch_maintenance": "gauge",  # monitor/maintenance/book.py
}


class Metrics:
    """Every instrument hopwatch exports, registered on one registry.

    `sink_errors` stays a prometheus_client Counter (a handful of series, FanOut is typed
    against `Counter`). `arrivals` is a compact family too, though it has a handful of series
    as well: it counts every webhook and record, and a prometheus_client child's `inc` (four
    calls and a lock) was ~1.5 % of a webhook's instructions.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        buckets: Sequence[float] = LATENCY_BUCKETS,
        *,
        native: bool = True,
        classic_with_native: bool = False,
    ) -> None:
        self.registry = registry
        # The latency histograms (not the monitor's own lags, two series in all) keep native
        # buckets for protobuf scrapers: settings.metrics.native_histograms.
        latency = {"native": native, "classic_with_native": classic_with_native}
        flow = ["flow", "variant", "location"]
        step = ["flow", "step", "kind", "variant", "location"]
        self.runs = CounterFamily("hopwatch_runs", "Runs by outcome.", [*flow, "outcome"],
                                  registry)  # fmt: skip
        self.run_duration = HistogramFamily(
            "hopwatch_run_duration_seconds", "End-to-end duration of a run.", flow, registry,
            buckets=buckets, **latency,
        )  # fmt: skip
        self.step_duration = HistogramFamily(
            "hopwatch_step_duration_seconds", "Per-hop latency.", step, registry,
            buckets=buckets, **latency,
        )  # fmt: skip
        # A waiting hop's latency runs from its trigger's start, so it contains the hops
        # before it; its own part (from the previous step's end to the arrival) is what
        # changed when this hop changed. Only waiting hops have series here.
        self.step_own_duration = HistogramFamily(
            "hopwatch_step_own_duration_seconds",
            "A waiting hop's own latency: from the previous step's end to the arrival.",
            step, registry, buckets=buckets, **latency,
        )  # fmt: skip
        self.step_failures = CounterFamily(
            "hopwatch_step_failures", "Broken links by reason.", [*step, "reason"], registry
        )
        self.cleanup_failures = CounterFamily(
            "hopwatch_cleanup_failures", "Cleanup steps that failed (not hops).",
            ["flow", "step", "variant", "location"], registry,
        )  # fmt: skip
        # A skipped hop (after a broken link) leaves link_up as it was: the hop did not run, so
        # it neither passed nor broke, and one break is counted once. link_skipped says so.
        self.link_up = GaugeFamily(
            "hopwatch_link_up",
            "1 if the hop passed the last time it ran, 0 if it failed; a hop skipped after a "
            "broken link keeps its value (see hopwatch_link_skipped).",
            ["flow", "step", "variant", "location"], registry,
        )  # fmt: skip
        self.link_skipped = GaugeFamily(
            "hopwatch_link_skipped",
            "1 if the hop was skipped in the last run (an earlier hop broke), else 0.",
            ["flow", "step", "variant", "location"], registry,
        )  # fmt: skip
        self.flow_up = GaugeFamily("hopwatch_flow_up", "1 if the last run succeeded.", flow,
                                   registry)  # fmt: skip
        self.last_success = GaugeFamily(
            "hopwatch_last_success_timestamp_seconds", "Unix time of the last good run.", flow,
            registry,
        )  # fmt: skip
        self.tls_expiry = GaugeFamily(
            "hopwatch_tls_cert_expiry_timestamp_seconds",
            "Unix time the server's leaf certificate expires, as the hop last saw it.",
            ["flow", "step", "variant", "location"], registry,
        )  # fmt: skip
        self.http_phase = HistogramFamily(
            "hopwatch_http_phase_duration_seconds", "HTTP phase timings.",
            ["flow", "step", "phase"], registry, buckets=PHASE_BUCKETS, **latency,
        )  # fmt: skip
        self.arrivals = CounterFamily(
            "hopwatch_arrivals", "Webhooks and messages by outcome.", ["source", "outcome"],
            registry,
        )  # fmt: skip
        self.loop_lag = HistogramFamily(
            "hopwatch_event_loop_lag_seconds", "How late the monitor's event loop wakes up.",
            registry=registry, buckets=LAG_BUCKETS,
        )  # fmt: skip
        self.scheduler_lag = HistogramFamily(
            "hopwatch_scheduler_lag_seconds", "How late runs start against their schedule.",
            registry=registry, buckets=LAG_BUCKETS,
        )  # fmt: skip
        self.sink_errors = Counter(
            "hopwatch_sink_errors", "Results a sink failed to take.", ["sink"], registry=registry
        )
        build = Info("hopwatch_build", "Build information.", registry=registry)
        build.info({"version": __version__})


class _Hop:
    """Where one hop's updates go, as offsets into the families (see metric_types.Family)."""

    __slots__ = (
        "duration",
        "failures",
        "kind",
        "link_up",
        "own",
        "phases",
        "skipped",
        "tls_expiry",
    )

    def __init__(self, m: Metrics, flow: str, step: str, kind: str, variant: str, loc: str):
        self.kind = kind
        self.link_up = m.link_up.reserve((flow, step, variant, loc))
        self.skipped = -1  # link_skipped's offset, reserved when the hop is first skipped
        self.own = -1  # step_own_duration's offset, reserved when the hop first reports one
        self.duration = m.step_duration.reserve((flow, step, kind, variant, loc))
        self.failures: dict[str, int] = {}  # reason → offset, filled when first needed
        self.phases: dict[str, int] = {}  # phase → offset, filled when first seen
        self.tls_expiry: int | None = None  # offset, reserved when a certificate is first seen


class _Run:
    """Every series one (flow, variant, location) run touches: built once, looked up once."""

    __slots__ = ("cleanup", "duration", "flow", "flow_up", "hops", "last_success", "loc",
                 "outcomes", "phases", "variant")  # fmt: skip

    def __init__(self, m: Metrics, flow: str, variant: str, loc: str, phases: bool) -> None:
        self.flow, self.variant, self.loc = flow, variant, loc
        self.phases = phases  # whether the flow's HTTP phase histograms are exported
        key = (flow, variant, loc)
        self.outcomes = {o: m.runs.reserve((*key, o)) for o in OUTCOMES}
        self.duration = m.run_duration.reserve(key)
        self.flow_up = m.flow_up.reserve(key)
        self.last_success = m.last_success.reserve(key)
        self.hops: dict[str, _Hop] = {}
        self.cleanup: dict[str, int] = {}  # cleanup step → offset of its failure counter

    def hop(self, m: Metrics, step: str, kind: str) -> _Hop:
        hop = self.hops.get(step)
        if hop is None or hop.kind != kind:
            hop = self.hops[step] = _Hop(m, self.flow, step, kind, self.variant, self.loc)
        return hop


class MetricsSink:
    """Turns each RunResult into metric updates through one pre-built record per run key."""

    def __init__(self, metrics: Metrics, *, http_phases: bool = False) -> None:
        self.m = metrics
        self.http_phases = http_phases  # settings.metrics.http_phases: flows that do not say
        self._runs: dict[tuple[str, str, str], _Run] = {}
        self._early: set[str] = set()  # runs whose hops `verdict` already counted

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _run(self, flow: str, variant: str, loc: str, phases: bool | None = None) -> _Run:
        key = (flow, variant, loc)
        run = self._runs.get(key)
        if run is None:
            wanted = self.http_phases if phases is None else phases
            run = self._runs[key] = _Run(self.m, flow, variant, loc, wanted)
        elif phases is not None:
            run.phases = phases  # a reload changed the flow's choice
        return run

    def init_series(self, flows: Sequence[Flow], location: str, max_links: int = 2000) -> None:
        """Build every configured run's record, and export each flow's run counters and its
        cleanups' failure counters at 0 (up to `max_links`), so the first failure is an
        increase that rate() and alerts see.

        A hop's failure counters are not exported before its first failure: one per reason the
        kind knows (8 for http) was 8 series a link that never failed; the alert and the
        boards count a failure series that has just appeared (deploy/prometheus/rules)."""
        m = self.m
        links = sum(len(f.steps) * len(f.variants) for f in flows)
        for flow in flows:
            loc = flow.location or location
            for variant in flow.variants:
                run = self._run(flow.name, variant, loc, flow.http_phases)
                for offset in run.outcomes.values():
                    m.runs.show(offset)
                for step in flow.steps:
                    run.hop(m, step.name, step.kind)
                if links > max_links:
                    continue
                for step in flow.cleanup:
                    m.cleanup_failures.show(self._cleanup(run, step.name))

    def forget(self, flows: Iterable[str], *, every_series: bool = False) -> None:
        """Remove the gauges of flows this replica no longer runs (`flow_up`, `link_up`,
        `link_skipped`, `last_success_timestamp_seconds`, the certificate expiry), so Prometheus
        never sees two owners' values; the counters and histograms stay (they only grow, and
        rules sum replicas away). With `every_series`, those too: the flow is gone (a reload)."""
        names = set(flows)
        m = self.m
        for (flow, _, _), run in self._runs.items():
            if flow not in names:
                continue
            m.flow_up.hide(run.flow_up)
            m.last_success.hide(run.last_success)
            for hop in run.hops.values():
                m.link_up.hide(hop.link_up)
                if hop.skipped >= 0:
                    m.link_skipped.hide(hop.skipped)
                if hop.tls_expiry is not None:
                    m.tls_expiry.hide(hop.tls_expiry)
            if every_series:
                self._hide_history(run)

    def _hide_history(self, run: _Run) -> None:
        m = self.m
        for offset in run.outcomes.values():
            m.runs.hide(offset)
        m.run_duration.hide(run.duration)
        for offset in run.cleanup.values():
            m.cleanup_failures.hide(offset)
        for hop in run.hops.values():
            m.step_duration.hide(hop.duration)
            if hop.own >= 0:
                m.step_own_duration.hide(hop.own)
            for offset in hop.failures.values():
                m.step_failures.hide(offset)
            for offset in hop.phases.values():
                m.http_phase.hide(offset)

    def _cleanup(self, run: _Run, step: str) -> int:
        offset = run.cleanup.get(step)
        if offset is None:
            key = (run.flow, step, run.variant, run.loc)
            offset = run.cleanup[step] = self.m.cleanup_failures.reserve(key)
        return offset

    def _failure(self, run: _Run, hop: _Hop, step: str, reason: str) -> int:
        offset = hop.failures.get(reason)
        if offset is None:
            key = (run.flow, step, hop.kind, run.variant, run.loc, reason)
            offset = hop.failures[reason] = self.m.step_failures.reserve(key)
        return offset

    def verdict(self, result: RunResult) -> None:
        """A run's hops, before its cleanup runs: the links' and the flow's state and the hops'
        figures now; the run's own count and duration come with `submit`."""
        self._early.add(result.run_id)
        self._links(self._record(result), result)

    def submit(self, result: RunResult) -> None:
        run = self._record(result)
        m = self.m
        outcome = result.outcome
        offset = run.outcomes.get(outcome)
        if offset is None:  # not one of OUTCOMES: counted all the same, as before
            key = (run.flow, run.variant, run.loc, outcome)
            offset = run.outcomes[outcome] = m.runs.reserve(key)
        m.runs.inc_at(offset)
        if outcome == "aborted":
            return  # a run cut short by shutdown says nothing about the target
        early = self._early
        if early and result.run_id in early:  # most runs have no cleanup: no verdict came
            early.discard(result.run_id)
        else:
            self._links(run, result)
        m.run_duration.observe_at(run.duration, result.duration_s, result.trace_id)
        for step in result.steps:
            if step.cleanup and step.status == "failed":
                m.cleanup_failures.inc_at(self._cleanup(run, step.name))

    def _record(self, result: RunResult) -> _Run:
        run = self._runs.get((result.flow, result.variant, result.location))
        if run is None:  # a flow init_series was not told about (tests, `check`)
            run = self._run(result.flow, result.variant, result.location)
        trace_id = result.trace_id
        if trace_id is not None and len(trace_id) > EXEMPLAR_TRACE_ID_MAX:
            raise ValueError(f"trace id too long for an exemplar: {len(trace_id)} characters")
        return run

    def _links(self, run: _Run, result: RunResult) -> None:
        """The flow's and its hops' state and figures from a run's (finished) hops."""
        m = self.m
        if result.outcome == "success":
            m.flow_up.set_at(run.flow_up, 1.0)
            m.last_success.set_at(run.last_success, result.started_at + result.duration_s)
        else:
            m.flow_up.set_at(run.flow_up, 0.0)
        hops, trace_id = run.hops, result.trace_id
        for step in result.steps:
            if not step.cleanup:
                hop = hops.get(step.name)
                if hop is None or hop.kind != step.kind:
                    hop = run.hop(m, step.name, step.kind)
                self._hop(run, hop, step, trace_id)

    def _hop(self, run: _Run, hop: _Hop, step: StepResult, trace_id: str | None) -> None:
        m = self.m
        status = step.status
        if status == "skipped":
            if hop.skipped < 0:
                key = (run.flow, step.name, run.variant, run.loc)
                hop.skipped = m.link_skipped.reserve(key)
            m.link_skipped.set_at(hop.skipped, 1.0)
            return
        m.link_up.set_at(hop.link_up, 1.0 if status == "passed" else 0.0)
        if hop.skipped >= 0:
            m.link_skipped.set_at(hop.skipped, 0.0)
        if status == "failed":
            m.step_failures.inc_at(self._failure(run, hop, step.name, step.reason or "error"))
        latency = step.latency_s
        if latency is not None and (status == "passed" or status == "failed"):
            m.step_duration.observe_at(hop.duration, latency, trace_id)
            own = step.own_latency_s
            if own is not None:
                if hop.own < 0:
                    labels = (run.flow, step.name, hop.kind, run.variant, run.loc)
                    hop.own = m.step_own_duration.reserve(labels)
                m.step_own_duration.observe_at(hop.own, own, trace_id)
        if step.phases and run.phases:
            self._phases(run, hop, step)
        if step.tls_not_after is not None:
            if hop.tls_expiry is None:
                key = (run.flow, step.name, run.variant, run.loc)
                hop.tls_expiry = m.tls_expiry.reserve(key)
            m.tls_expiry.set_at(hop.tls_expiry, step.tls_not_after)

    def _phases(self, run: _Run, hop: _Hop, step: StepResult) -> None:
        m = self.m
        phases = hop.phases
        for phase, seconds in step.phases.items():
            offset = phases.get(phase)
            if offset is None:
                offset = phases[phase] = m.http_phase.reserve((run.flow, step.name, phase))
            m.http_phase.observe_at(offset, seconds)


class SharedReadings(Collector):
    """The figures the kinds' shared resources report (`readings()`: a browser's memory), read
    at scrape time; the kind names its series, so the engine needs to know none."""

    def __init__(self, shared: Mapping[str, Shared]) -> None:
        self._shared = shared

    def collect(self) -> Iterator[Metric]:
        for kind, resources in list(self._shared.items()):
            readings = getattr(resources, "readings", None)
            if readings is None:
                continue
            try:
                found: list[Reading] = list(readings())
            except Exception:  # a scrape must not fail for one kind's trouble
                log.exception("the %s kind's readings failed", kind)
                continue
            for reading in found:
                family = GaugeMetricFamily if reading.type == "gauge" else CounterMetricFamily
                yield family(reading.name, reading.help, value=reading.value)


async def watch_event_loop(metrics: Metrics, interval: float = 0.25, every: float = 0.05) -> None:
    """Measure how late the loop wakes up: a monitor too busy to measure says so.

    The loop is sampled every `every` seconds (a timer callback, cheaper than a sleeping
    task) and the worst lag of each `interval` is observed: a 100 ms garbage-collection pause
    between two 250 ms samples is not missed, and the histogram still gets one value per
    `interval`. Runs until cancelled.
    """
    loop = asyncio.get_running_loop()
    observe = metrics.loop_lag.observe
    handle: asyncio.TimerHandle | None = None
    worst = 0.0
    window_end = loop.time() + interval

    def tick(planned: float) -> None:
        nonlocal handle, worst, window_end
        now = loop.time()
        worst = max(worst, now - planned)
        if now >= window_end:
            observe(worst)
            worst, window_end = 0.0, now + interval
        handle = loop.call_at(now + every, tick, now + every)

    handle = loop.call_at(loop.time() + every, tick, loop.time() + every)
    try:
        await loop.create_future()  # the timer chain does the work; wait to be cancelled
    finally:
        handle.cancel()
