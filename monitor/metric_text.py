"""/metrics in the text and OpenMetrics formats, the compact families written straight from their
lists with each series' labels rendered once, so a scrape of 10,000 links takes a fraction of
a second instead of seconds.

prometheus_client's encoders build a `Sample` per line and escape and sort every label of every
line on every scrape (~8 µs a line here): 290,000 lines, 10,000 links, took 2.3 s of CPU. Here a
series' label text is made the first time it is written and kept (label values never change),
and a line is one string format of cached parts. The output is byte for byte what the client's
encoder writes (tests/test_metric_text.py), which other collectors still go through. When the
client's `_created` samples are on, or an Accept header asks for an escaping that would rename
metrics, the client's encoders write everything, as before. A scraper that asks for protobuf
most gets monitor/metric_proto.py's writer (native histograms).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.utils import floatToGoString

from monitor.metric_proto import CONTENT_TYPE as PROTOBUF
from monitor.metric_proto import encode as encode_protobuf
from monitor.metric_proto import wants_protobuf
from monitor.metric_types import (
    CounterFamily,
    Family,
    GaugeFamily,
    HistogramFamily,
    StoredExemplar,
    collectors,
    created_series_enabled,
)

Encoder = Callable[[CollectorRegistry], bytes]
_SAME_NAMES = (om_format.UNDERSCORES, om_format.ALLOWUTF8)  # escapings that keep our names


def choose_encoder(accept: str) -> tuple[Encoder, str]:
    """Protobuf when the scraper asks for it most (monitor/metric_proto.py); otherwise
    prometheus_client's negotiation, with this module's writer where it gives the same bytes."""
    if wants_protobuf(accept):
        return encode_protobuf, PROTOBUF
    encoder, content_type = text_format.choose_encoder(accept)
    if encoder is text_format.generate_latest:
        return partial(encode, openmetrics=False), content_type
    if (
        isinstance(encoder, partial)
        and encoder.func is om_format.generate_latest
        and encoder.keywords.get("escaping") in _SAME_NAMES
        and str(encoder.keywords.get("version", "")).startswith("1.")
    ):
        return partial(encode, openmetrics=True), content_type
    return encoder, content_type


def encode(registry: CollectorRegistry, *, openmetrics: bool) -> bytes:
    """Every collector of the registry, in registration order (as `registry.collect()`)."""
    client = om_format.generate_latest if openmetrics else text_format.generate_latest
    if not created_series_enabled():
        out: list[str] = []
        for collector in collectors(registry):
            if isinstance(collector, Family):
                write_family(collector, out, openmetrics)
            else:
                text = client(_Only(collector)).decode()
                out.append(text.removesuffix("# EOF\n") if openmetrics else text)
        if openmetrics:
            out.append("# EOF\n")
        return "".join(out).encode()
    return client(registry)


class _Only:
    """One collector, as the client's encoders take it."""

    def __init__(self, collector: Any) -> None:
        self._collector = collector

    def collect(self) -> Any:
        return self._collector.collect()


# -- one family ------------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _go(value: float) -> str:
    """floatToGoString, without its call for the common finite, small values."""
    text = repr(value)
    if "n" in text or (value > 0 and text.find(".") > 6):  # inf, nan, or Go's exponent form
        result: str = floatToGoString(value)  # type: ignore[no-untyped-call]  # untyped upstream
        return result
    return text


def _exemplar(stored: StoredExemplar | None) -> str:
    if stored is None:
        return ""
    labels, value, timestamp = stored
    pairs = {"trace_id": labels} if isinstance(labels, str) else labels
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs.items()))
    return f" # {{{inner}}} {_go(value)} {timestamp}"


def _label_text(family: Family, offset: int, *, le: bool = False) -> tuple[str, str]:
    """(labels before `le`, labels after it) of a series, sorted by name as the client writes
    them, each with the comma that joins it to `le`; without `le`, all in the first."""
    cache = family._text
    parts = cache.get(offset)
    if parts is None:
        values = family._keys[offset // family.stride]
        pairs = sorted(zip(family.labelnames, values, strict=True))
        if le:
            before = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs if k < "le")
            after = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs if k > "le")
            parts = (before + "," if before else "", "," + after if after else "")
        else:
            parts = (",".join(f'{k}="{_escape(v)}"' for k, v in pairs), "")
        cache[offset] = parts
    return parts


def write_family(family: Family, out: list[str], openmetrics: bool) -> None:
    """The family's HELP, TYPE and samples, as the client's encoder would write them."""
    doc = family.documentation
    doc = _escape(doc) if openmetrics else doc.replace("\\", r"\\").replace("\n", r"\n")
    name = family.name
    if isinstance(family, CounterFamily):
        head = name if openmetrics else name + "_total"
        out.append(f"# HELP {head} {doc}\n# TYPE {head} counter\n")
        _write_counter(family, out, openmetrics)
    elif isinstance(family, GaugeFamily):
        out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
        data = family._data
        for offset in list(family._order):
            labels = _label_text(family, offset)[0]
            out.append(f"{name}{{{labels}}} {_go(data[offset])}\n" if labels else
                       f"{name} {_go(data[offset])}\n")  # fmt: skip
    elif isinstance(family, HistogramFamily):
        out.append(f"# HELP {name} {doc}\n# TYPE {name} histogram\n")
        _write_histogram(family, out, openmetrics)
    else:  # pragma: no cover - every Family is one of the three
        raise TypeError(f"unknown family {family!r}")


def _write_counter(family: CounterFamily, out: list[str], openmetrics: bool) -> None:
    data, exemplars, total = family._data, family._exemplars, family.name + "_total"
    for offset in list(family._order):
        labels = _label_text(family, offset)[0]
        ex = _exemplar(exemplars.get(offset)) if openmetrics else ""
        braces = f"{{{labels}}}" if labels else ""
        out.append(f"{total}{braces} {_go(data[offset])}{ex}\n")


def _write_histogram(family: HistogramFamily, out: list[str], openmetrics: bool) -> None:
    data, exemplars, les, n = family._data, family._exemplars, family._le, family._sum
    name = family.name
    bucket, count, total = name + "_bucket", name + "_count", name + "_sum"
    has_sum = family.bounds[0] >= 0
    for offset in list(family._order):
        before, after = _label_text(family, offset, le=True)
        plain = before.rstrip(",") + after if before else after.lstrip(",")
        braces = f"{{{plain}}}" if plain else ""
        acc = 0.0
        for i in range(n):
            acc += data[offset + i]
            ex = _exemplar(exemplars.get(offset + i)) if openmetrics else ""
            out.append(f'{bucket}{{{before}le="{les[i]}"{after}}} {_go(acc)}{ex}\n')
        out.append(f"{count}{braces} {_go(acc)}\n")
        if has_sum:
            out.append(f"{total}{braces} {_go(data[offset + n])}\n")
