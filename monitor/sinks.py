"""Where run results go: every sink gets every RunResult; one failing sink never stops the others.

A sink's `submit` is called on the probing path, so it must be cheap and never block:
a sink doing I/O queues the result and writes it from its own task.

A run with cleanup steps also hands its hops to sinks that have a `verdict` method as soon as
the hops are done, before its cleanup: a cleanup on a hung system (a DELETE on the API that
broke) must not hold a broken link's signal until the run's timeout. `submit` still gets the
whole run, cleanup included, once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from prometheus_client import Counter

from monitor.results import RunResult

log = logging.getLogger(__name__)


@runtime_checkable
class Sink(Protocol):
    """A consumer of run results (the metrics, the last-runs table, the store)."""

    def submit(self, result: RunResult) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def sink_name(sink: Sink) -> str:
    """The `sink` label: the class name without a Sink suffix, lower case (metrics, store…)."""
    return type(sink).__name__.removesuffix("Sink").lower() or "sink"


class FanOut:
    """Hands each result to every sink, isolating their failures from each other and the run."""

    def __init__(self, sinks: Sequence[Sink] = (), errors: Counter | None = None) -> None:
        self.sinks: list[Sink] = []
        self._errors = errors
        for sink in sinks:
            self.add(sink)

    def add(self, sink: Sink, *, first: bool = False) -> None:
        """Add a sink; `first` puts it ahead of the others, so it is closed after them all
        (a sink that publishes what others decide while they close)."""
        if first:
            self.sinks.insert(0, sink)
        else:
            self.sinks.append(sink)
        if self._errors is not None:
            self._errors.labels(sink_name(sink))  # at 0 from the start, so rate() sees the first

    def submit(self, result: RunResult) -> None:
        for sink in self.sinks:
            try:
                sink.submit(result)
            except Exception:  # a sink's bug must not break probing
                if self._errors is not None:
                    self._errors.labels(sink_name(sink)).inc()
                log.exception("sink %s failed on run %s", type(sink).__name__, result.run_id)

    def verdict(self, result: RunResult) -> None:
        """The run's hops, before its cleanup, to the sinks that signal broken links early."""
        for sink in self.sinks:
            early = getattr(sink, "verdict", None)
            if early is None:
                continue
            try:
                early(result)
            except Exception:  # a sink's bug must not break probing
                if self._errors is not None:
                    self._errors.labels(sink_name(sink)).inc()
                log.exception("sink %s failed on run %s", type(sink).__name__, result.run_id)

    async def start(self) -> None:
        for sink in self.sinks:
            await sink.start()

    async def close(self) -> None:
        for sink in reversed(self.sinks):
            try:
                await sink.close()
            except Exception:
                log.exception("sink %s failed to close", type(sink).__name__)
