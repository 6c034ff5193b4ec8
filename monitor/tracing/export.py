"""Tracing set up from the standard OTEL_* variables, so hopwatch's traces go where others' do."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from monitor import __version__
from monitor.tracing.sampling import RunExportProcessor, SamplingPolicy
from monitor.tracing.spans import RunScope, StepScope
from probes.errors import ConfigError

if TYPE_CHECKING:
    from monitor.results import StepResult
    from probes.base import StepContext

TRACER_NAME: Final = "hopwatch"
_TRUE: Final = frozenset({"true", "1", "yes"})


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
    """The span exporters OTEL_TRACES_EXPORTER asks for; empty when traces are off.

    `OTEL_TRACES_EXPORTER` = otlp · console · none (a list is allowed); unset, it is `otlp`
    when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and
    `none` otherwise (no collector, no traces). OTLP goes over HTTP/protobuf
    (`OTEL_EXPORTER_OTLP_PROTOCOL`; `grpc` needs opentelemetry-exporter-otlp-proto-grpc
    installed). `OTEL_SDK_DISABLED=true` turns traces off.
    """
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

        The resource is service.name=hopwatch (`OTEL_SERVICE_NAME` and
        `OTEL_RESOURCE_ATTRIBUTES` win), service.version and hopwatch.location. Raises
        ConfigError for a value hopwatch cannot honour.
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
