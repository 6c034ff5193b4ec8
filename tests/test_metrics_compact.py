"""The compact metric families: /metrics byte for byte as prometheus_client writes it, in both
formats and with exemplars, at a fraction of the objects per flow; and the loop-lag sampler.

The reference is the metrics sink as it was with plain prometheus_client instruments (kept
below), fed the same run results under the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import disable_created_metrics, enable_created_metrics

from monitor import __version__
from monitor.config import Flow
from monitor.metric_types import CounterFamily, GaugeFamily, HistogramFamily, incrementer
from monitor.metrics import (
    LAG_BUCKETS,
    LATENCY_BUCKETS,
    Metrics,
    MetricsSink,
    watch_event_loop,
)
from monitor.results import RunOutcome, RunResult, StepResult, StepStatus
from probes.errors import REASONS

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


# -- the reference: the sink as it was, on prometheus_client's own instruments ---------------


class ReferenceMetrics:
    """monitor.metrics.Metrics before the compact families, verbatim."""

    def __init__(self, registry: CollectorRegistry) -> None:
        flow = ["flow", "variant", "location"]
        step = ["flow", "step", "kind", "variant", "location"]
        r = registry
        self.runs = Counter("hopwatch_runs", "Runs by outcome.", [*flow, "outcome"], registry=r)
        self.run_duration = Histogram(
            "hopwatch_run_duration_seconds", "End-to-end duration of a run.", flow,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_duration = Histogram(
            "hopwatch_step_duration_seconds", "Per-hop latency.", step,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_own_duration = Histogram(
            "hopwatch_step_own_duration_seconds",
            "A waiting hop's own latency: from the previous step's end to the arrival.",
            step, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_failures = Counter(
            "hopwatch_step_failures", "Broken links by reason.", [*step, "reason"], registry=r
        )
        self.cleanup_failures = Counter(
            "hopwatch_cleanup_failures", "Cleanup steps that failed (not hops).",
            ["flow", "step", "variant", "location"], registry=r,
        )  # fmt: skip
        self.link_up = Gauge(
            "hopwatch_link_up",
            "1 if the hop passed the last time it ran, 0 if it failed; a hop skipped after a "
            "broken link keeps its value (see hopwatch_link_skipped).",
            ["flow", "step", "variant", "location"], registry=r,
        )  # fmt: skip
        self.link_skipped = Gauge(
            "hopwatch_link_skipped",
            "1 if the hop was skipped in the last run (an earlier hop broke), else 0.",
            ["flow", "step", "variant", "location"], registry=r,
        )  # fmt: skip
        self.flow_up = Gauge("hopwatch_flow_up", "1 if the last run succeeded.", flow, registry=r)
        self.last_success = Gauge(
            "hopwatch_last_success_timestamp_seconds", "Unix time of the last good run.", flow,
            registry=r,
        )  # fmt: skip
        self.tls_expiry = Gauge(
            "hopwatch_tls_cert_expiry_timestamp_seconds",
            "Unix time the server's leaf certificate expires, as the hop last saw it.",
            ["flow", "step", "variant", "location"], registry=r,
        )  # fmt: skip
        self.http_phase = Histogram(
            "hopwatch_http_phase_duration_seconds", "HTTP phase timings.",
            ["flow", "step", "phase"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.arrivals = Counter(
            "hopwatch_arrivals", "Webhooks and messages by outcome.", ["source", "outcome"],
            registry=r,
        )  # fmt: skip
        self.loop_lag = Histogram(
            "hopwatch_event_loop_lag_seconds", "How late the monitor's event loop wakes up.",
            buckets=LAG_BUCKETS, registry=r,
        )  # fmt: skip
        self.scheduler_lag = Histogram(
            "hopwatch_scheduler_lag_seconds", "How late runs start against their schedule.",
            buckets=LAG_BUCKETS, registry=r,
        )  # fmt: skip
        self.sink_errors = Counter(
            "hopwatch_sink_errors", "Results a sink failed to take.", ["sink"], registry=r
        )
        Info("hopwatch_build", "Build information.", registry=r).info({"version": __version__})


class ReferenceSink:
    """monitor.metrics.MetricsSink before the compact families (label children cached)."""

    def __init__(self, metrics: ReferenceMetrics) -> None:
        self.m = metrics
        self._children: dict[tuple[Any, ...], Any] = {}
        self._skipped: set[tuple[str, ...]] = set()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def init_series(self, flows: Sequence[Flow], location: str, max_links: int = 2000) -> None:
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

    def submit(self, result: RunResult) -> None:
        f, v, loc = result.flow, result.variant, result.location
        exemplar = {"trace_id": result.trace_id} if result.trace_id else None
        self._child(self.m.runs, f, v, loc, result.outcome).inc()
        if result.outcome == "aborted":
            return
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
            skipped_key = (f, step.name, v, loc)
            if step.status == "skipped":
                self._child(self.m.link_skipped, *skipped_key).set(1)
                self._skipped.add(skipped_key)
                continue
            self._child(self.m.link_up, f, step.name, v, loc).set(1 if step.passed else 0)
            if skipped_key in self._skipped:
                self._child(self.m.link_skipped, *skipped_key).set(0)
            if step.status == "failed":
                reason = step.reason or "error"
                self._child(self.m.step_failures, f, step.name, step.kind, v, loc, reason).inc()
            if step.status in ("passed", "failed") and step.latency_s is not None:
                child = self._child(self.m.step_duration, f, step.name, step.kind, v, loc)
                child.observe(step.latency_s, exemplar)
                if step.own_latency_s is not None:
                    own = self._child(self.m.step_own_duration, f, step.name, step.kind, v, loc)
                    own.observe(step.own_latency_s, exemplar)
            for phase, seconds in step.phases.items():
                self._child(self.m.http_phase, f, step.name, phase).observe(seconds)
            if step.tls_not_after is not None:
                self._child(self.m.tls_expiry, f, step.name, v, loc).set(step.tls_not_after)


# -- the same observations for both ----------------------------------------------------------


class Clock:
    """time.time() for both libraries: `_created` and exemplar timestamps come out the same."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.125

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def frozen_clock() -> Iterator[Clock]:
    clock = Clock()
    with mock.patch.object(time, "time", clock):
        yield clock


def flows() -> list[Flow]:
    url = "http://127.0.0.1:1/x"
    return [
        Flow.model_validate(
            {
                "name": "checkout",
                "variants": {"stable": {"base_url": url}, "canary": {"base_url": url}},
                "steps": [
                    {"name": "create", "kind": "http", "url": url},
                    {"name": "hook", "kind": "webhook_await", "path": "/hooks/x", "within": "5s"},
                    {
                        "name": "read",
                        "kind": "http_poll",
                        "url": url,
                        "until": {"status": 200},
                        "every": "1s",
                        "within": "5s",
                    },
                ],
                "cleanup": [{"name": "delete", "kind": "http", "method": "DELETE", "url": url}],
            }
        ),
        Flow.model_validate(
            {
                "name": "ping",
                "location": "us-1",
                "steps": [{"name": "get", "kind": "http", "url": url}],
            }
        ),
    ]


# values on bucket bounds, between them, past the last one, zero
LATENCIES = (0.001, 0.0049, 0.005, 1.0, 75.0, 0.0, 0.0003, 0.25, 12.0)
PHASES = ("dns", "connect", "tls", "processing", "transfer")


def step_result(
    round_: int, i: int, name: str, kind: str, status: StepStatus, *, cleanup: bool = False
) -> StepResult:
    latency = LATENCIES[(round_ + i) % len(LATENCIES)]
    phases = {}
    if kind.startswith("http") and status != "skipped":
        phases = {p: latency * (j + 1) / 10 for j, p in enumerate(PHASES[round_ % 3 :])}
    return StepResult(
        name, kind, status, 1_700_000_000.0 + round_, 0.01 * i,
        latency_s=None if status == "failed" and round_ % 4 == 1 else latency,  # a timeout
        reason=(None if round_ % 5 == 2 else REASONS[round_ % len(REASONS)])
        if status == "failed" else None,
        phases=phases, cleanup=cleanup,
        tls_not_after=1.8e9 - round_ * 86400 if kind == "http" and status != "skipped" else None,
        own_latency_s=latency / 2 if kind in ("webhook_await", "kafka_consume") else None,
    )  # fmt: skip


def run_result(
    round_: int, flow: str, variant: str, loc: str, hops: list[tuple[str, str]]
) -> RunResult:
    """Round by round: successes, a link broken at a moving hop, aborted runs, failed cleanup."""
    broken = round_ % len(hops) if round_ % 3 == 1 else None
    steps: list[StepResult] = []
    for i, (name, kind) in enumerate(hops):
        status: StepStatus = "passed"
        if broken is not None and i > broken:
            status = "skipped"
        elif broken == i:
            status = "failed"
        steps.append(step_result(round_, i, name, kind, status))
    if flow == "checkout":
        cleanup_status: StepStatus = "failed" if round_ % 4 == 3 else "passed"
        steps.append(step_result(round_, 9, "delete", "http", cleanup_status, cleanup=True))
    outcome: RunOutcome = (
        "aborted" if round_ % 7 == 5 else "failure" if broken is not None else "success"
    )
    trace_id = (
        None if round_ % 6 == 4 else f"{round_:016x}{zlib.crc32((flow + variant).encode()):016x}"
    )
    return RunResult(
        f"run-{round_}", flow, variant, loc, f"c-{round_}", 1_700_000_000.0 + round_,
        0.3 + LATENCIES[round_ % len(LATENCIES)], outcome, steps, trace_id,
    )  # fmt: skip


HOPS = {
    "checkout": [("create", "http"), ("hook", "webhook_await"), ("read", "http_poll")],
    "ping": [("get", "http")],
    "adhoc": [("one", "http"), ("two", "http")],  # a flow init_series was never told about
}
RUN_KEYS = [
    ("checkout", "stable", "eu-1"),
    ("checkout", "canary", "eu-1"),
    ("ping", "default", "us-1"),
    ("adhoc", "default", "eu-1"),
    ("ping", "default", "eu-1"),  # a location the config does not give the flow
]


def feed(sink: Any, metrics: Any, clock: Clock, rounds: int) -> None:
    """The same results and monitor updates, each round a second later."""
    for round_ in range(rounds):
        clock.now += 1.0
        for flow, variant, loc in RUN_KEYS:
            sink.submit(run_result(round_, flow, variant, loc, HOPS[flow]))
        metrics.arrivals.labels(source="webhook", outcome="matched").inc()
        metrics.arrivals.labels("kafka", "duplicate").inc(round_ % 2)
        incrementer(metrics.arrivals, source="webhook", outcome="late")()  # the correlator's way
        metrics.sink_errors.labels("store").inc(round_ % 2)
        metrics.loop_lag.observe(0.0007 * round_)
        metrics.scheduler_lag.observe(0.05 * (round_ % 3))


def scrape(registry: CollectorRegistry, accept: str) -> str:
    encoder, _ = choose_encoder(accept)
    return str(encoder(registry).decode())


# (name, metrics class, sink class): the reference first
BUILDS: list[tuple[str, Callable[[CollectorRegistry], Any], Callable[[Any], Any]]] = [
    ("reference", ReferenceMetrics, ReferenceSink),
    ("compact", Metrics, lambda m: MetricsSink(m, http_phases=True)),  # as the reference
]


def both(init: Callable[[Any], None] | None, rounds: int) -> tuple[CollectorRegistry, ...]:
    registries = []
    for _, build_metrics, build_sink in BUILDS:
        registry = CollectorRegistry()
        with frozen_clock() as clock:
            metrics = build_metrics(registry)
            sink = build_sink(metrics)
            clock.now += 0.5
            if init is not None:
                init(sink)
            feed(sink, metrics, clock, rounds)
        registries.append(registry)
    return tuple(registries)


@pytest.mark.parametrize(
    "init",
    [
        pytest.param(lambda s: s.init_series(flows(), "eu-1"), id="init_series"),
        pytest.param(lambda s: s.init_series(flows(), "eu-1", max_links=2), id="over_max_links"),
        pytest.param(None, id="no_init_series"),
    ],
)
@pytest.mark.parametrize("accept", ["text/plain", OPENMETRICS])
def test_exposition_is_prometheus_clients(init: Callable[[Any], None] | None, accept: str) -> None:
    reference, compact = both(init, rounds=2)  # early: series still appearing
    assert scrape(compact, accept).splitlines() == scrape(reference, accept).splitlines()
    reference, compact = both(init, rounds=14)
    text = scrape(compact, accept)
    assert text.splitlines() == scrape(reference, accept).splitlines()
    if accept == OPENMETRICS:
        assert ' # {trace_id="' in text  # the bucket exemplars are there, and equal


def test_exposition_without_created_series() -> None:
    disable_created_metrics()  # read at each scrape, by the client and by the families alike
    try:
        reference, compact = both(lambda s: s.init_series(flows(), "eu-1"), rounds=3)
        for accept in ("text/plain", OPENMETRICS):
            text = scrape(compact, accept)
            assert "_created" not in text
            assert text == scrape(reference, accept)
    finally:
        enable_created_metrics()


def test_phase_histograms_only_for_flows_that_ask(registry: CollectorRegistry) -> None:
    """settings.metrics.http_phases (the sink's default) and a flow's own `http_phases`."""
    asked = flows()
    asked[1] = asked[1].model_copy(update={"http_phases": True})  # ping asks, checkout not
    for default, want in ((False, {"ping"}), (True, {"checkout", "ping"})):
        reg = CollectorRegistry()
        sink = MetricsSink(Metrics(reg), http_phases=default)
        sink.init_series(asked, "eu-1")
        for flow, variant, loc in RUN_KEYS:
            sink.submit(run_result(0, flow, variant, loc, HOPS[flow]))
        phased = {
            s.labels["flow"]
            for family in reg.collect()
            if family.name == "hopwatch_http_phase_duration_seconds"
            for s in family.samples
        }
        # adhoc was never configured: it follows the default
        assert phased == want | ({"adhoc"} if default else set())


def test_failure_counters_appear_with_the_first_failure(registry: CollectorRegistry) -> None:
    """No zero series per reason before a hop fails (8 series a link for http); a reason's
    series appears with its first failure, and only for the hop that failed."""
    sink = MetricsSink(Metrics(registry))
    sink.init_series(flows(), "eu-1")
    names = {s.name for family in registry.collect() for s in family.samples}
    assert "hopwatch_step_failures_total" not in names
    assert "hopwatch_cleanup_failures_total" in names  # a cleanup's failures still are, at 0
    sink.submit(run_result(1, "ping", "default", "us-1", HOPS["ping"]))  # round 1: get breaks
    failures = [
        (s.labels["step"], s.labels["reason"], s.value)
        for family in registry.collect()
        for s in family.samples
        if s.name == "hopwatch_step_failures_total"
    ]
    assert len(failures) == 1 and failures[0][0] == "get" and failures[0][2] == 1.0


def test_configured_series_wait_for_their_first_update(registry: CollectorRegistry) -> None:
    """init_series builds every record up front, but only the run (and cleanup failure)
    counters are exported before a run: a flow_up of 0 would claim the flow is down."""
    sink = MetricsSink(Metrics(registry))
    sink.init_series(flows(), "eu-1")
    labels = {"flow": "ping", "variant": "default", "location": "us-1"}
    assert registry.get_sample_value("hopwatch_runs_total", {**labels, "outcome": "failure"}) == 0
    assert registry.get_sample_value("hopwatch_flow_up", labels) is None
    assert registry.get_sample_value("hopwatch_run_duration_seconds_count", labels) is None
    sink.submit(run_result(0, "ping", "default", "us-1", HOPS["ping"]))
    assert registry.get_sample_value("hopwatch_flow_up", labels) == 1
    assert registry.get_sample_value("hopwatch_run_duration_seconds_count", labels) == 1


# -- the families against prometheus_client's instruments, for any observations --------------

amounts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([*LATENCY_BUCKETS, 0.0, -0.0]),
)
labelsets = st.sampled_from([("a", "x"), ("b", "x"), ("a", 'q"\\\n')])
trace_ids = st.one_of(st.none(), st.text("0123456789abcdef", min_size=1, max_size=32))
ops = st.lists(
    st.tuples(st.sampled_from(["observe", "inc", "set"]), labelsets, amounts, trace_ids),
    max_size=40,
)


def build(compact: bool, registry: CollectorRegistry) -> tuple[Any, Any, Any]:
    if compact:
        return (
            HistogramFamily("h_seconds", "H.", ["k", "l"], registry, buckets=LATENCY_BUCKETS),
            CounterFamily("c_total", "C.", ["k", "l"], registry),
            GaugeFamily("g", "G.", ["k", "l"], registry),
        )
    return (
        Histogram("h_seconds", "H.", ["k", "l"], registry=registry, buckets=LATENCY_BUCKETS),
        Counter("c_total", "C.", ["k", "l"], registry=registry),
        Gauge("g", "G.", ["k", "l"], registry=registry),
    )


@settings(max_examples=60, deadline=None)
@given(ops=ops)
def test_families_match_the_client_for_any_observations(
    ops: list[tuple[str, tuple[str, str], float, str | None]],
) -> None:
    texts = []
    for compact in (False, True):
        registry = CollectorRegistry()
        with frozen_clock() as clock:
            histogram, counter, gauge = build(compact, registry)
            for op, labels, amount, trace_id in ops:
                clock.now += 0.25
                exemplar = {"trace_id": trace_id} if trace_id else None
                if op == "observe":
                    histogram.labels(*labels).observe(amount, exemplar)
                elif op == "inc" and amount >= 0:  # the client refuses negatives (and NaN)
                    counter.labels(k=labels[0], l=labels[1]).inc(amount, exemplar)
                elif op == "set":
                    gauge.labels(*labels).set(amount)
        texts.append(scrape(registry, OPENMETRICS))
    assert texts[1] == texts[0]


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, (0.0011, 0.0012, 0.07, 0.0707, 3.0)])
def test_native_series_count_classic_buckets_as_a_bisection_does(
    buckets: Sequence[float],
) -> None:
    """A native series takes an observation's classic bucket from its native one where that
    lies in one classic bucket (no bisection): at, just beside and between every bound, and
    bounds closer together than a native bucket, the counts are the bisection's."""
    rng = random.Random(7)
    values = [10 ** rng.uniform(-5, 2) for _ in range(3000)]
    for bound in buckets:
        values += [bound, math.nextafter(bound, 0), math.nextafter(bound, math.inf)]
        values += [bound * (1 + 1e-12), bound * (1 - 1e-12), bound * 1.05, bound / 1.05]
    native = HistogramFamily("n_seconds", "N.", ["k"], buckets=buckets, native=True)
    plain = HistogramFamily("p_seconds", "P.", ["k"], buckets=buckets)
    at, ref, counts = native.reserve(("x",)), plain.reserve(("x",)), len(native.bounds)
    for value in values * 2:  # the second time from what the first remembered
        native.observe_at(at, value)
        plain.observe_at(ref, value)
        assert native._data[at : at + counts] == plain._data[ref : ref + counts], value


def test_family_api_behaves_like_the_client(registry: CollectorRegistry) -> None:
    runs = CounterFamily("runs_total", "R.", ["flow", "outcome"], registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        CounterFamily("runs", "again", ["flow", "outcome"], registry)
    with pytest.raises(ValueError, match="Incorrect label count"):
        runs.labels("only-one")
    with pytest.raises(ValueError, match="Incorrect label names"):
        runs.labels(flow="f", result="x")
    with pytest.raises(ValueError, match="Can't pass both"):
        runs.labels("f", outcome="x")
    with pytest.raises(ValueError, match="non-negative"):
        runs.labels("f", "ok").inc(-1)
    runs.labels(flow="f", outcome=200).inc(2)  # label values are strings, as in the client
    assert registry.get_sample_value("runs_total", {"flow": "f", "outcome": "200"}) == 2
    lag = HistogramFamily("lag_seconds", "L.", registry=registry, buckets=LAG_BUCKETS)
    lag.observe(0.003)
    assert registry.get_sample_value("lag_seconds_bucket", {"le": "0.005"}) == 1
    assert registry.get_sample_value("lag_seconds_count") == 1
    with pytest.raises(ValueError, match="No label names"):
        lag.labels("x")
    with pytest.raises(ValueError, match="missing label values"):
        HistogramFamily("h", "H.", ["a"], buckets=LAG_BUCKETS).observe(1.0)
    with pytest.raises(ValueError, match="exceeding the limit of 128"):
        HistogramFamily("h", "H.", ["a"], buckets=LAG_BUCKETS).labels("x").observe(
            1.0, {"trace_id": "f" * 121}
        )
    with pytest.raises(ValueError, match="sorted"):
        HistogramFamily("h", "H.", buckets=(1.0, 0.5))
    up = GaugeFamily("up", "U.", ["x"], registry)
    up.labels("a").set(3)
    up.labels("a").dec(0.5)
    assert registry.get_sample_value("up", {"x": "a"}) == 2.5


# -- cost ------------------------------------------------------------------------------------

N_FLOWS = 300


def one_step_flows(n: int) -> list[Flow]:
    return [
        Flow.model_validate(
            {"name": f"flow{i}", "steps": [{"name": "get", "kind": "http", "url": "http://h/"}]}
        )
        for i in range(n)
    ]


def one_step_result(i: int) -> RunResult:
    phases = {"connect": 0.0004, "processing": 0.05, "transfer": 0.0002}
    step = StepResult("get", "http", "passed", 1.7e9, 0.0, latency_s=0.051, phases=phases)
    return RunResult(
        f"run-{i}", f"flow{i}", "default", "loc", "c", 1.7e9, 0.052, "success", [step],
        trace_id=f"{i:032x}",
    )  # fmt: skip


def cost_per_flow(
    build_metrics: Callable[..., Any], build_sink: Callable[..., Any]
) -> tuple[float, float]:
    """GC-tracked objects and bytes added per configured flow by init_series and one run each
    (10,000 flows with one http step: what the scale benchmark configures)."""
    configured = one_step_flows(N_FLOWS)
    results = [one_step_result(i) for i in range(N_FLOWS)]
    sink = build_sink(build_metrics(CollectorRegistry()))
    gc.collect()
    objects = len(gc.get_objects())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        sink.init_series(configured, "loc")
        for result in results:
            sink.submit(result)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return (len(gc.get_objects()) - objects) / N_FLOWS, grown / N_FLOWS


def test_a_flow_costs_three_tracked_objects_and_a_sixth_of_the_memory() -> None:
    ref_objects, ref_bytes = cost_per_flow(ReferenceMetrics, ReferenceSink)
    classic = partial(Metrics, native=False)
    objects, size = cost_per_flow(classic, BUILDS[1][2])
    # prometheus_client: a child, a lock and a value object per bucket of each histogram
    # series (~195 objects per flow here); compact: the run record, its hop record and the
    # hops dict are GC-tracked, the numbers sit in lists of floats (2 histograms and 3 phase
    # histograms)
    assert ref_objects > 150
    assert objects <= 4, f"{objects:.1f} GC-tracked objects per flow (client: {ref_objects:.0f})"
    assert size <= 7000, f"{size:.0f} bytes per flow (client: {ref_bytes:.0f})"
    assert size * 5 < ref_bytes
    # native buckets (the default): a dict of ints per histogram series, which the garbage
    # collector does not track; the client keeps none
    native_objects, native_size = cost_per_flow(*BUILDS[1][1:])
    assert native_objects <= objects + 0.1, "native buckets must not add tracked objects"
    per_series = (native_size - size) / 5
    assert per_series <= 320, f"{per_series:.0f} bytes of native buckets per histogram series"


def test_submit_is_several_times_cheaper_than_the_client() -> None:
    """CPU per run through the sink, best of interleaved rounds (the machine is shared).

    Like for like, classic buckets only (the client keeps no native ones), three times
    cheaper; the native buckets then add under a microsecond per observation (five here)."""
    builds = {
        "reference": BUILDS[0][1:],
        "compact": (partial(Metrics, native=False), BUILDS[1][2]),
        "native": BUILDS[1][1:],
    }
    costs: dict[str, float] = dict.fromkeys(builds, math.inf)
    sinks: dict[str, Any] = {}
    for name, (build_metrics, build_sink) in builds.items():
        sinks[name] = build_sink(build_metrics(CollectorRegistry()))
        sinks[name].init_series(one_step_flows(50), "loc")
    results = [one_step_result(i % 50) for i in range(500)]
    for _ in range(5):
        for name, sink in sinks.items():
            started = time.process_time()
            for result in results:
                sink.submit(result)
            costs[name] = min(costs[name], (time.process_time() - started) / len(results))
    assert costs["compact"] * 3 < costs["reference"], costs
    assert costs["native"] - costs["compact"] < 5 * 1e-6, costs


# -- the event-loop sampler ------------------------------------------------------------------


async def test_loop_lag_catches_a_pause_shorter_than_the_interval(
    registry: CollectorRegistry,
) -> None:
    """A 60 ms stall between samples of a 200 ms interval is seen: the loop is sampled every
    20 ms and each interval reports its worst lag."""
    metrics = Metrics(registry)
    watcher = asyncio.create_task(watch_event_loop(metrics, interval=0.2, every=0.02))
    await asyncio.sleep(0.05)  # the watcher is ticking
    # a stall the loop cannot see coming, as a full garbage collection is: blocking on purpose
    time.sleep(0.06)  # noqa: ASYNC251

    def count(le: str | None = None) -> float:
        name = "hopwatch_event_loop_lag_seconds"
        if le is None:
            return registry.get_sample_value(f"{name}_count") or 0.0
        return registry.get_sample_value(f"{name}_bucket", {"le": le}) or 0.0

    for _ in range(100):  # bounded: an interval is 0.2 s
        if count() >= 2:
            break
        await asyncio.sleep(0.02)
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    assert count() >= 2
    assert count(le="0.025") < count()  # one interval saw ≥ 25 ms of lag
    assert (registry.get_sample_value("hopwatch_event_loop_lag_seconds_sum") or 0.0) >= 0.03
