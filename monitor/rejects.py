"""Counting and logging what hostile or broken input costs, so an attacker can neither flood the
log nor go uncounted: each refusal is one `malformed` arrival, each cause one WARNING per
interval at most, never a traceback."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from monitor.metric_types import LabelledCounter

__all__ = ["LOG_INTERVAL", "RejectLog"]

log = logging.getLogger(__name__)

LOG_INTERVAL: Final = 60.0  # each cause is logged at most once in this many seconds


class RejectLog:
    """Counts rejects as `malformed` arrivals of `source` and logs each cause at most once per
    `interval`, with how many came since it was last logged."""

    def __init__(
        self,
        counter: LabelledCounter | None,
        interval: float = LOG_INTERVAL,
        *,
        source: str = "webhook",
        what: str = "public listener",
    ) -> None:
        self.interval = interval
        self.what = what
        self._child: Any = (
            counter.labels(source=source, outcome="malformed") if counter is not None else None
        )
        self._logged_at: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def reject(self, cause: str, detail: str) -> None:
        if self._child is not None:
            self._child.inc()
        self._since[cause] = self._since.get(cause, 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(cause)
        if last is not None and now - last < self.interval:
            return
        self._logged_at[cause] = now
        count = self._since.pop(cause)
        detail = detail.splitlines()[0][:120] if detail else ""  # what a client wrote: bounded
        log.warning(
            "%s refused %d for %s since last said (latest: %r); said at most once per %gs",
            self.what,
            count,
            cause,
            detail,
            self.interval,
        )
