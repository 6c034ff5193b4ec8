"""OpenTelemetry for the demo's shop, worker and webhook sender, so the demo shows one trace from
hopwatch's run through every service the synthetic transaction passed.

Each demo service gets its own `Telemetry` (its own service.name), configured by the same OTEL_*
variables as hopwatch. Its sampler always follows the incoming parent (hopwatch sends sampled=1,
then decides at the run's end), so a failing run's trace is complete. With traces off, spans
are not exported but context still passes through, so services further on still join the run.

How a service uses it:

    telemetry = Telemetry.from_env("shop-api")
    telemetry.instrument(app)                             # SERVER spans, context from headers
    session = aiohttp.ClientSession(trace_configs=[telemetry.client_trace_config()])
                                                          # a CLIENT span per request, injected
    with telemetry.producer_span(topic, headers):          # PRODUCER span, Kafka headers injected
        await producer.send_and_wait(topic, value, headers=headers)
    with telemetry.consumer_span(record.topic, record.headers, partition=..., offset=...):
        ...                                                # CONSUMER span: child of and linked
                                                           # to the producer's context
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from yarl import URL

from monitor import __version__
from monitor.tracing import (
    build_exporters,
    build_resource,
    extract_context,
    kafka_headers_as_text,
)
from probes.http_span import redact_url

KafkaHeaders = list[tuple[str, bytes]]
_BAGGAGE_PREFIX: Final = "hopwatch."


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (traceparent, tracestate, baggage) to HTTP headers."""
    propagate.inject(headers)
    return headers


def inject_kafka_headers(headers: KafkaHeaders) -> KafkaHeaders:
    """Add the current trace context to Kafka record headers, as UTF-8 bytes."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    present = {name for name, _ in headers}
    headers.extend((k, v.encode()) for k, v in carrier.items() if k not in present)
    return headers


def extract_kafka_context(headers: Iterable[tuple[str, bytes | None]] | None) -> Context:
    """The producer's trace context from a consumed record's headers."""
    return extract_context(kafka_headers_as_text(headers))


def set_http_status(span: Span, status: int, *, server: bool = False) -> None:
    """http.response.status_code; an error status for 4xx on a client, 5xx on both sides."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500 or (status >= 400 and not server):
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))


def _baggage_attributes(ctx: Context) -> dict[str, str]:
    """hopwatch's baggage (run id, flow) as span attributes: synthetic traffic is findable."""
    return {k: str(v) for k, v in baggage.get_all(ctx).items() if k.startswith(_BAGGAGE_PREFIX)}


class Telemetry:
    """One demo service's tracer, with the middleware and span helpers it needs."""

    def __init__(self, provider: TracerProvider, *, enabled: bool) -> None:
        self.provider = provider
        self.enabled = enabled
        self.tracer = provider.get_tracer("hopwatch.demo", __version__)

    @classmethod
    def from_env(cls, service: str, exporters: Iterable[SpanExporter] | None = None) -> Telemetry:
        """A service named `service`; exports where OTEL_* say (nowhere when traces are off)."""
        chosen = build_exporters() if exporters is None else list(exporters)
        resource = build_resource(service, {"service.version": __version__})
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
        for exporter in chosen:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, enabled=bool(chosen))

    def instrument(self, app: web.Application) -> None:
        """Put the tracing middleware first, so spans cover the other middlewares too."""
        app.middlewares.insert(0, self.middleware)

    @property
    def middleware(self) -> Middleware:
        tracer = self.tracer

        @web.middleware
        async def trace_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
            parent = extract_context(request.headers)
            # Attached first so the handler sees the caller's baggage as well as its span.
            token = context.attach(parent)
            try:
                with tracer.start_as_current_span(
                    _server_span_name(request),
                    kind=SpanKind.SERVER,
                    attributes=_server_attributes(request) | _baggage_attributes(parent),
                    record_exception=False,
                    set_status_on_exception=False,
                ) as span:
                    return await _handle(span, request, handler)
            finally:
                context.detach(token)

        return trace_requests

    @contextmanager
    def client_span(self, method: str, url: str, headers: dict[str, str]) -> Iterator[Span]:
        """A CLIENT span around one outgoing request; `headers` get its context."""
        with self._span(method, SpanKind.CLIENT, _client_attributes(method, URL(url))) as span:
            inject_headers(headers)
            yield span

    def client_trace_config(self) -> aiohttp.TraceConfig:
        """aiohttp hooks giving every request of a session a CLIENT span, its context injected.

        `aiohttp.ClientSession(trace_configs=[telemetry.client_trace_config()])`: the span is
        the child of whatever span is current where the request is made.
        """
        tracer = self.tracer

        async def start(
            _: Any, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
        ) -> None:
            span = tracer.start_span(
                params.method, kind=SpanKind.CLIENT,
                attributes=_client_attributes(params.method, params.url),
            )  # fmt: skip
            ctx.otel_span = span
            propagate.inject(params.headers, context=trace.set_span_in_context(span))

        async def end(_: Any, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams) -> None:
            span: Span | None = getattr(ctx, "otel_span", None)
            if span is not None:
                set_http_status(span, params.response.status)
                span.end()

        async def failed(
            _: Any, ctx: SimpleNamespace, params: aiohttp.TraceRequestExceptionParams
        ) -> None:
            span: Span | None = getattr(ctx, "otel_span", None)
            if span is not None:
                span.record_exception(params.exception)
                span.set_attribute("error.type", type(params.exception).__qualname__)
                span.set_status(Status(StatusCode.ERROR, str(params.exception)))
                span.end()

        config = aiohttp.TraceConfig()
        config.on_request_start.append(start)
        config.on_request_end.append(end)
        config.on_request_exception.append(failed)
        return config

    @contextmanager
    def producer_span(
        self, topic: str, headers: KafkaHeaders, *, key: bytes | None = None
    ) -> Iterator[Span]:
        """A PRODUCER span around one send; `headers` get its context."""
        attrs = _messaging(topic, "send", key)
        with self._span(f"send {topic}", SpanKind.PRODUCER, attrs) as span:
            inject_kafka_headers(headers)
            yield span

    @contextmanager
    def consumer_span(
        self,
        topic: str,
        headers: Iterable[tuple[str, bytes | None]] | None,
        *,
        partition: int | None = None,
        offset: int | None = None,
        key: bytes | None = None,
        group: str | None = None,
    ) -> Iterator[Span]:
        """A CONSUMER span processing one record: the child of, and linked to, its producer."""
        producer = extract_kafka_context(headers)
        producer_span = trace.get_current_span(producer).get_span_context()
        links = [Link(producer_span)] if producer_span.is_valid else []
        attrs = _messaging(topic, "process", key) | _baggage_attributes(producer)
        if partition is not None:
            attrs["messaging.destination.partition.id"] = str(partition)
        if offset is not None:
            attrs["messaging.kafka.offset"] = offset
        if group is not None:
            attrs["messaging.consumer.group.name"] = group
        token = context.attach(producer)
        try:
            with self._span(f"process {topic}", SpanKind.CONSUMER, attrs, links) as span:
                yield span
        finally:
            context.detach(token)

    @contextmanager
    def _span(
        self, name: str, kind: SpanKind, attrs: dict[str, Any], links: list[Link] | None = None
    ) -> Iterator[Span]:
        with self.tracer.start_as_current_span(
            name, kind=kind, attributes=attrs, links=links
        ) as span:
            try:
                yield span
            except Exception as exc:
                span.set_attribute("error.type", type(exc).__qualname__)
                raise

    def shutdown(self) -> None:
        self.provider.shutdown()

    async def aclose(self) -> None:
        """Export what is left; in a thread, as the exporter does blocking I/O."""
        await asyncio.to_thread(self.provider.shutdown)

    async def flush(self, timeout_s: float = 10.0) -> bool:
        return await asyncio.to_thread(self.provider.force_flush, int(timeout_s * 1000))


def _client_attributes(method: str, url: URL) -> dict[str, Any]:
    attrs: dict[str, Any] = {"http.request.method": method, "url.full": redact_url(str(url))}
    if url.host:
        attrs["server.address"] = url.host
    if url.port is not None:
        attrs["server.port"] = url.port
    return attrs


def _messaging(topic: str, operation: str, key: bytes | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.destination.name": topic,
        "messaging.operation.type": operation,
    }
    if key is not None:
        attrs["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
    return attrs


def _route(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    route = getattr(resource, "canonical", None) if resource is not None else None
    return str(route) if route else None


def _server_span_name(request: web.Request) -> str:
    route = _route(request)
    return f"{request.method} {route}" if route else request.method


def _server_attributes(request: web.Request) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "http.request.method": request.method,
        "url.path": request.path,
        "url.scheme": request.scheme,
    }
    route = _route(request)
    if route:
        attrs["http.route"] = route
    host = request.url.host
    if host:
        attrs["server.address"] = host
    if request.url.port is not None:
        attrs["server.port"] = request.url.port
    if request.remote:
        attrs["client.address"] = request.remote
    return attrs


async def _handle(span: Span, request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        set_http_status(span, exc.status, server=True)
        raise
    except Exception as exc:
        span.record_exception(exc)
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
        raise
    set_http_status(span, response.status, server=True)
    return response
