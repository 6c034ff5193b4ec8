"""monitor/metric_text.py writes /metrics byte for byte as prometheus_client's encoders would, in
both formats, for the sink's families and for awkward values, labels and exemplars."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client import exposition as text_format
from prometheus_client.metrics import disable_created_metrics, enable_created_metrics
from prometheus_client.openmetrics import exposition as om_format

from monitor.metric_text import choose_encoder, encode
from monitor.metric_types import CounterFamily, GaugeFamily, HistogramFamily
from tests.test_metrics_compact import both, flows

OM = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


@pytest.fixture(autouse=True)
def no_created() -> Iterator[None]:
    disable_created_metrics()  # as hopwatch's engine sets it unless asked
    try:
        yield
    finally:
        enable_created_metrics()


def client(registry: CollectorRegistry, openmetrics: bool) -> bytes:
    return (om_format if openmetrics else text_format).generate_latest(registry)


@pytest.mark.parametrize("openmetrics", [False, True])
@pytest.mark.parametrize("rounds", [2, 14])
def test_the_sinks_families_as_the_client_writes_them(openmetrics: bool, rounds: int) -> None:
    _, compact = both(lambda s: s.init_series(flows(), "eu-1"), rounds=rounds)
    assert encode(compact, openmetrics=openmetrics) == client(compact, openmetrics)


@pytest.mark.parametrize("openmetrics", [False, True])
def test_awkward_values_labels_and_exemplars(openmetrics: bool) -> None:
    registry = CollectorRegistry()
    weird = 'q"\\\nz'
    hist = HistogramFamily("h_seconds", 'Doc "with" \\ and\nnewline.', ["zz", "a"], registry,
                           buckets=[-1.0, 0.5, 2e7])  # fmt: skip
    hist.labels(weird, "x").observe(0.25, {"trace_id": "abc"})
    hist.labels("b", "y").observe(3e7, {"span_id": weird, "trace_id": "t"})
    hist.labels("b", "y").observe(math.nan)
    plain = HistogramFamily("lag_seconds", "Lag.", registry=registry, buckets=[0.1, 1.0])
    plain.observe(0.05)
    counter = CounterFamily("c_total", "C.", ["le_not", "k"], registry)
    counter.labels("1", weird).inc(1234567.0, {"trace_id": "ff"})
    CounterFamily("bare", "Bare.", registry=registry).inc(2.5)
    gauge = GaugeFamily("g", "G.", ["k"], registry)
    for i, value in enumerate([math.inf, -math.inf, -0.0, 1e-9, 123456789.5, 1e22]):
        gauge.labels(str(i)).set(value)
    Counter("other", "A client counter among them.", ["k"], registry=registry).labels("v").inc()
    assert encode(registry, openmetrics=openmetrics) == client(registry, openmetrics)


@pytest.mark.parametrize("openmetrics", [False, True])
def test_a_gauge_set_to_an_int_is_written_as_its_float(openmetrics: bool) -> None:
    """The numbers sit in a list, which keeps what it is given: an int (a unix time a probe
    gave, `1` for up) must still be written as the float it stands for."""
    registry = CollectorRegistry()
    gauge = GaugeFamily("g", "G.", ["k"], registry)
    gauge.set_at(gauge.reserve(("up",)), 1)
    gauge.set_at(gauge.reserve(("expiry",)), 1700000000)
    text = encode(registry, openmetrics=openmetrics)
    assert text == client(registry, openmetrics)
    assert b'g{k="up"} 1.0' in text


def test_created_samples_go_through_the_client() -> None:
    enable_created_metrics()
    _, compact = both(None, rounds=3)
    for openmetrics in (False, True):
        text = encode(compact, openmetrics=openmetrics)
        assert b"_created" in text
        assert text == client(compact, openmetrics)


def test_negotiation() -> None:
    encoder, content_type = choose_encoder("")
    assert isinstance(encoder, partial) and encoder.func is encode
    assert content_type.startswith("text/plain")
    encoder, content_type = choose_encoder(OM)
    assert isinstance(encoder, partial) and encoder.keywords == {"openmetrics": True}
    assert content_type.startswith("application/openmetrics-text")
    # an escaping that renames metrics: the client's own encoder
    encoder, _ = choose_encoder("application/openmetrics-text;version=1.0.0;escaping=dots")
    assert isinstance(encoder, partial) and encoder.func is om_format.generate_latest
