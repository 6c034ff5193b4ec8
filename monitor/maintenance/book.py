"""Which maintenance windows hold now: the flow files' and those added at run time, shared.

Runtime windows live in the store (one table, so they survive a restart and every replica of a
cluster sees them: each polls it every few seconds), or in memory without a store. The book
keeps the concrete windows around now in a list, so that marking a run costs a scan of a few
windows, not a cron computation; `refresh` rebuilds it, and the engine's loop calls it at
every window boundary and poll. The `hopwatch_maintenance` gauge follows the same list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge

from monitor.maintenance.windows import UPCOMING_PER_SCHEDULE, MaintenanceSpec, Window

log = logging.getLogger(__name__)

LOOKBACK_S = 3600.0  # runs finishing now started at most this long ago (their flow's timeout)
HORIZON_S = 7 * 86400.0  # how far ahead windows are listed
POLL_S = 5.0


class WindowStore(Protocol):
    """Where runtime windows are kept (monitor.store.Store)."""

    async def add_window(self, window: Window) -> None: ...

    async def end_window(self, window_id: str, at: float) -> Window | None: ...

    async def load_windows(self, ended_after: float) -> list[Window]: ...


class UnknownWindow(LookupError):
    """No runtime window has this id."""


class DeclaredWindow(ValueError):
    """The window comes from a flow file: only editing the file ends it."""


class MaintenanceBook:
    """Declared and runtime windows; answers whether a run of (flow, variant) is covered."""

    def __init__(
        self,
        declared: Sequence[MaintenanceSpec] = (),
        *,
        store: WindowStore | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = POLL_S,
    ) -> None:
        self.declared = list(declared)
        self.store = store
        self.clock = clock
        self.poll_s = poll_s
        self.runtime: dict[str, Window] = {}
        self.current: list[Window] = []  # concrete windows overlapping [now - lookback, horizon]
        self.changed = asyncio.Event()
        self._rounds = asyncio.Condition()  # notified after each round of `keep`
        self.gauge = (
            Gauge(
                "hopwatch_maintenance",
                "1 while a maintenance window covers the flow variant, else 0 (after one did).",
                ["flow", "variant", "location"],
                registry=registry,
            )
            if registry is not None
            else None
        )
        self._shown: set[tuple[str, str, str]] = set()
        self.refresh()

    # --- questions -------------------------------------------------------------------------

    def covers(self, flow: str, variant: str, t0: float, t1: float) -> bool:
        """Whether a run of (flow, variant) from t0 to t1 touched a window."""
        if not self.current:  # the usual answer, asked once a run: no generator for it
            return False
        return any(w.overlaps(t0, t1) and w.applies(flow, variant) for w in self.current)

    def windows(self, now: float | None = None) -> list[Window]:
        """Active and upcoming windows, soonest first (a schedule's next few occurrences)."""
        now = self.clock() if now is None else now
        listed = [w for w in self.current if w.end > now]
        per_declaration: dict[str, int] = {}
        out = []
        for window in sorted(listed, key=lambda w: (w.start, w.id)):
            key = window.id.partition("@")[0]
            if window.start > now:
                per_declaration[key] = per_declaration.get(key, 0) + 1
                if per_declaration[key] > UPCOMING_PER_SCHEDULE:
                    continue
            out.append(window)
        return out

    # --- changes ---------------------------------------------------------------------------

    def set_declared(self, declared: Sequence[MaintenanceSpec]) -> None:
        """The flow files' windows after a reload."""
        self.declared = list(declared)
        self.refresh()

    async def add(
        self,
        *,
        flows: Iterable[str],
        variants: Iterable[str],
        start: float,
        end: float,
        reason: str,
    ) -> Window:
        """A runtime window, kept in the store first (an error there adds nothing)."""
        window = Window(
            id=str(uuid.uuid4()),
            flows=tuple(flows),
            variants=tuple(variants),
            start=start,
            end=end,
            reason=reason,
            source="api",
            created_at=self.clock(),
        )
        if self.store is not None:
            await self.store.add_window(window)
        self.runtime[window.id] = window
        self.refresh()
        return window

    async def end(self, window_id: str) -> Window:
        """End a runtime window now (one not started yet is cancelled); returns it as ended."""
        if window_id.startswith("config-"):
            raise DeclaredWindow(
                f"window {window_id!r} is declared in a flow file: remove it there and reload"
            )
        now = self.clock()
        if self.store is not None:
            ended = await self.store.end_window(window_id, now)
        else:
            found = self.runtime.get(window_id)
            ended = None if found is None else _ended(found, now)
        if ended is None:
            raise UnknownWindow(f"no maintenance window {window_id!r}")
        self.runtime[window_id] = ended
        self.refresh()
        return ended

    async def sync(self) -> None:
        """Take the store's runtime windows (other replicas' included) in place of ours."""
        if self.store is None:
            return
        found = await self.store.load_windows(self.clock() - LOOKBACK_S)
        self.runtime = {w.id: w for w in found}
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the concrete windows around now; wake the loop to set the gauge."""
        now = self.clock()
        since, until = now - LOOKBACK_S, now + HORIZON_S
        current = [w for w in self.runtime.values() if w.overlaps(since, until)]
        for index, spec in enumerate(self.declared):
            current.extend(spec.occurrences(index, since, until))
        self.current = current
        self.changed.set()

    # --- the gauge -------------------------------------------------------------------------

    def export(self, pairs: Iterable[tuple[str, str, str]]) -> None:
        """Set `hopwatch_maintenance` for (flow, variant, location): 1 when covered now; 0 for
        those covered before (a series appears with a flow's first window, not for every flow).
        Pairs not given any more (a flow removed) lose their series."""
        if self.gauge is None:
            return
        now = self.clock()
        given = set(pairs)
        for key in self._shown - given:
            with contextlib.suppress(KeyError):
                self.gauge.remove(*key)
        self._shown &= given
        for flow, variant, location in given:
            inside = any(w.start <= now < w.end and w.applies(flow, variant) for w in self.current)
            if inside or (flow, variant, location) in self._shown:
                self.gauge.labels(flow, variant, location).set(1.0 if inside else 0.0)
                self._shown.add((flow, variant, location))

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition` holds after a round of `keep` (use with a timeout)."""
        async with self._rounds:
            await self._rounds.wait_for(condition)

    def next_boundary(self, now: float) -> float | None:
        """The next start or end of a window after `now`."""
        times = [t for w in self.current for t in (w.start, w.end) if t > now]
        return min(times, default=None)

    async def keep(self, pairs: Callable[[], Iterable[tuple[str, str, str]]]) -> None:
        """Poll the store and keep the gauge right at every boundary, until cancelled."""
        while True:
            try:
                await self.sync()
            except Exception as exc:  # the store away: keep the windows we know
                log.warning("maintenance windows: store unavailable: %s", exc)
                self.refresh()
            self.export(pairs())
            self.changed.clear()
            async with self._rounds:
                self._rounds.notify_all()
            now = self.clock()
            boundary = self.next_boundary(now)
            wait = self.poll_s if boundary is None else min(self.poll_s, boundary - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.01)):
                    await self.changed.wait()


def _ended(window: Window, now: float) -> Window:
    """`window` ended at `now`: cut short, or (not started yet) cancelled, ending at its start."""
    return replace(window, end=max(min(window.end, now), window.start))
