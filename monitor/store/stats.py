"""What the store did with the results it was handed, and those figures as metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(slots=True)
class StoreStats:
    """Counters of what the store did with the results it was handed."""

    written: int = 0
    dropped: int = 0  # pushed out of a full buffer, or unwritten at close
    rejected: int = 0  # refused by the database (bad rows)
    write_errors: int = 0  # failed write attempts (database away)
    reachable: bool = False
    last_error: str | None = None


class StoreCollector(Collector):
    """`hopwatch_store_*`, read from the store's figures at scrape time."""

    def __init__(self, stats: StoreStats, buffered: Callable[[], int]) -> None:
        self._stats = stats
        self._buffered = buffered

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        for name, doc, value in (
            ("written_runs", "Runs written to the store.", stats.written),
            ("dropped_runs", "Runs dropped because the store buffer was full.", stats.dropped),
            ("rejected_runs", "Runs the database refused to store.", stats.rejected),
            ("write_errors", "Failed store write attempts.", stats.write_errors),
        ):
            yield CounterMetricFamily(f"hopwatch_store_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "hopwatch_store_buffered_runs", "Runs waiting to be written.", self._buffered()
        )
        yield GaugeMetricFamily(
            "hopwatch_store_up", "1 if the last store write succeeded.", int(stats.reachable)
        )
