"""The spans of runs and steps, named and attributed by the OpenTelemetry conventions."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any, Final, Protocol

from opentelemetry import baggage, context, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode, Tracer

from monitor.tracing.propagation import (
    BAGGAGE_FLOW,
    BAGGAGE_RUN_ID,
    extract_context,
    propagation,
)
from probes import KINDS
from probes.base import ARRIVAL_KEY

if TYPE_CHECKING:
    from monitor.results import RunResult, StepResult
    from monitor.tracing.sampling import RunExportProcessor, SamplingPolicy
    from probes.arrivals import Arrival
    from probes.base import StepContext

_MESSAGE_LIMIT: Final = 1000


class TraceHandle(Protocol):
    """What a scope needs of `Tracing`; a protocol, so spans need not import the set-up."""

    @property
    def tracer(self) -> Tracer: ...

    @property
    def processor(self) -> RunExportProcessor: ...

    @property
    def policy(self) -> SamplingPolicy: ...


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

    def __init__(self, tracing: TraceHandle, ctx: StepContext) -> None:
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


_SPAN_KINDS: Final = {
    "client": SpanKind.CLIENT,
    "producer": SpanKind.PRODUCER,
    "consumer": SpanKind.CONSUMER,
    "internal": SpanKind.INTERNAL,
}


def _step_shape(step: Any, ctx: StepContext) -> tuple[str, SpanKind, dict[str, Any]]:
    """Span name, kind and starting attributes, as the step's kind draws them."""
    shape = KINDS[step.kind].span_shape(step, ctx)
    attrs: dict[str, Any] = {"hopwatch.step": step.name, "hopwatch.kind": step.kind}
    attrs.update(shape.attributes)
    return shape.name, _SPAN_KINDS[shape.kind], attrs


def _arrival_attributes(arrival: Arrival) -> dict[str, Any]:
    meta = arrival.meta
    attrs: dict[str, Any] = {}
    if meta.get("partition") is not None:
        attrs["messaging.destination.partition.id"] = str(meta["partition"])
    if meta.get("offset") is not None:
        attrs["messaging.kafka.offset"] = int(meta["offset"])
    key = arrival.key
    if isinstance(key, bytes):
        attrs["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
    delivery = arrival.delivery_id
    if delivery:
        attrs["messaging.message.id"] = str(delivery)
    return attrs


class StepScope:
    """The span of one step: current while the probe runs, so its requests carry it."""

    def __init__(
        self, tracing: TraceHandle, ctx: StepContext, step: Any, result: StepResult
    ) -> None:
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
    def _link(span: Span, arrival: Arrival) -> None:
        span.set_attributes(_arrival_attributes(arrival))
        sender = trace.get_current_span(extract_context(arrival.headers))
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
