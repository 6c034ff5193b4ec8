"""Trace context in and out of carriers, so the systems under watch join each run's trace."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter

# Baggage every run carries, so the systems under watch can tell synthetic traffic apart.
BAGGAGE_RUN_ID: Final = "hopwatch.run_id"
BAGGAGE_FLOW: Final = "hopwatch.flow"


class HeaderGetter(Getter[Mapping[str, str]]):
    """Reads carrier keys case-insensitively: HTTP headers and decoded Kafka headers alike."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            lower = key.lower()
            value = next((v for k, v in carrier.items() if k.lower() == lower), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


HEADER_GETTER: Final = HeaderGetter()


def propagation() -> dict[str, str]:
    """The current trace context (traceparent, tracestate, baggage) as headers to send along."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The sender's trace context from received headers (a webhook's, or a Kafka record's)."""
    return propagate.extract(headers or {}, getter=HEADER_GETTER, context=Context())


def kafka_headers_as_text(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """Kafka record headers (UTF-8 byte values) as a text mapping a propagator can read."""
    out: dict[str, str] = {}
    for name, raw in headers or ():
        out.setdefault(name, raw.decode("utf-8", "replace") if raw is not None else "")
    return out
