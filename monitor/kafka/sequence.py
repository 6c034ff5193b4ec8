"""Per-key sequence numbers: stamped on every record produced, checked on every record seen.

Kafka keeps order per key, so a record whose `hopwatch-seq` is lower than one already seen for
its key was reordered by the system under watch; the record's meta says so for the step.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.metric_types import LabelledCounter

__all__ = ["SEQ_HEADER", "OrderCheck", "Stamper"]

SEQ_HEADER = "hopwatch-seq"  # per-key sequence stamped on every produced record
_SEQ_MEMORY = 10_000  # keys remembered for sequence stamping and order checks


class _Lru(OrderedDict[Any, int]):
    """A bounded map of the most recently used keys (sequence numbers by key)."""

    def put(self, key: Any, value: int) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > _SEQ_MEMORY:
            self.popitem(last=False)


class Stamper:
    """The next sequence for each (cluster, topic, key) this monitor produces to."""

    def __init__(self) -> None:
        self._last = _Lru()

    def next_seq(self, cluster: str, topic: str, key: bytes | None) -> int:
        """A per-key sequence that grows across runs and replicas: max(last + 1, unix µs)."""
        slot = (cluster, topic, key)
        seq = max(self._last.get(slot, 0) + 1, time.time_ns() // 1000)
        self._last.put(slot, seq)
        return seq


class OrderCheck:
    """The highest sequence seen for each (channel, key), and the records that came after it."""

    def __init__(self, counter: LabelledCounter | None = None) -> None:
        self._highest = _Lru()
        self._counter = counter

    def note(
        self, channel: str, key: bytes | None, raw_seq: str | None, meta: dict[str, Any]
    ) -> None:
        """Put the record's `seq` in `meta`, and `out_of_order_after` if it came too late."""
        if raw_seq is None:
            return
        try:
            seq = int(raw_seq)
        except ValueError:
            return
        meta["seq"] = seq
        if key is None:  # records without a key have no order to keep
            return
        slot = (channel, key)
        highest = self._highest.get(slot)
        if highest is not None and seq < highest:
            meta["out_of_order_after"] = highest
            if self._counter is not None:
                self._counter.labels(source="kafka", outcome="out_of_order").inc()
            return
        self._highest.put(slot, seq)
