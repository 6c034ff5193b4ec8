"""Traces of synthetic transactions: one trace per run, a span per step, trace context carried to
the systems under watch, and the export decision taken once the run's outcome is known.

Export (the standard OTEL_* variables): `OTEL_TRACES_EXPORTER` = otlp · console · none (a list is
allowed); unset, it is `otlp` when `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and `none` otherwise (no collector, no traces).
OTLP goes over HTTP/protobuf (`OTEL_EXPORTER_OTLP_PROTOCOL`; `grpc` needs
opentelemetry-exporter-otlp-proto-grpc installed). `OTEL_SDK_DISABLED=true` turns traces off.
The resource is service.name=hopwatch (`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` win),
service.version and hopwatch.location.

Sampling, and why a failing run is never the one dropped: a sampler decides when the root span
starts, before the run's outcome exists. So the SDK sampler here is ALWAYS_ON (every span is
recorded, and the systems under watch see sampled=1 and record theirs), and `RunExportProcessor`
holds a run's spans until the run ends. Then `SamplingPolicy.keep` decides for the whole trace:

- a run that did not succeed (failure, aborted) is always exported;
- a successful run is exported if its trace id passes the ratio test of `OTEL_TRACES_SAMPLER`
  (always_on → 1, always_off → 0, [parentbased_]traceidratio → `OTEL_TRACES_SAMPLER_ARG`) —
  the SDK's own TraceIdRatioBased test, so ratio-sampling services agree on the same runs;
- with a parent-based sampler (the default) a run started inside a traced request follows that
  parent's sampled flag instead of the ratio (failures are still always exported).

A run whose trace was dropped gets `RunResult.trace_id = None`, so exemplars and
`hopwatch check --output json` only ever name traces that were exported. With a ratio below 1,
services downstream still export their spans of the dropped runs: a collector's tail sampling
can drop those if they matter.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode
from yarl import URL

from monitor import __version__
from probes.base import ARRIVAL_KEY
from probes.errors import ConfigError

if TYPE_CHECKING:
    from monitor.results import RunResult, StepResult
    from probes.base import StepContext

TRACER_NAME: Final = "hopwatch"
BAGGAGE_RUN_ID: Final = "hopwatch.run_id"
BAGGAGE_FLOW: Final = "hopwatch.flow"
_SENSITIVE_QUERY: Final = frozenset({"AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"})
_MESSAGE_LIMIT: Final = 1000
_TRUE: Final = frozenset({"true", "1", "yes"})


# -- propagation -----------------------------------------------------------------------------


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


# -- configuration from OTEL_* ---------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUE


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # reads endpoint, headers, timeout, TLS from OTEL_EXPORTER_OTLP_*
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise ConfigError(
                ["OTEL_EXPORTER_OTLP_PROTOCOL=grpc: install "
                 "opentelemetry-exporter-otlp-proto-grpc, or use http/protobuf"]
            ) from None  # fmt: skip
        exporter: SpanExporter = GrpcExporter()
        return exporter
    raise ConfigError([f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: want http/protobuf or grpc"])


def build_exporters(env: Mapping[str, str] | None = None) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER asks for; empty when traces are off."""
    env = os.environ if env is None else env
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return []
    has_endpoint = bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    names = env.get("OTEL_TRACES_EXPORTER") or ("otlp" if has_endpoint else "none")
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",") if n.strip()):
        if name == "otlp":
            exporters.append(_otlp_exporter(env))
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ConfigError([f"OTEL_TRACES_EXPORTER={name}: want otlp, console or none"])
    return exporters


def build_resource(service: str, attributes: Mapping[str, str]) -> Resource:
    """SDK defaults, then ours, then OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME (which win)."""
    ours = Resource({"service.name": service, **attributes})
    return Resource.create().merge(ours).merge(OTELResourceDetector().detect())


@dataclass(frozen=True, slots=True)
class SamplingPolicy:
    """Which finished runs are exported: all that did not succeed, a ratio of the rest."""

    ratio: float = 1.0
    parent_based: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SamplingPolicy:
        env = os.environ if env is None else env
        name = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").strip().lower()
        parent_based = name.startswith("parentbased_")
        base = name.removeprefix("parentbased_")
        if base == "always_on":
            return cls(1.0, parent_based)
        if base == "always_off":
            return cls(0.0, parent_based)
        if base != "traceidratio":
            raise ConfigError(
                [f"OTEL_TRACES_SAMPLER={name}: want always_on, always_off, traceidratio or "
                 "their parentbased_ forms"]
            )  # fmt: skip
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError([f"OTEL_TRACES_SAMPLER_ARG={arg}: want a number from 0 to 1"])
        return cls(ratio, parent_based)

    def keep(self, trace_id: int, outcome: str, parent: SpanContext | None = None) -> bool:
        if outcome != "success":
            return True  # decided after the outcome: a broken run is never the one dropped
        if self.parent_based and parent is not None and parent.is_valid:
            return parent.trace_flags.sampled
        bound = TraceIdRatioBased.get_bound_for_rate(self.ratio)
        return trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound


# -- holding a run's spans until its outcome is known -----------------------------------------


class RunExportProcessor(SpanProcessor):
    """Holds the spans of each run in progress, then hands all of them on or drops them all.

    Spans of traces that are not runs pass straight through. Bounded: at most `max_runs` runs
    held (the oldest is then exported undecided) and `max_spans` spans per run (more are
    dropped and counted in `dropped_spans`).
    """

    def __init__(
        self, downstream: Sequence[SpanProcessor], *, max_runs: int = 10_000, max_spans: int = 1_000
    ) -> None:
        self.downstream = tuple(downstream)
        self.max_runs = max_runs
        self.max_spans = max_spans
        self.dropped_spans = 0
        self.evicted_runs = 0
        self._lock = threading.Lock()
        self._held: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        # Verdicts stay a while, so a span that ends after its run's decision follows it.
        self._verdicts: OrderedDict[int, bool] = OrderedDict()

    def begin(self, trace_id: int) -> None:
        evicted: list[ReadableSpan] = []
        with self._lock:
            if len(self._held) >= self.max_runs:
                _, evicted = self._held.popitem(last=False)
                self.evicted_runs += 1
            self._held[trace_id] = []
        self._forward(evicted)

    def decide(self, trace_id: int, keep: bool) -> None:
        with self._lock:
            spans = self._held.pop(trace_id, [])
            self._verdicts[trace_id] = keep
            if len(self._verdicts) > self.max_runs:
                self._verdicts.popitem(last=False)
        if keep:
            self._forward(spans)

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        for processor in self.downstream:
            processor.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        trace_id = span.context.trace_id if span.context is not None else 0
        with self._lock:
            held = self._held.get(trace_id)
            if held is not None:
                if len(held) < self.max_spans:
                    held.append(span)
                else:
                    self.dropped_spans += 1
                return
            keep = self._verdicts.get(trace_id, True)
        if keep:
            self._forward((span,))

    def _forward(self, spans: Iterable[ReadableSpan]) -> None:
        for span in spans:
            for processor in self.downstream:
                processor.on_end(span)

    def shutdown(self) -> None:
        with self._lock:
            leftovers = [s for spans in self._held.values() for s in spans]
            self._held.clear()
        self._forward(leftovers)  # runs cut off by shutdown: keep rather than lose them
        for processor in self.downstream:
            processor.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        results = [p.force_flush(timeout_millis) for p in self.downstream]
        return all(results)


# -- spans of runs and steps ------------------------------------------------------------------


def redact_url(url: str, redact: Any = None) -> str:
    """url.full as the conventions want it: no credentials, no signing keys, no known secrets."""
    try:
        parsed = URL(url)
    except ValueError:
        return "REDACTED"
    if parsed.user is not None or parsed.password is not None:
        parsed = parsed.with_user("REDACTED").with_password("REDACTED")
    if any(k in _SENSITIVE_QUERY for k in parsed.query):
        parsed = parsed.with_query(
            [(k, "REDACTED" if k in _SENSITIVE_QUERY else v) for k, v in parsed.query.items()]
        )
    text = str(parsed)
    return str(redact(text)) if redact is not None else text


def _scalar_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The attribute values a span can carry: scalars and lists of one scalar type."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, str | bool | int | float):
            out[key] = value
        elif isinstance(value, list | tuple) and value:
            kinds = {type(v) for v in value}
            if len(kinds) == 1 and kinds <= {str, bool, int, float}:
                out[key] = list(value)
    return out


class RunScope:
    """The root span of one run: current while the run's steps execute."""

    def __init__(self, tracing: Tracing, ctx: StepContext) -> None:
        self._tracing = tracing
        self._ctx = ctx
        self._span: Span | None = None
        self._token: Token[Context] | None = None
        self._parent: SpanContext | None = None

    def __enter__(self) -> str | None:
        ctx, run = self._ctx, self._ctx.run
        parent = trace.get_current_span().get_span_context()
        self._parent = parent if parent.is_valid else None
        span = self._tracing.tracer.start_span(
            f"run {run.flow}",
            kind=SpanKind.INTERNAL,
            attributes={
                "hopwatch.flow": run.flow,
                "hopwatch.variant": run.variant,
                "hopwatch.location": run.location,
                "hopwatch.run_id": run.id,
                "hopwatch.correlation": run.correlation,
            },
        )
        self._span = span
        trace_id = span.get_span_context().trace_id
        self._tracing.processor.begin(trace_id)
        run_context = trace.set_span_in_context(span)
        run_context = baggage.set_baggage(BAGGAGE_RUN_ID, run.id, run_context)
        run_context = baggage.set_baggage(BAGGAGE_FLOW, run.flow, run_context)
        self._token = context.attach(run_context)
        ctx.propagation = propagation
        return trace.format_trace_id(trace_id)

    def finish(self, result: RunResult) -> None:
        """End the root span with the outcome, then keep or drop the whole trace."""
        span = self._span
        if span is None:
            return
        self._span = None
        span.set_attribute("hopwatch.outcome", result.outcome)
        broken = result.broken
        if broken is not None:
            reason = broken.reason or "error"
            span.set_attributes({"hopwatch.broken_step": broken.name, "hopwatch.reason": reason})
            span.add_event("hopwatch.run.failed", {"hopwatch.step": broken.name,
                                                    "hopwatch.reason": reason})  # fmt: skip
            span.set_status(Status(StatusCode.ERROR, f"step {broken.name}: {reason}"))
        span.end()
        self._detach()
        trace_id = span.get_span_context().trace_id
        keep = self._tracing.policy.keep(trace_id, result.outcome, self._parent)
        self._tracing.processor.decide(trace_id, keep)
        if not keep:
            result.trace_id = None  # exemplars and JSON output name exported traces only

    def _detach(self) -> None:
        if self._token is not None:
            context.detach(self._token)
            self._token = None

    def __exit__(self, *exc: object) -> None:
        """For `with` use without a result: end the span, export it."""
        span = self._span
        if span is not None:
            self._span = None
            span.end()
            self._detach()
            self._tracing.processor.decide(span.get_span_context().trace_id, True)


def _step_shape(step: Any, ctx: StepContext) -> tuple[str, SpanKind, dict[str, Any]]:
    """Span name, kind and starting attributes by the conventions for the step's kind."""
    kind = step.kind
    attrs: dict[str, Any] = {"hopwatch.step": step.name, "hopwatch.kind": kind}
    if kind in ("http", "http_poll"):
        method = getattr(step, "method", "GET")
        attrs["http.request.method"] = method
        attrs.update(_url_attributes(step, ctx))
        return method, SpanKind.CLIENT, attrs
    if kind in ("kafka_produce", "kafka_consume"):
        topic = _render_plain(ctx, str(getattr(step, "topic", "")))
        attrs |= {"messaging.system": "kafka", "messaging.destination.name": topic}
        if kind == "kafka_produce":
            attrs["messaging.operation.type"] = "send"
            return f"send {topic}", SpanKind.PRODUCER, attrs
        attrs["messaging.operation.type"] = "process"
        return f"process {topic}", SpanKind.CONSUMER, attrs
    if kind == "webhook_await":
        path = str(getattr(step, "path", ""))
        attrs["url.path"] = path
        return f"process {path}", SpanKind.CONSUMER, attrs
    return f"{kind} {step.name}", SpanKind.INTERNAL, attrs


def _render_plain(ctx: StepContext, text: str) -> str:
    if "{{" not in text:
        return text
    try:
        return ctx.render(text)
    except Exception:  # a span name is not worth failing a step for
        return text


def _url_attributes(step: Any, ctx: StepContext) -> dict[str, Any]:
    """url.full, server.address and server.port of an HTTP step, rendered for this run."""
    try:
        url = URL(ctx.render(step.url, "url"))
        query = {k: ctx.render(v) for k, v in (getattr(step, "query", None) or {}).items()}
    except Exception:  # the probe reports template trouble; the span just lacks the URL
        return {}
    if query:
        url = url.extend_query(query)
    attrs: dict[str, Any] = {
        "url.full": redact_url(str(url), getattr(ctx.renderer, "redactor", None))
    }
    if url.host:
        attrs["server.address"] = url.host
    if url.port is not None:
        attrs["server.port"] = url.port
    return attrs


def _arrival_attributes(arrival: Any) -> dict[str, Any]:
    meta = getattr(arrival, "meta", None) or {}
    attrs: dict[str, Any] = {}
    if meta.get("partition") is not None:
        attrs["messaging.destination.partition.id"] = str(meta["partition"])
    if meta.get("offset") is not None:
        attrs["messaging.kafka.offset"] = int(meta["offset"])
    key = getattr(arrival, "key", None)
    if isinstance(key, bytes):
        attrs["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
    delivery = getattr(arrival, "delivery_id", None)
    if delivery:
        attrs["messaging.message.id"] = str(delivery)
    return attrs


class StepScope:
    """The span of one step: current while the probe runs, so its requests carry it."""

    def __init__(self, tracing: Tracing, ctx: StepContext, step: Any, result: StepResult) -> None:
        self._tracing = tracing
        self._ctx = ctx
        self._step = step
        self._span: Span | None = None
        self._token: Token[Context] | None = None
        self._cleanup = result.cleanup

    def __enter__(self) -> Span:
        name, kind, attrs = _step_shape(self._step, self._ctx)
        if self._cleanup:
            attrs["hopwatch.cleanup"] = True
        span = self._tracing.tracer.start_span(name, kind=kind, attributes=attrs)
        self._span = span
        self._token = context.attach(trace.set_span_in_context(span))
        return span

    def finish(self, result: StepResult) -> None:
        """Record what the step ended with (status, reason, the arrival it took), end the span."""
        span = self._span
        if span is None:
            return
        self._span = None
        span.set_attributes(_scalar_attributes(result.attributes))
        span.set_attribute("hopwatch.status", result.status)
        arrival = self._ctx.run_state.pop((ARRIVAL_KEY, self._step.name), None)
        if arrival is not None:
            self._link(span, arrival)
        if result.status == "failed":
            _record_failure(span, result)
        span.end()
        if self._token is not None:
            context.detach(self._token)
            self._token = None

    @staticmethod
    def _link(span: Span, arrival: Any) -> None:
        span.set_attributes(_arrival_attributes(arrival))
        sender = trace.get_current_span(extract_context(getattr(arrival, "headers", None)))
        sender_context = sender.get_span_context()
        if sender_context.is_valid:
            span.add_link(sender_context, {"hopwatch.link": "sender"})


def _record_failure(span: Span, result: StepResult) -> None:
    reason = result.reason or "error"
    status_code = result.attributes.get("http.response.status_code")
    is_http_error = isinstance(status_code, int) and status_code >= 400
    span.set_attributes(
        {"hopwatch.reason": reason, "error.type": str(status_code) if is_http_error else reason}
    )
    message = (result.message or "")[:_MESSAGE_LIMIT]
    span.add_event("hopwatch.step.failed", {"hopwatch.reason": reason, "hopwatch.message": message})
    span.set_status(Status(StatusCode.ERROR, f"{reason}: {message}" if message else reason))


# -- the engine's handle ------------------------------------------------------------------------


class Tracing:
    """What the runner calls (`run_scope`, `step_scope`) and the engine starts and stops."""

    def __init__(
        self, provider: TracerProvider, processor: RunExportProcessor, policy: SamplingPolicy
    ) -> None:
        self.provider = provider
        self.processor = processor
        self.policy = policy
        self.tracer = provider.get_tracer(TRACER_NAME, __version__)

    @classmethod
    def from_env(
        cls, *, location: str, exporters: Sequence[SpanExporter] | None = None
    ) -> Tracing | None:
        """Tracing as the OTEL_* variables configure it, or None when traces are off.

        Raises ConfigError for a value hopwatch cannot honour.
        """
        chosen = build_exporters() if exporters is None else list(exporters)
        if not chosen:
            return None
        policy = SamplingPolicy.from_env()
        # BatchSpanProcessor reads OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE, ...
        processor = RunExportProcessor([BatchSpanProcessor(e) for e in chosen])
        resource = build_resource(
            "hopwatch", {"service.version": __version__, "hopwatch.location": location}
        )
        provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        provider.add_span_processor(processor)
        return cls(provider, processor, policy)

    def run_scope(self, ctx: StepContext) -> RunScope:
        return RunScope(self, ctx)

    def step_scope(self, ctx: StepContext, step: Any, result: StepResult) -> StepScope:
        return StepScope(self, ctx, step, result)

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Export what has ended; in a thread, as the exporter does blocking I/O."""
        return await asyncio.to_thread(self.provider.force_flush, int(timeout_s * 1000))

    async def aclose(self) -> None:
        """Export what is left and stop the export threads; call once, at engine stop."""
        await asyncio.to_thread(self.provider.shutdown)
