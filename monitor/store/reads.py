"""The store's reads and its few direct writes (maintenance windows): what the API, the status
page and the gate ask of the run history, beside the writer that fills it (store.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from sqlalchemy import insert, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from monitor.maintenance.windows import Window
from monitor.store import queries
from monitor.store.incidents import Incident, IncidentBook
from monitor.store.schema import maintenance_windows
from monitor.store.views import (
    ArtifactInfo,
    IncidentPage,
    LinkPoint,
    RunDetail,
    RunPage,
    StepSamples,
)


class StoreReads:
    """Queries over `engine`; `Store` is one, and the writer besides."""

    engine: AsyncEngine
    book: IncidentBook
    write_timeout_s: float

    # --- maintenance windows added at run time (monitor.maintenance.WindowStore) -------------

    async def add_window(self, window: Window) -> None:
        async with asyncio.timeout(self.write_timeout_s), self.engine.begin() as conn:
            await conn.execute(insert(maintenance_windows).values(**queries.window_row(window)))

    async def end_window(self, window_id: str, at: float) -> Window | None:
        """End a window at `at` (one not started yet ends at its start: cancelled)."""
        async with asyncio.timeout(self.write_timeout_s), self.engine.begin() as conn:
            window = await queries.get_window(conn, window_id)
            if window is None:
                return None
            end = max(min(window.end, at), window.start)
            table = maintenance_windows
            await conn.execute(update(table).where(table.c.id == window_id).values(end=end))
        return queries.replace_end(window, end)

    async def load_windows(self, ended_after: float) -> list[Window]:
        """Windows that end after `ended_after` (active, upcoming, or just over)."""
        async with asyncio.timeout(self.write_timeout_s), self.engine.connect() as conn:
            return await queries.load_windows(conn, ended_after)

    # --- reads -----------------------------------------------------------------------------

    async def ping(self) -> bool:
        """True if the database answers a trivial query within a few seconds."""
        try:
            async with asyncio.timeout(5), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    def open_incidents(self) -> list[Incident]:
        """Open incidents as decided in memory (may be ahead of the database while it is away)."""
        return self.book.open_incidents()

    async def list_runs(
        self,
        *,
        flow: str | None = None,
        variant: str | None = None,
        location: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> RunPage:
        async with self.engine.connect() as conn:
            return await queries.list_runs(
                conn,
                flow=flow,
                variant=variant,
                location=location,
                outcome=outcome,
                since=since,
                until=until,
                limit=limit,
                cursor=cursor,
            )

    async def get_run(self, run_id: str) -> RunDetail | None:
        async with self.engine.connect() as conn:
            return await queries.get_run(conn, run_id)

    async def artifacts(self, run_id: str) -> list[ArtifactInfo]:
        """What evidence the run's hops kept (without the bytes)."""
        async with self.engine.connect() as conn:
            return await queries.artifacts(conn, run_id)

    async def artifact(self, run_id: str, position: int, name: str) -> tuple[str, bytes] | None:
        """One artifact's media type and bytes; None when it is not (or no longer) kept."""
        async with self.engine.connect() as conn:
            return await queries.artifact(conn, run_id, position, name)

    async def latest_run(self, flow: str, variant: str) -> RunDetail | None:
        async with self.engine.connect() as conn:
            return await queries.latest_run(conn, flow, variant)

    async def list_incidents(
        self,
        *,
        status: str | None = None,
        flow: str | None = None,
        variant: str | None = None,
        location: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> IncidentPage:
        async with self.engine.connect() as conn:
            return await queries.list_incidents(
                conn, status=status, flow=flow, variant=variant, location=location, limit=limit,
                cursor=cursor,
            )  # fmt: skip

    async def samples(
        self,
        flow: str,
        variant: str,
        since: float,
        until: float,
        *,
        location: str | None = None,
    ) -> dict[str, StepSamples]:
        """Per-hop latency/status lists of runs started in [since, until), for the canary gate."""
        async with self.engine.connect() as conn:
            return await queries.samples(conn, flow, variant, since, until, location)

    async def link_history(
        self, pairs: Sequence[tuple[str, str]], limit: int = 30
    ) -> dict[tuple[str, str, str], list[LinkPoint]]:
        """Recent points of every hop of each (flow, variant), keyed (flow, variant, step)."""
        async with self.engine.connect() as conn:
            return await queries.link_history(conn, pairs, limit)
