"""Which runs' traces are exported, decided once each run's outcome is known, never before."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanContext

from probes.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SamplingPolicy:
    """Which finished runs are exported: all that did not succeed, a ratio of the rest.

    Why a failing run is never the one dropped: a sampler decides when the root span starts,
    before the run's outcome exists. So the SDK sampler is ALWAYS_ON (every span is recorded,
    and the systems under watch see sampled=1 and record theirs), and `RunExportProcessor`
    holds a run's spans until the run ends. Then `keep` decides for the whole trace:

    - a run that did not succeed (failure, aborted) is always exported;
    - a successful run is exported if its trace id passes the ratio test of
      `OTEL_TRACES_SAMPLER` (always_on → 1, always_off → 0, [parentbased_]traceidratio →
      `OTEL_TRACES_SAMPLER_ARG`) — the SDK's own TraceIdRatioBased test, so ratio-sampling
      services agree on the same runs;
    - with a parent-based sampler (the default) a run started inside a traced request follows
      that parent's sampled flag instead of the ratio (failures are still always exported).

    A run whose trace was dropped gets `RunResult.trace_id = None`, so exemplars and
    `hopwatch check --output json` only ever name traces that were exported. With a ratio
    below 1, services downstream still export their spans of the dropped runs: a collector's
    tail sampling can drop those if they matter.
    """

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
