"""/metrics in Prometheus's protobuf format (delimited `io.prometheus.client.MetricFamily`
messages), the one that carries native histograms; negotiated by the scrape's Accept header.

prometheus_client (0.26) has a native-histogram sample type but no protobuf exposition, and the
generated message classes cost a Python object per label, bucket and series (seconds for 10,000
links). So the wire format is written here by hand, the few message types it needs
(prometheus/client_model's metrics.proto, field numbers below), with each series' labels
encoded once and kept, like metric_text's label text. tests/test_metric_proto.py parses the
output with the official message types, and a real Prometheus scrapes it.

Exemplars of a native histogram go where each Prometheus looks for them: all of them in the
histogram's `exemplars` (Prometheus ≥ 2.49 ingests those), and the newest one on a bucket entry
as well, because Prometheus 2.42 takes one exemplar per native histogram and scrape, from the
first bucket entry that has one. Without classic buckets that entry is a lone +Inf bucket,
which adds no series (a protobuf scrape that keeps classic buckets makes the +Inf one anyway).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar

from monitor.metric_native import ZERO_THRESHOLD, NativeBuckets, spans
from monitor.metric_types import (
    CounterFamily,
    Family,
    GaugeFamily,
    HistogramFamily,
    StoredExemplar,
    collectors,
    created_series_enabled,
)

CONTENT_TYPE = (
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
)
# metrics.proto's MetricType
COUNTER, GAUGE, SUMMARY, UNTYPED, HISTOGRAM, GAUGE_HISTOGRAM = range(6)
_double = struct.Struct("<d").pack


# -- negotiation -----------------------------------------------------------------------------


def _media_ranges(accept: str) -> Iterable[tuple[str, dict[str, str], float]]:
    for part in accept.split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        found = {}
        for param in params:
            key, _, value = param.partition("=")
            found[key.strip().lower()] = value.strip().strip('"')
        try:
            q = float(found.pop("q", "1"))
        except ValueError:
            q = 0.0
        yield kind.lower(), found, q


def wants_protobuf(accept: str) -> bool:
    """Whether the scraper asks for delimited MetricFamily messages at least as much as for
    anything else (Prometheus lists it first, with native histograms on)."""
    best_other, protobuf = 0.0, 0.0
    for kind, params, q in _media_ranges(accept):
        if kind == "application/vnd.google.protobuf":
            if (
                params.get("proto") == "io.prometheus.client.MetricFamily"
                and params.get("encoding") == "delimited"
            ):
                protobuf = max(protobuf, q)
        else:
            best_other = max(best_other, q)
    return protobuf > 0 and protobuf >= best_other


# -- the wire format -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _zigzag(value: int) -> int:
    return value << 1 if value >= 0 else (-value << 1) - 1


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (`tag` is the field number shifted, with wire type 2)."""
    return _varint(tag) + _varint(len(payload)) + payload


def _string(tag: int, text: str) -> bytes:
    return _field(tag, text.encode())


def _labels(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Metric.label / Exemplar.label: repeated LabelPair (field 1), name 1 and value 2."""
    return b"".join(_field(0x0A, _string(0x0A, k) + _string(0x12, v)) for k, v in pairs)


def _timestamp(tag: int, seconds: float) -> bytes:
    """A google.protobuf.Timestamp field: seconds (1) and nanos (2)."""
    whole = math.floor(seconds)
    nanos = int((seconds - whole) * 1e9)
    return _field(tag, b"\x08" + _varint(whole) + (b"\x10" + _varint(nanos) if nanos else b""))


def _exemplar(stored: StoredExemplar) -> bytes:
    labels, value, timestamp = stored
    pairs = {"trace_id": labels} if isinstance(labels, str) else labels
    return _labels(sorted(pairs.items())) + b"\x11" + _double(value) + _timestamp(0x1A, timestamp)


def _family(name: str, help_text: str, kind: int, metrics: list[bytes]) -> bytes:
    """One delimited MetricFamily: name 1, help 2, type 3, metric 4 (each already encoded)."""
    body = b"".join(
        [_string(0x0A, name), _string(0x12, help_text), b"\x18" + _varint(kind)]
        + [_varint(0x22) + _varint(len(m)) + m for m in metrics]
    )
    return _varint(len(body)) + body


# -- hopwatch's compact families -------------------------------------------------------------


def _series_labels(family: Family, offset: int) -> bytes:
    cached = family._proto.get(offset)
    if cached is None:
        values = family._keys[offset // family.stride]
        cached = family._proto[offset] = _labels(zip(family.labelnames, values, strict=True))
    return cached


def _counters(family: CounterFamily) -> list[bytes]:
    data, exemplars, created = family._data, family._exemplars, created_series_enabled()
    out = []
    for offset in list(family._order):
        body = b"\x09" + _double(data[offset])
        stored = exemplars.get(offset)
        if stored is not None:
            body += _field(0x12, _exemplar(stored))
        if created:
            body += _timestamp(0x1A, data[offset + 1])
        out.append(_series_labels(family, offset) + _field(0x1A, body))  # Metric.counter = 3
    return out


def _gauges(family: GaugeFamily) -> list[bytes]:
    data = family._data
    return [
        _series_labels(family, offset) + _field(0x12, b"\x09" + _double(data[offset]))
        for offset in list(family._order)
    ]


def _classic_buckets(
    family: HistogramFamily, offset: int, only: StoredExemplar | None = None
) -> tuple[bytes, int]:
    """Histogram.bucket (3): cumulative count 1, upper bound 2, exemplar 3; and the total.
    With `only`, that exemplar is the one bucket exemplar sent (see the module's docstring)."""
    data, exemplars, out, acc = family._data, family._exemplars, [], 0
    for i, bound in enumerate(family.bounds):
        acc += int(data[offset + i])
        body = b"\x08" + _varint(acc) + b"\x11" + _double(bound)
        stored = exemplars.get(offset + i)
        if stored is not None and (only is None or stored is only):
            body += _field(0x1A, _exemplar(stored))
        out.append(_field(0x1A, body))
    return b"".join(out), acc


def _native(native: NativeBuckets, offset: int) -> bytes:
    """schema 5, zero threshold 6, zero count 7, negative spans 9 and deltas 10, positive 12
    and 13 (deltas packed, which every protobuf parser reads)."""
    out = [b"\x28" + _varint(_zigzag(native.schema(offset))), b"\x31" + _double(ZERO_THRESHOLD)]
    zero = native.zero.get(offset, 0)
    if zero:
        out.append(b"\x38" + _varint(zero))
    empty = not zero
    for span_tag, delta_tag, side in ((0x4A, 0x52, native.negative), (0x62, 0x6A, native.positive)):
        buckets = side.get(offset)
        if not buckets:
            continue
        empty = False
        found, deltas = spans(buckets)
        for start, length in found:
            span = b"\x08" + _varint(_zigzag(start)) + b"\x10" + _varint(length)
            out.append(_field(span_tag, span))
        out.append(_field(delta_tag, b"".join(_varint(_zigzag(d)) for d in deltas)))
    if empty:
        out.append(_field(0x62, b""))  # metrics.proto: a no-op span marks an empty native one
    return b"".join(out)


def _histograms(family: HistogramFamily) -> list[bytes]:
    data, n, native = family._data, family._sum, family.native
    exemplars, created = family._exemplars, created_series_enabled()
    out = []
    for offset in list(family._order):
        body = [b"", b"\x11" + _double(data[offset + n])]
        kept = [e for i in range(n) if (e := exemplars.get(offset + i)) is not None]
        if native is None:
            buckets, total = _classic_buckets(family, offset)
        else:
            # the native buckets before the count, the reverse of observe_at's order, so that
            # a scrape from another thread never sends fewer observations than buckets hold
            # (which Prometheus refuses)
            native_body = _native(native, offset)
            newest = max(kept, key=lambda e: e[2]) if kept else None
            if family.classic_with_native:
                buckets, total = _classic_buckets(family, offset, newest)
            else:
                total = sum(int(data[offset + i]) for i in range(n))
                buckets = b""
                if newest is not None:  # the lone +Inf bucket that carries it (see above)
                    inf = b"\x08" + _varint(total) + b"\x11" + _double(math.inf)
                    buckets = _field(0x1A, inf + _field(0x1A, _exemplar(newest)))
            body.append(native_body)
            for stored in sorted(kept, key=lambda e: e[2]):
                body.append(_field(0x82, _exemplar(stored)))  # field 16: tag bytes 0x82 0x01
        body[0] = b"\x08" + _varint(total)
        body.insert(2, buckets)
        if created:
            body.append(_timestamp(0x7A, data[offset + n + 1]))
        out.append(_series_labels(family, offset) + _field(0x3A, b"".join(body)))
    return out


# -- other collectors (prometheus_client's own instruments, a handful of series) -------------


def _client_family(metric: Metric) -> bytes:
    """A prometheus_client Metric: its samples grouped into one message per label set."""
    if metric.type in ("histogram", "gaugehistogram"):
        return _client_histograms(metric)
    if metric.type == "summary":
        return _client_summaries(metric)
    name, kind, field = metric.name, UNTYPED, 0x2A  # Metric.untyped = 5
    if metric.type == "counter":
        name, kind, field = metric.name + "_total", COUNTER, 0x1A
    elif metric.type in ("gauge", "info", "stateset"):
        name, kind, field = metric.name, GAUGE, 0x12
        if metric.type == "info":
            name += "_info"
    out = []
    for sample in metric.samples:
        if sample.name.endswith("_created"):
            continue  # a counter's _created: off unless asked, and text keeps it when asked
        body = b"\x09" + _double(sample.value)
        if kind == COUNTER and sample.exemplar is not None:
            body += _field(0x12, _client_exemplar(sample.exemplar))
        out.append(_labels(sorted(sample.labels.items())) + _field(field, body))
    return _family(name, metric.documentation, kind, out)


def _client_exemplar(exemplar: Exemplar) -> bytes:
    labels = sorted(exemplar.labels.items())
    stamp = exemplar.timestamp
    when = _timestamp(0x1A, float(stamp)) if stamp is not None else b""
    return _labels(labels) + b"\x11" + _double(exemplar.value) + when


def _grouped(metric: Metric, drop: str) -> dict[tuple[tuple[str, str], ...], list[Any]]:
    groups: dict[tuple[tuple[str, str], ...], list[Any]] = {}
    for sample in metric.samples:
        key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != drop))
        groups.setdefault(key, []).append(sample)
    return groups


def _client_histograms(metric: Metric) -> bytes:
    out = []
    for labels, samples in _grouped(metric, "le").items():
        count, total, buckets = 0.0, 0.0, []
        for s in samples:
            if s.name.endswith(("_count", "_gcount")):
                count = s.value
            elif s.name.endswith(("_sum", "_gsum")):
                total = s.value
            elif s.name.endswith("_bucket"):
                body = b"\x08" + _varint(int(s.value)) + b"\x11" + _double(float(s.labels["le"]))
                if s.exemplar is not None:
                    body += _field(0x1A, _client_exemplar(s.exemplar))
                buckets.append(_field(0x1A, body))
        body = b"\x08" + _varint(int(count)) + b"\x11" + _double(total) + b"".join(buckets)
        out.append(_labels(labels) + _field(0x3A, body))
    kind = HISTOGRAM if metric.type == "histogram" else GAUGE_HISTOGRAM
    return _family(metric.name, metric.documentation, kind, out)


def _client_summaries(metric: Metric) -> bytes:
    out = []
    for labels, samples in _grouped(metric, "quantile").items():
        count, total, quantiles = 0.0, 0.0, []
        for s in samples:
            if s.name.endswith("_count"):
                count = s.value
            elif s.name.endswith("_sum"):
                total = s.value
            elif "quantile" in s.labels:
                q = float(s.labels["quantile"])
                quantiles.append(_field(0x1A, b"\x09" + _double(q) + b"\x11" + _double(s.value)))
        body = b"\x08" + _varint(int(count)) + b"\x11" + _double(total) + b"".join(quantiles)
        out.append(_labels(labels) + _field(0x22, body))
    return _family(metric.name, metric.documentation, SUMMARY, out)


# -- the exposition --------------------------------------------------------------------------


def encode(registry: CollectorRegistry) -> bytes:
    """Every collector of the registry, in registration order, as delimited MetricFamilies."""
    out: list[bytes] = []
    for collector in collectors(registry):
        if isinstance(collector, Family):
            out.append(_compact_family(collector))
        else:
            out.extend(_client_family(metric) for metric in collector.collect())
    return b"".join(out)


def _compact_family(family: Family) -> bytes:
    if isinstance(family, CounterFamily):
        return _family(family.name + "_total", family.documentation, COUNTER, _counters(family))
    if isinstance(family, GaugeFamily):
        return _family(family.name, family.documentation, GAUGE, _gauges(family))
    if isinstance(family, HistogramFamily):
        return _family(family.name, family.documentation, HISTOGRAM, _histograms(family))
    raise TypeError(f"unknown family {family!r}")  # pragma: no cover - every Family is one
