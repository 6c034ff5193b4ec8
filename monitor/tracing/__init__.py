"""Traces of synthetic transactions, one per run with a span per step, in four modules.

- `propagation`: trace context into and out of HTTP headers and Kafka record headers
  (`propagation.propagation` is what a run's root span lends its probes to send along);
- `spans`: the run's root span (`RunScope`) and each step's (`StepScope`), named and
  attributed by the OpenTelemetry conventions;
- `sampling`: which runs' traces are exported, decided once each run's outcome is known
  (`SamplingPolicy`, `RunExportProcessor`);
- `export`: exporters and resource from the OTEL_* variables, and `Tracing`, the handle the
  engine starts and stops and the runner opens scopes on.
"""

from monitor.tracing.export import TRACER_NAME, Tracing, build_exporters, build_resource
from monitor.tracing.propagation import (
    BAGGAGE_FLOW,
    BAGGAGE_RUN_ID,
    HEADER_GETTER,
    HeaderGetter,
    extract_context,
    kafka_headers_as_text,
)
from monitor.tracing.sampling import RunExportProcessor, SamplingPolicy
from monitor.tracing.spans import RunScope, StepScope, TraceHandle

__all__ = [
    "BAGGAGE_FLOW",
    "BAGGAGE_RUN_ID",
    "HEADER_GETTER",
    "TRACER_NAME",
    "HeaderGetter",
    "RunExportProcessor",
    "RunScope",
    "SamplingPolicy",
    "StepScope",
    "TraceHandle",
    "Tracing",
    "build_exporters",
    "build_resource",
    "extract_context",
    "kafka_headers_as_text",
]
