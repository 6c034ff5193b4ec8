"""/metrics in Prometheus's protobuf format (monitor/metric_proto.py): negotiated by Accept, parsed
by the official message types (tests/fixtures/metrics_pb2.py), the latency histograms native, and
scraped by a real Prometheus with native histograms on."""

from __future__ import annotations

import math
import random
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from google.protobuf.internal.decoder import _DecodeVarint32
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitor.admin import build_admin_app
from monitor.metric_native import (
    MAX_BUCKETS,
    SCHEMA,
    ZERO_THRESHOLD,
    NativeBuckets,
    bucket_index,
    spans,
    upper_bound,
)
from monitor.metric_proto import CONTENT_TYPE, encode, wants_protobuf
from monitor.metric_text import choose_encoder
from monitor.metric_text import encode as encode_text
from monitor.metric_types import HistogramFamily, set_created_series
from monitor.metrics import Metrics
from tests.fixtures import metrics_pb2 as pb
from tests.fixtures.prometheus import PrometheusFactory, SampleHopwatch

# What Prometheus 2.42 sends with --enable-feature=native-histograms, and without it
PROMETHEUS_NATIVE = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,"
    "application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROMETHEUS_CLASSIC = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
LATENCY = (
    "hopwatch_run_duration_seconds", "hopwatch_step_duration_seconds",
    "hopwatch_step_own_duration_seconds", "hopwatch_http_phase_duration_seconds",
)  # fmt: skip


@pytest.fixture(autouse=True)
def no_created() -> Iterator[None]:
    set_created_series(False)  # as hopwatch's engine sets it unless asked
    try:
        yield
    finally:
        set_created_series(True)


def parse(body: bytes) -> dict[str, Any]:
    """Delimited MetricFamily messages, by name, read with the official message types."""
    families: dict[str, Any] = {}
    pos = 0
    while pos < len(body):
        size, pos = _DecodeVarint32(body, pos)
        family = pb.MetricFamily()
        family.ParseFromString(body[pos : pos + size])
        pos += size
        families[family.name] = family
    return families


def labels_of(metric: Any) -> dict[str, str]:
    return {pair.name: pair.value for pair in metric.label}


def native_buckets(h: Any) -> dict[int, int]:
    """index → count of a native histogram's positive buckets, from its spans and deltas."""
    out, index, count, deltas = {}, 0, 0, iter(h.positive_delta)
    for i, span in enumerate(h.positive_span):
        index = span.offset if i == 0 else index + span.offset
        for _ in range(span.length):
            count += next(deltas)
            if count:
                out[index] = count
            index += 1
    return out


def sample_registry(rounds: int = 6, **metrics: bool) -> CollectorRegistry:
    """Every hopwatch metric after a few rounds of the dashboards' sample (Metrics options)."""
    registry = CollectorRegistry()
    sample = SampleHopwatch(registry, **metrics)
    for _ in range(rounds):
        sample.tick()
    return registry


# -- negotiation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "protobuf"),
    [
        (PROMETHEUS_NATIVE, True),
        (PROMETHEUS_CLASSIC, False),
        ("", False),
        ("*/*", False),
        (
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
            "encoding=delimited",
            True,
        ),
        # a lower weight than the text formats': the scraper prefers text
        (
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
            "encoding=delimited;q=0.3,text/plain;version=0.0.4;q=0.5",
            False,
        ),
        # other encodings or messages are not what this writes
        (
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text",
            False,
        ),
        ("application/vnd.google.protobuf;proto=other.Message;encoding=delimited", False),
        (
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
            "encoding=delimited;q=0",
            False,
        ),
    ],
)
def test_protobuf_is_chosen_only_when_asked_for_most(accept: str, protobuf: bool) -> None:
    assert wants_protobuf(accept) is protobuf
    _, content_type = choose_encoder(accept)
    assert (content_type == CONTENT_TYPE) is protobuf


async def test_the_admin_listener_answers_each_scraper_in_its_format() -> None:
    registry = sample_registry()
    server = TestServer(build_admin_app(registry, ready=lambda: True), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}/metrics"
            async with session.get(url, headers={"Accept": PROMETHEUS_NATIVE}) as resp:
                assert resp.headers["Content-Type"] == CONTENT_TYPE
                families = parse(await resp.read())
            async with session.get(url, headers={"Accept": PROMETHEUS_CLASSIC}) as resp:
                assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
                text = await resp.text()
    finally:
        await server.close()
    h = families["hopwatch_step_duration_seconds"].metric[0].histogram
    assert h.schema == SCHEMA and h.positive_span
    # text scrapers keep the classic buckets
    assert 'hopwatch_step_duration_seconds_bucket{flow="checkout"' in text


# -- the message ------------------------------------------------------------------------------


def test_every_family_round_trips_with_the_text_formats_values() -> None:
    registry = sample_registry()
    families = parse(encode(registry))
    written = encode_text(registry, openmetrics=False).decode()
    text = {f.name: f for f in text_string_to_metric_families(written)}
    assert set(families) == {f"{n}_total" if f.type == "counter" else n for n, f in text.items()}
    for name, family in text.items():
        proto = families[name + "_total" if family.type == "counter" else name]
        assert proto.help == family.documentation
        if family.type == "counter":
            assert proto.type == pb.COUNTER
            want = {tuple(sorted(s.labels.items())): s.value for s in family.samples}
            got = {tuple(sorted(labels_of(m).items())): m.counter.value for m in proto.metric}
            assert got == want
        elif family.type == "histogram":
            assert proto.type == pb.HISTOGRAM
            counts = {tuple(sorted(s.labels.items())): s.value for s in family.samples
                      if s.name.endswith("_count")}  # fmt: skip
            got = {tuple(sorted(labels_of(m).items())): m.histogram.sample_count
                   for m in proto.metric}  # fmt: skip
            assert got == counts
    for metric in families["hopwatch_step_duration_seconds"].metric:
        h = metric.histogram
        assert sum(native_buckets(h).values()) + h.zero_count == h.sample_count
        assert not h.HasField("created_timestamp"), "no _created unless asked"
        # exemplars where each Prometheus looks: all of them, and the newest on a lone +Inf bucket
        assert h.exemplars and all(re.fullmatch("[0-9a-f]{32}", e.label[0].value)
                                   for e in h.exemplars)  # fmt: skip
        (inf,) = h.bucket
        assert math.isinf(inf.upper_bound) and inf.cumulative_count == h.sample_count
        newest = max(h.exemplars, key=lambda e: (e.timestamp.seconds, e.timestamp.nanos))
        assert inf.exemplar == newest
    lag = families["hopwatch_event_loop_lag_seconds"].metric[0].histogram
    assert not lag.HasField("schema") and len(lag.bucket) == 13, "the monitor's lags stay classic"


def test_native_buckets_hold_what_was_observed() -> None:
    registry = CollectorRegistry()
    family = HistogramFamily("x_seconds", "X.", ["a"], registry, buckets=(1.0,), native=True)
    offset = family.series("b")
    values = [0.0, 0.0005, 0.3, 0.3, 0.31, 1.0, 2.0, 1.5, 150.0, -0.2]
    for value in values:
        family.observe_at(offset, value, None)
    (metric,) = parse(encode(registry))["x_seconds"].metric
    h = metric.histogram
    assert h.schema == SCHEMA and h.zero_threshold == ZERO_THRESHOLD and h.zero_count == 1
    assert h.sample_count == len(values) and h.sample_sum == pytest.approx(sum(values))
    want: dict[int, int] = {}
    for value in values:
        if value > 0:
            key = bucket_index(value, SCHEMA)
            assert upper_bound(key - 1, SCHEMA) < value <= upper_bound(key, SCHEMA) * (1 + 1e-12)
            want[key] = want.get(key, 0) + 1
    assert native_buckets(h) == want
    assert list(h.negative_delta) == [1] and h.negative_span[0].offset == bucket_index(0.2, 3)


def test_a_histogram_without_observations_is_still_read_as_native() -> None:
    """Prometheus 2.42 takes a histogram with no buckets and a zero threshold of 0 for a
    classic one: the threshold is never 0, and metrics.proto's no-op span marks it."""
    registry = CollectorRegistry()
    HistogramFamily("x_seconds", "X.", (), registry, buckets=(1.0,), native=True)
    (metric,) = parse(encode(registry))["x_seconds"].metric
    h = metric.histogram
    assert h.zero_threshold > 0 and len(h.positive_span) == 1 and h.positive_span[0].length == 0


def test_the_inline_bucket_index_agrees_with_client_golangs_arithmetic() -> None:
    rng = random.Random(20)
    native = NativeBuckets()
    registry = CollectorRegistry()
    family = HistogramFamily("x", "X.", (), registry, buckets=(1.0,), native=True)
    for _ in range(2000):
        value = math.exp(rng.uniform(-9, 5))
        family.observe_at(0, value, None)  # the fast path
        native.observe(0, value)  # bucket_index
    assert family.native is not None and family.native.positive[0] == native.positive[0]


def test_a_series_with_too_many_buckets_halves_its_resolution() -> None:
    native = NativeBuckets()
    values = [1.0001 * 1.1**i for i in range(300)]  # 300 buckets at schema 3
    for value in values:
        native.observe(0, value)
    assert native.schema(0) < SCHEMA
    assert len(native.positive[0]) <= MAX_BUCKETS
    assert sum(native.positive[0].values()) == len(values)
    schema = native.schema(0)
    want: dict[int, int] = {}
    for value in values:
        want[bucket_index(value, schema)] = want.get(bucket_index(value, schema), 0) + 1
    assert native.positive[0] == want


@pytest.mark.parametrize(
    ("buckets", "want"),
    [
        ({}, ([], [])),
        ({5: 2}, ([(5, 1)], [2])),
        ({-3: 1, -2: 4, 0: 1}, ([(-3, 4)], [1, 3, -4, 1])),  # a gap of one: a zero count
        ({0: 1, 9: 2}, ([(0, 1), (8, 1)], [1, 1])),  # a gap of eight: a new span
    ],
)
def test_spans_and_deltas(buckets: dict[int, int], want: tuple[list[Any], list[int]]) -> None:
    assert spans(buckets) == want


def test_classic_buckets_beside_native_ones_when_asked() -> None:
    registry = sample_registry(classic_with_native=True)
    h = parse(encode(registry))["hopwatch_run_duration_seconds"].metric[0].histogram
    assert h.schema == SCHEMA and h.positive_span
    assert [b.upper_bound for b in h.bucket][-3:] == [10.0, 30.0, math.inf]
    assert h.bucket[-1].cumulative_count == h.sample_count
    assert sum(b.HasField("exemplar") for b in h.bucket) == 1, "the newest, for Prometheus 2.42"


def test_native_histograms_off_gives_protobuf_scrapers_classic_buckets() -> None:
    registry = sample_registry(native=False)
    h = parse(encode(registry))["hopwatch_run_duration_seconds"].metric[0].histogram
    assert not h.HasField("schema") and not h.positive_span and not h.HasField("zero_threshold")
    assert len(h.bucket) == 15 and not h.exemplars


def test_created_timestamps_only_when_asked() -> None:
    registry = sample_registry()
    set_created_series(True)
    families = parse(encode(registry))
    assert families["hopwatch_runs_total"].metric[0].counter.HasField("created_timestamp")
    assert (
        families["hopwatch_run_duration_seconds"].metric[0].histogram.HasField("created_timestamp")
    )


# -- a real Prometheus -----------------------------------------------------------------------


@pytest.fixture
async def hopwatch_admin() -> AsyncIterator[tuple[str, Metrics]]:
    """hopwatch's admin listener on loopback, over a registry the test fills."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    server = TestServer(build_admin_app(registry, ready=lambda: True), host="127.0.0.1")
    await server.start_server()
    try:
        yield f"127.0.0.1:{server.port}", metrics
    finally:
        await server.close()


@pytest.mark.prometheus
async def test_prometheus_reads_the_native_histogram_quantile_and_exemplar(
    hopwatch_admin: tuple[str, Metrics], prometheus_factory: PrometheusFactory
) -> None:
    """1,000 hop latencies spread evenly over 1 ms … 1 s: Prometheus with native histograms on
    scrapes them as one native series and its p99 is 0.99 s within the schema's 4.4 %."""
    target, metrics = hopwatch_admin
    family = metrics.step_duration
    offset = family.series("checkout", "create_order", "http", "stable", "eu-west-1")
    for i in range(1, 1001):
        family.observe_at(offset, i / 1000, f"{i:032x}")
    prom = await prometheus_factory([target], native_histograms=True)
    series = 'hopwatch_step_duration_seconds{flow="checkout"}'

    async def scraped() -> bool:
        return bool(await prom.query(f"histogram_count({series})"))

    await prom.wait_for(scraped, "the native histogram")
    (count,) = await prom.query(f"histogram_count({series})")
    assert float(count["value"][1]) == 1000
    (p99,) = await prom.query(f"histogram_quantile(0.99, {series})")
    assert float(p99["value"][1]) == pytest.approx(0.99, rel=0.044)
    (p50,) = await prom.query(f"histogram_quantile(0.5, {series})")
    assert float(p50["value"][1]) == pytest.approx(0.5, rel=0.044)
    assert not await prom.query("hopwatch_step_duration_seconds_bucket")
    exemplars = await prom.query_exemplars(series)
    ids = {e["labels"]["trace_id"] for s in exemplars for e in s["exemplars"]}
    assert ids and all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
