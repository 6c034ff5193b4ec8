"""The run-history sink: buffers results off the probing path and writes them in batches.

`submit` only appends to a bounded buffer. One writer task decides incidents (in memory),
then writes runs, hops and changed incidents in one transaction per batch. A database that is
down costs a bounded buffer: the oldest runs are dropped and counted, and probing goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import URL, delete, event, insert, make_url, select, text, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from monitor.results import RunResult
from monitor.store import migrate as migrations
from monitor.store import queries
from monitor.store.incidents import Incident, IncidentBook, IncidentPolicy
from monitor.store.rows import EXCERPT_LIMIT, incident_row, run_rows
from monitor.store.schema import incidents, runs, step_results
from monitor.store.views import (
    IncidentPage,
    LinkPoint,
    RunDetail,
    RunPage,
    StepSamples,
)

log = logging.getLogger(__name__)

_Rows = tuple[dict[str, Any], list[dict[str, Any]]]
_PG_DRIVERS = {"postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg"}
_SQLITE_DRIVERS = {"sqlite", "sqlite+pysqlite"}


def normalize_url(url: str) -> URL:
    """An async SQLAlchemy URL: a bare path means SQLite; plain `postgresql://` means asyncpg."""
    if "://" not in url:
        url = f"sqlite+aiosqlite:///{url}"
    parsed = make_url(url)
    if parsed.drivername in _PG_DRIVERS:
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif parsed.drivername in _SQLITE_DRIVERS:
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the writer writes; the busy timeout rides out short locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(url: URL, connect_timeout_s: float = 5.0) -> AsyncEngine:
    """An engine tuned per backend; creates the SQLite file's directory if missing."""
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_driver_name() == "asyncpg":
        connect_args = {"timeout": connect_timeout_s, "command_timeout": 60}
    return create_async_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _is_poison(exc: BaseException) -> bool:
    """The database refused these rows (retrying will not help), as opposed to being away."""
    if isinstance(exc, IntegrityError | DataError):
        return True
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


@dataclass(slots=True)
class StoreStats:
    """Counters of what the store did with the results it was handed."""

    written: int = 0
    dropped: int = 0  # pushed out of a full buffer, or unwritten at close
    rejected: int = 0  # refused by the database (bad rows)
    write_errors: int = 0  # failed write attempts (database away)
    reachable: bool = False
    last_error: str | None = None


class _StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        stats = self._store.stats
        for name, doc, value in (
            ("written_runs", "Runs written to the store.", stats.written),
            ("dropped_runs", "Runs dropped because the store buffer was full.", stats.dropped),
            ("rejected_runs", "Runs the database refused to store.", stats.rejected),
            ("write_errors", "Failed store write attempts.", stats.write_errors),
        ):
            yield CounterMetricFamily(f"hopwatch_store_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "hopwatch_store_buffered_runs", "Runs waiting to be written.", self._store.buffered
        )
        yield GaugeMetricFamily(
            "hopwatch_store_up", "1 if the last store write succeeded.", int(stats.reachable)
        )


class Store:
    """SQL store of runs, hops and incidents; a Sink, and the source of the API's history."""

    def __init__(
        self,
        url: str,
        *,
        retention_s: float | None = 7 * 86400.0,
        flap_window_s: float = 60.0,
        incidents: IncidentPolicy | None = None,
        batch_size: int = 200,
        max_buffer: int = 10_000,
        linger_s: float = 0.25,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        write_timeout_s: float = 30.0,
        prune_every_s: float = 600.0,
        excerpt_limit: int = EXCERPT_LIMIT,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = normalize_url(url)
        self.engine = create_engine(self.url)
        self.retention_s = retention_s
        self.batch_size = batch_size
        self.max_buffer = max_buffer
        self.linger_s = linger_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.write_timeout_s = write_timeout_s
        self.prune_every_s = prune_every_s
        self.excerpt_limit = excerpt_limit
        self.clock = clock
        self.book = IncidentBook(flap_window_s, policy=incidents)
        self.stats = StoreStats()
        self._incoming: deque[RunResult] = deque()  # incidents not yet decided
        self._ready: deque[_Rows] = deque()  # decided, waiting to be written
        self._loaded = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._written = asyncio.Condition()
        self._next_prune = math.inf  # retention runs once the writer is started
        if registry is not None:
            registry.register(_StoreCollector(self))

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"

    @property
    def buffered(self) -> int:
        return len(self._incoming) + len(self._ready)

    # --- lifecycle -------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Create or upgrade the tables (Alembic, to head)."""
        await migrations.upgrade(self.engine)

    async def start(self) -> None:
        """Load the incident state (if the database answers soon) and start the writer."""
        if self._task is not None:
            return
        self._next_prune = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.write_timeout_s):
                await self.flush()
        self._task = asyncio.create_task(self._writer(), name="hopwatch-store-writer")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the writer, write what is buffered if the database lets us, release the pool."""
        self._stop.set()
        self._wake.set()
        self._full.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout_s)
            self._task = None
        if self.buffered or self.book.has_dirty:  # a read-only user has nothing to write
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.flush()
        if self.buffered:
            log.warning("store closed with %d runs unwritten", self.buffered)
            self.stats.dropped += self.buffered
            self._incoming.clear()
            self._ready.clear()
        await self.engine.dispose()

    # --- the sink side ---------------------------------------------------------------------

    def submit(self, result: RunResult) -> None:
        """Queue a result; never blocks, never raises on a full buffer (drops the oldest)."""
        if self._stop.is_set():  # closed: nothing will write it
            self.stats.dropped += 1
            return
        if self.buffered >= self.max_buffer:
            self._drop_oldest()
        self._incoming.append(result)
        self._wake.set()
        if self.buffered >= self.batch_size:
            self._full.set()

    def _drop_oldest(self) -> None:
        if self._ready:
            self._ready.popleft()
        elif self._incoming:
            self._incoming.popleft()
        self.stats.dropped += 1

    async def flush(self) -> bool:
        """Write everything buffered now; False if the database could not be reached."""
        async with self._lock:
            try:
                async with asyncio.timeout(self.write_timeout_s * 4):
                    touched = await self._drain()
            except Exception as exc:  # the database is away: keep the buffer, retry later
                self._note_failure(exc)
                return False
        if touched and not self.stats.reachable:
            log.info("store %r is writable", self)
            self.stats.reachable = True
        return True

    async def wait_written(self, count: int) -> None:
        """Wait until `count` runs in all have been written (use with a timeout)."""
        async with self._written:
            await self._written.wait_for(lambda: self.stats.written >= count)

    def _note_failure(self, exc: BaseException) -> None:
        self.stats.write_errors += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
        if self.stats.reachable or self.stats.write_errors == 1:
            log.warning("store %r unavailable, buffering: %s", self, self.stats.last_error)
        self.stats.reachable = False

    async def _drain(self) -> bool:
        """Write what is buffered; True if the database was used (and so is reachable)."""
        touched = False
        if not self._loaded:
            await self._load_incidents()
            touched = True
        self._decide()
        while True:
            batch = [self._ready.popleft() for _ in range(min(self.batch_size, len(self._ready)))]
            dirty = self.book.take_dirty()
            if not batch and not dirty:
                break
            try:
                await self._write_batch(batch, dirty)
            except BaseException:
                self._requeue(batch)
                self.book.mark_dirty(dirty)
                raise
            touched = True
            async with self._written:
                self._written.notify_all()
        if self.retention_s is not None and time.monotonic() >= self._next_prune:
            await self.prune()
            self._next_prune = time.monotonic() + self.prune_every_s
            touched = True
        return touched

    async def _load_incidents(self) -> None:
        async with self.engine.connect() as conn:
            found = await queries.load_incidents(conn, self.clock() - self.book.flap_window)
        self.book.load(found, self.clock())
        self._loaded = True

    def _decide(self) -> None:
        while self._incoming:
            result = self._incoming.popleft()
            try:
                self.book.apply(result)
                self._ready.append(run_rows(result, self.excerpt_limit))
            except Exception:  # a malformed result must not wedge the writer
                self.stats.rejected += 1
                log.exception("store cannot record run %s", getattr(result, "run_id", "?"))

    def _requeue(self, batch: list[_Rows]) -> None:
        self._ready.extendleft(reversed(batch))
        while self.buffered > self.max_buffer:
            self._drop_oldest()

    async def _write_batch(self, batch: list[_Rows], dirty: list[Incident]) -> None:
        try:
            await self._write(batch, dirty)
        except Exception as exc:
            if not _is_poison(exc):
                raise
            await self._write_one_by_one(batch, dirty)

    async def _write_one_by_one(self, batch: list[_Rows], dirty: list[Incident]) -> None:
        # One bad row must not sink its batch: write each alone, drop only what is refused.
        # Rows leave `batch` once settled, so a caller requeues only the unsettled rest.
        while batch:
            try:
                await self._write(batch[:1], [])
            except Exception as exc:
                if not _is_poison(exc):
                    raise
                self.stats.rejected += 1
                log.error("store refused run %s: %s", batch[0][0]["id"], exc)
            batch.pop(0)
        try:
            await self._write([], dirty)
        except Exception as exc:
            if not _is_poison(exc):
                raise
            log.error("store refused incidents %s: %s", [i.id for i in dirty], exc)
            dirty.clear()

    async def _write(self, batch: Sequence[_Rows], dirty: Sequence[Incident]) -> None:
        async with asyncio.timeout(self.write_timeout_s), self.engine.begin() as conn:
            if batch:
                await conn.execute(insert(runs), [run for run, _ in batch])
                steps = [step for _, run_steps in batch for step in run_steps]
                if steps:
                    await conn.execute(insert(step_results), steps)
            for incident in dirty:
                await self._upsert_incident(conn, incident_row(incident))
        self.stats.written += len(batch)

    @staticmethod
    async def _upsert_incident(conn: AsyncConnection, row: dict[str, Any]) -> None:
        values = {k: v for k, v in row.items() if k != "id"}
        result = await conn.execute(
            update(incidents).where(incidents.c.id == row["id"]).values(**values)
        )
        if result.rowcount == 0:
            await conn.execute(insert(incidents).values(**row))

    async def _writer(self) -> None:
        backoff = self.retry_min_s
        while not self._stop.is_set():
            await self._wait_for_work()
            if self._stop.is_set():
                break
            if await self.flush():
                backoff = self.retry_min_s
                continue
            await self._wait(self._stop, backoff)
            backoff = min(backoff * 2, self.retry_max_s)

    async def _wait_for_work(self) -> None:
        if not self.buffered:
            due = self._next_prune - time.monotonic() if self.retention_s is not None else None
            await self._wait(self._wake, due)
        self._wake.clear()
        # Linger a little so that results arriving together are written together.
        if self.buffered < self.batch_size:
            await self._wait(self._full, self.linger_s)
        self._full.clear()

    @staticmethod
    async def _wait(event: asyncio.Event, timeout_s: float | None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()

    # --- retention -------------------------------------------------------------------------

    async def prune(self, now: float | None = None) -> int:
        """Delete runs older than the retention and incidents closed before it; returns runs."""
        if self.retention_s is None:
            return 0
        cutoff = (self.clock() if now is None else now) - self.retention_s
        old = select(runs.c.id).where(runs.c.started_at < cutoff)
        async with self.engine.begin() as conn:
            await conn.execute(delete(step_results).where(step_results.c.run_id.in_(old)))
            deleted = await conn.execute(delete(runs).where(runs.c.started_at < cutoff))
            await conn.execute(delete(incidents).where(incidents.c.closed_at < cutoff))
        return int(deleted.rowcount)

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

    async def latest_run(self, flow: str, variant: str) -> RunDetail | None:
        async with self.engine.connect() as conn:
            return await queries.latest_run(conn, flow, variant)

    async def list_incidents(
        self,
        *,
        status: str | None = None,
        flow: str | None = None,
        variant: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> IncidentPage:
        async with self.engine.connect() as conn:
            return await queries.list_incidents(
                conn, status=status, flow=flow, variant=variant, limit=limit, cursor=cursor
            )

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
