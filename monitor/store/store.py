"""The run-history sink: buffers results off the probing path and writes them in batches.

`submit` only appends to a bounded buffer. One writer task decides incidents (in memory),
then writes runs, hops and changed incidents in one transaction per batch. A database that is
down costs a bounded buffer: the oldest runs are dropped and counted, and probing goes on.
In a cluster, replicas hand flows over with `release_flows` and `take_flows`, so that the
incidents of a link stay one across replicas sharing the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection

from monitor.results import RunResult
from monitor.store import migrate as migrations
from monitor.store import queries
from monitor.store.connect import create_engine, normalize_url
from monitor.store.incidents import Incident, IncidentBook, IncidentPolicy
from monitor.store.reads import StoreReads
from monitor.store.rows import (
    ARTIFACT_COLUMNS,
    ARTIFACTS_KEPT,
    EXCERPT_LIMIT,
    RUN_COLUMNS,
    STEP_COLUMNS,
    Row,
    artifact_rows,
    incident_row,
    run_rows,
)
from monitor.store.schema import (
    incidents,
    maintenance_windows,
    runs,
    step_artifacts,
    step_results,
)
from monitor.store.stats import StoreCollector, StoreStats

log = logging.getLogger(__name__)

_Rows = tuple[Row, list[Row], list[Row]]  # run, hops, artifacts
# Runs written in one transaction at most; below it, what came within `linger_s`. Saturated
# (1,600 runs/s), 1,000 against 200 halved the commits and cut the store's CPU per run by
# about a fifth (54-65 -> 42-57 µs in all, of it the SQLite thread's 25-31 -> 22-27 µs;
# the store alone, alternated runs): each
# transaction also costs a pool checkout, thread hops and the WAL pages its indexes touch.
BATCH_SIZE = 4000
# A busy monitor lingers longer: the index on (flow, variant, started_at) takes each batch's
# runs at one place per flow, so a transaction rewrites about one page per flow whatever its
# size. At 3,000 runs/s, 3,000 runs a transaction against 750 cost SQLite 12 µs a run instead
# of 15-17 (its inserts replayed alone). A quiet one writes within `linger_s` as before.
BUSY_RUNS = 500  # runs in the last transaction that make the next linger BUSY_LINGER times longer
BUSY_LINGER = 4
DECIDE_SLICE = 64  # results decided per loop iteration: about 1 ms of the loop's time
# Runs waiting to be written keep their artifacts only while the queue is this short: a
# database that is away costs a bounded buffer, not one screenshot per buffered run.
ARTIFACTS_BUFFERED = 25


def _is_poison(exc: BaseException) -> bool:
    """The database refused these rows (retrying will not help), as opposed to being away."""
    if isinstance(exc, IntegrityError | DataError):
        return True
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


class Store(StoreReads):
    """SQL store of runs, hops and incidents; a Sink, and the source of the API's history."""

    def __init__(
        self,
        url: str,
        *,
        retention_s: float | None = 7 * 86400.0,
        flap_window_s: float = 60.0,
        incidents: IncidentPolicy | None = None,
        batch_size: int = BATCH_SIZE,
        max_buffer: int = 10_000,
        linger_s: float = 0.25,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        write_timeout_s: float = 30.0,
        handover_timeout_s: float = 5.0,
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
        self.handover_timeout_s = handover_timeout_s
        self.prune_every_s = prune_every_s
        self.excerpt_limit = excerpt_limit
        self.clock = clock
        self.book = IncidentBook(flap_window_s, policy=incidents)
        self.stats = StoreStats()
        self._incoming: deque[RunResult] = deque()  # incidents not yet decided
        self._ready: deque[_Rows] = deque()  # decided, waiting to be written
        self._loaded = False
        self._taking: set[str] = set()  # flows whose stored incidents must be loaded first
        self._releasing: set[str] = set()  # flows to drop from the book once written
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._written = asyncio.Condition()
        self._next_prune = math.inf  # retention runs once the writer is started
        self._inserts: tuple[str, str, str] | None = None  # runs, hops, artifacts: driver SQL
        self._last_batch = 0  # runs in the last transaction
        if registry is not None:
            registry.register(StoreCollector(self.stats, lambda: self.buffered))

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
        releasing = set(self._releasing)  # their queued results are decided by this drain
        if not self._loaded:
            await self._load_incidents()
            touched = True
        await self._decide()
        touched = await self._write_ready() or touched
        if self._taking:
            # Only now: this replica's own unwritten decisions for them are in the database.
            await self._load_taken()
            touched = True
            await self._decide()
            await self._write_ready()
        if gone := releasing & self._releasing:  # unless taken back meanwhile
            self.book.forget(gone)
            self._releasing -= gone
        if self.retention_s is not None and time.monotonic() >= self._next_prune:
            await self.prune()
            self._next_prune = time.monotonic() + self.prune_every_s
            touched = True
        return touched

    async def _write_ready(self) -> bool:
        """Write the decided runs and changed incidents in batches; True if anything was."""
        touched = False
        while True:
            batch = [self._ready.popleft() for _ in range(min(self.batch_size, len(self._ready)))]
            dirty = self.book.take_dirty()
            if not batch and not dirty:
                return touched
            try:
                await self._write_batch(batch, dirty)
            except BaseException:
                self._requeue(batch)
                self.book.mark_dirty(dirty)
                raise
            touched = True
            if batch:
                self._last_batch = len(batch)
            async with self._written:
                self._written.notify_all()

    async def _load_incidents(self) -> None:
        async with self.engine.connect() as conn:
            found = await queries.load_incidents(conn, self.clock() - self.book.flap_window)
        self.book.load(found, self.clock())
        self._loaded = True

    async def _load_taken(self) -> None:
        flows = set(self._taking)
        async with self.engine.connect() as conn:
            since = self.clock() - self.book.flap_window
            found = await queries.load_incidents(conn, since, flows)
        self.book.replace(flows, found)
        self._taking -= flows

    async def _decide(self) -> None:
        """Decide incidents and build the rows of the results queued now, DECIDE_SLICE at a
        time with the loop let go between slices: 12-15 µs a result on the loop's thread, so
        a linger's worth at once (250 at 1,000 runs/s) held the loop 3-3.6 ms, and a response
        arriving meanwhile is stamped late. Sliced, the longest stall while the store writes
        250 runs went from 3.4-7.5 ms to 1.7-3.2 ms (the rest: the SQLite thread's GIL)."""
        waiting: list[RunResult] = []  # of flows whose stored incidents are not loaded yet
        todo = len(self._incoming)
        while todo > 0 and self._incoming:
            for _ in range(min(todo, DECIDE_SLICE)):
                if not self._incoming:
                    break
                self._decide_one(self._incoming.popleft(), waiting)
            todo -= DECIDE_SLICE
            if todo > 0:
                await asyncio.sleep(0)
        self._incoming.extendleft(reversed(waiting))  # ahead of what came meanwhile, in order

    def _decide_one(self, result: RunResult, waiting: list[RunResult]) -> None:
        if self._taking and getattr(result, "flow", None) in self._taking:
            waiting.append(result)
            return
        try:
            self.book.apply(result)
            run, hops = run_rows(result, self.excerpt_limit)
            evidence = artifact_rows(result) if len(self._ready) < ARTIFACTS_BUFFERED else []
            self._ready.append((run, hops, evidence))
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
                log.error("store refused run %s: %s", batch[0][0][0], exc)
            batch.pop(0)
        try:
            await self._write([], dirty)
        except Exception as exc:
            if not _is_poison(exc):
                raise
            log.error("store refused incidents %s: %s", [i.id for i in dirty], exc)
            dirty.clear()

    def _insert_sql(self, table: Table, columns: tuple[str, ...]) -> str:
        """The driver's own INSERT of `columns` into `table`, parameters in that order."""
        statement = insert(table).inline().values({name: bindparam(name) for name in columns})
        compiled = statement.compile(dialect=self.engine.dialect)
        if list(compiled.positiontup or ()) != list(columns):
            raise RuntimeError(f"{table.name}: the driver's parameters are not positional")
        return str(compiled)

    async def _write(self, batch: Sequence[_Rows], dirty: Sequence[Incident]) -> None:
        """Runs go to the driver as tuples (`exec_driver_sql`, its executemany): SQLAlchemy's
        per-row parameter processing was most of the store's CPU on the loop's thread."""
        if self._inserts is None:
            self._inserts = (
                self._insert_sql(runs, RUN_COLUMNS),
                self._insert_sql(step_results, STEP_COLUMNS),
                self._insert_sql(step_artifacts, ARTIFACT_COLUMNS),
            )
        insert_runs, insert_steps, insert_artifacts = self._inserts
        async with asyncio.timeout(self.write_timeout_s), self.engine.begin() as conn:
            if batch:
                await conn.exec_driver_sql(insert_runs, [run for run, _, _ in batch])
                steps = [step for _, run_steps, _ in batch for step in run_steps]
                if steps:
                    await conn.exec_driver_sql(insert_steps, steps)
                evidence = [row for _, _, rows in batch for row in rows]
                if evidence:
                    await conn.exec_driver_sql(insert_artifacts, evidence)
                    await queries.keep_newest_artifacts(conn, ARTIFACTS_KEPT)
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
            busy = self._last_batch >= BUSY_RUNS
            await self._wait(self._full, self.linger_s * (BUSY_LINGER if busy else 1))
        self._full.clear()

    @staticmethod
    async def _wait(event: asyncio.Event, timeout_s: float | None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()

    # --- handing flows between replicas ----------------------------------------------------

    async def take_flows(self, flows: Collection[str]) -> None:
        """Before this replica starts `flows`: load their incidents from the database in place
        of what the book had, so a failure continues the incident another replica opened.

        Bounded by `handover_timeout_s`: if the database is away, the writer loads them when
        it is back, and holds these flows' results undecided until it has.
        """
        names = set(flows)
        if names and not self._stop.is_set():
            self._releasing -= names
            self._taking |= names
            await self._handover("take", names)

    async def release_flows(self, flows: Collection[str]) -> None:
        """After this replica stopped `flows` (their last runs submitted): write everything
        pending, then drop their incidents from the book.

        Bounded like `take_flows`: if the database is away, the writer finishes when it is back.
        """
        names = set(flows)
        if names and not self._stop.is_set():
            self._releasing |= names
            await self._handover("release", names)

    async def close_unconfigured(self, flows: Collection[str]) -> None:
        """After a reload changed `flows` (the book's policy already the new one): load their
        stored incidents again, as `take_flows` does, so that those of links no longer
        configured close as they would at a start (`link no longer configured`)."""
        await self.take_flows(flows)

    async def _handover(self, what: str, names: set[str]) -> None:
        try:
            async with asyncio.timeout(self.handover_timeout_s):
                if await self.flush():
                    return
            why = self.stats.last_error
        except TimeoutError:
            why = f"no answer within {self.handover_timeout_s:g}s"
        log.warning("store %r: %s of %d flows left to the writer: %s", self, what, len(names), why)
        self._wake.set()

    # --- retention -------------------------------------------------------------------------

    async def prune(self, now: float | None = None) -> int:
        """Delete runs older than the retention and incidents closed before it; returns runs."""
        if self.retention_s is None:
            return 0
        cutoff = (self.clock() if now is None else now) - self.retention_s
        old = select(runs.c.id).where(runs.c.started_at < cutoff)
        async with self.engine.begin() as conn:
            await conn.execute(delete(step_artifacts).where(step_artifacts.c.run_id.in_(old)))
            await conn.execute(delete(step_results).where(step_results.c.run_id.in_(old)))
            deleted = await conn.execute(delete(runs).where(runs.c.started_at < cutoff))
            await conn.execute(delete(incidents).where(incidents.c.closed_at < cutoff))
            windows = maintenance_windows.c
            await conn.execute(delete(maintenance_windows).where(windows.end < cutoff))
        return int(deleted.rowcount)
