"""The store on SQLite and on the machine's PostgreSQL: migrations, writes, incidents, queries."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy import event, func, insert, inspect, select

from monitor.config import Config
from monitor.results import RunResult
from monitor.runner import new_run_id
from monitor.sinks import Sink
from monitor.store import EXCERPT_LIMIT, IncidentBook, Store, normalize_url
from monitor.store import migrate as migrations
from monitor.store.incidents import IncidentPolicy, IncidentRules, policy_of
from monitor.store.rows import (
    ARTIFACT_COLUMNS,
    ATTRIBUTES_LIMIT,
    RUN_COLUMNS,
    STEP_COLUMNS,
    _phases,
    row_dict,
    run_rows,
)
from monitor.store.schema import incidents, metadata, runs, step_artifacts, step_results
from monitor.store.store import BUSY_LINGER, BUSY_RUNS
from tests.fixtures.store import PG_HOST, PG_PORT, T0, TcpProxy, make_run

# --- migrations ------------------------------------------------------------------------------


def _schema_diff(connection: Any) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "version_table": "hopwatch_alembic_version"}
    )
    return list(compare_metadata(context, metadata))


def _tables(connection: Any) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_migrations_build_exactly_the_declared_schema(store_url: str) -> None:
    store = Store(store_url)
    try:
        await store.migrate()
        await store.migrate()  # idempotent: a restart migrates again
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
            assert {"runs", "step_results", "incidents"} <= await conn.run_sync(_tables)
        await migrations.downgrade(store.engine, "base")
        async with store.engine.connect() as conn:
            assert not {"runs", "step_results", "incidents"} & await conn.run_sync(_tables)
        await store.migrate()
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
    finally:
        await store.engine.dispose()


async def test_concurrent_migrations_do_not_collide(store_url: str) -> None:
    """Several replicas starting together against one database."""
    stores = [Store(store_url) for _ in range(3)]
    try:
        await asyncio.gather(*(s.migrate() for s in stores))
        async with stores[0].engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
    finally:
        for s in stores:
            await s.engine.dispose()


async def test_v0002_names_replicas_on_a_v0001_database_that_has_rows(store_url: str) -> None:
    store = Store(store_url)
    try:
        await migrations.upgrade(store.engine, "0001")
        old = make_run(run_id="old", fail_at="read_back")
        run_tuple, step_tuples = run_rows(old)
        run_row = row_dict(RUN_COLUMNS, run_tuple)
        step_rows = [row_dict(STEP_COLUMNS, row) for row in step_tuples]
        del run_row["replica"], run_row["maintenance"]  # v0001 has no such columns
        for row in step_rows:  # nor these (v0003)
            del row["own_latency_s"], row["duration_s"]
        async with store.engine.begin() as conn:
            await conn.execute(insert(runs), [run_row])
            await conn.execute(insert(step_results), step_rows)
        await store.migrate()
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
        got = await store.get_run("old")
        assert got is not None
        assert (got.replica, len(got.steps), got.broken_step) == (None, 2, "read_back")
        new = make_run(run_id="new", started_at=T0 + 1)
        new.replica = "r2"
        store.submit(new)
        assert await store.flush()
        assert [(r.run_id, r.replica) for r in (await store.list_runs()).runs] == [
            ("new", "r2"),
            ("old", None),
        ]
        # Back to v0001 keeps the runs and their hops (a table copy on SQLite would cascade).
        await migrations.downgrade(store.engine, "0001")
        async with store.engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(step_results)) == 4
            columns = await conn.run_sync(lambda c: inspect(c).get_columns("runs"))
        assert "replica" not in {c["name"] for c in columns}
    finally:
        await store.close()


_MIGRATE = """
import asyncio, sys
from monitor.store import Store

async def main() -> None:
    store = Store(sys.argv[1])
    async with store.engine.connect():
        pass
    print("ready", flush=True)
    sys.stdin.readline()  # all replicas start migrating together
    await store.migrate()
    await store.engine.dispose()

asyncio.run(main())
"""


@pytest.mark.postgres
async def test_replicas_migrating_one_database_at_once(pg_url: str) -> None:
    """Separate processes (as replicas are) serialise on PostgreSQL's advisory lock; without
    it, all but one fail creating the same tables."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _MIGRATE,
            pg_url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    async with asyncio.timeout(60):
        for proc in procs:
            assert proc.stdout is not None
            assert await proc.stdout.readline() == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        results = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode() for _, err in results]
    store = Store(pg_url)
    try:
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
    finally:
        await store.engine.dispose()


# --- writing and reading runs ------------------------------------------------------------------


async def test_run_round_trip_keeps_hops_timings_and_a_bounded_excerpt(store: Store) -> None:
    huge = "é" * 10_000  # 2 bytes each in UTF-8
    run = make_run(fail_at="read_back", excerpt=huge, cleanup=["delete_order"], trace_id="ab" * 16)
    run.steps[0].attributes = {"status": 201, "url": "http://127.0.0.1/orders", "obj": object()}
    store.submit(run)
    assert await store.flush()

    got = await store.get_run(run.run_id)
    assert got is not None
    assert (got.flow, got.outcome, got.broken_step, got.reason) == (
        "checkout",
        "failure",
        "read_back",
        "http_status",
    )
    assert got.trace_id == "ab" * 16
    assert [(s.name, s.status, s.cleanup) for s in got.steps] == [
        ("create_order", "passed", False),
        ("read_back", "failed", False),
        ("delete_order", "passed", True),
    ]
    first, failed = got.steps[0], got.steps[1]
    assert first.phases == pytest.approx(run.steps[0].phases)
    assert first.attributes["status"] == 201
    assert isinstance(first.attributes["obj"], str)  # made JSON-safe, not dropped
    assert failed.message == "status 503, want 200 at read_back"
    assert failed.excerpt is not None
    assert len(failed.excerpt.encode()) <= EXCERPT_LIMIT
    assert failed.excerpt.endswith("…")
    assert failed.offset_s == pytest.approx(0.02)
    assert await store.get_run("no-such-run") is None


async def test_writer_task_writes_without_an_explicit_flush(store: Store) -> None:
    for i in range(5):
        store.submit(make_run(started_at=T0 + i))
    async with asyncio.timeout(10):
        await store.wait_written(5)
    page = await store.list_runs()
    assert len(page.runs) == 5


def test_run_ids_sort_in_the_order_they_were_made() -> None:
    """The store's indexes on run ids grow at one end only if later ids sort later (random
    ids cost the SQLite store 2-2.6x the CPU a run once it holds many)."""
    made = []
    for _ in range(5):
        made += [new_run_id() for _ in range(2_000)]
        time.sleep(0.002)  # ids of one millisecond are ordered by chance only
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in made)
    assert len(set(made)) == len(made)
    prefixes = [i[:12] for i in made]
    assert prefixes == sorted(prefixes)
    assert int(prefixes[0], 16) == pytest.approx(time.time() * 1000, abs=60_000)


async def test_a_busy_monitors_runs_go_in_few_transactions(store_url: str) -> None:
    """Saturated, a linger's worth of runs (400 at 1,600 runs/s) is one transaction, not one
    per 200: each costs a pool checkout, thread hops and the index pages it rewrites."""
    store = Store(store_url)  # the defaults
    await store.migrate()
    commits = 0

    def count(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(store.engine.sync_engine, "commit", count)
    try:
        for i in range(400):
            store.submit(make_run(flow=f"f{i % 40}", started_at=T0 + i, steps=("get",)))
        assert await store.flush()
        assert store.stats.written == 400
        assert commits == 1
    finally:
        await store.close()


async def test_a_busy_store_lingers_longer_and_a_quiet_one_does_not(store_url: str) -> None:
    """After a transaction of BUSY_RUNS runs or more the writer lingers BUSY_LINGER times as
    long (bigger transactions: fewer index pages rewritten a run); after a small one, not."""
    store = Store(store_url, linger_s=0.2)
    await store.migrate()
    await store.start()
    try:

        async def written_after(count: int) -> float:
            begun, target = time.monotonic(), store.stats.written + count
            for i in range(count):
                store.submit(make_run(flow=f"f{i % 40}", started_at=T0 + i, steps=("get",)))
            async with asyncio.timeout(10):
                await store.wait_written(target)
            return time.monotonic() - begun

        await written_after(BUSY_RUNS)  # one transaction: the store is busy now
        assert await written_after(1) >= 0.2 * BUSY_LINGER * 0.9
        assert await written_after(1) < 0.2 * BUSY_LINGER * 0.75  # a small batch: quiet again
    finally:
        await store.close()


async def test_the_writer_decides_a_long_queue_in_slices_and_lets_the_loop_run(
    store_url: str,
) -> None:
    """Deciding a linger's worth of runs at once held the loop for milliseconds (responses
    stamped late meanwhile): the loop runs between slices of the queue."""
    store = Store(store_url)
    await store.migrate()
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(len(store._incoming))
            await asyncio.sleep(0)

    for i in range(200):
        store.submit(make_run(flow=f"f{i % 20}", started_at=T0 + i, steps=("get",)))
    watcher = asyncio.create_task(watch())
    try:
        assert await store.flush()
        assert store.stats.written == 200
        assert any(0 < n < 200 for n in seen)  # the loop ran with the queue part decided
    finally:
        watcher.cancel()
        await store.close()


async def test_list_runs_filters_and_paginates_without_gaps_or_repeats(store: Store) -> None:
    expected = []
    for i in range(23):
        run = make_run(
            started_at=T0 + i // 2,  # pairs share a start time: the cursor must break ties
            variant="canary" if i % 3 == 0 else "stable",
            fail_at="read_back" if i % 4 == 0 else None,
        )
        store.submit(run)
        expected.append(run)
    store.submit(make_run(flow="other", started_at=T0 + 100))
    assert await store.flush()

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page = await store.list_runs(flow="checkout", limit=5, cursor=cursor)
        seen += [r.run_id for r in page.runs]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(r.run_id for r in expected)
    assert len(seen) == len(set(seen))

    canary_failures = await store.list_runs(variant="canary", outcome="failure", limit=500)
    assert {r.run_id for r in canary_failures.runs} == {
        r.run_id for r in expected if r.variant == "canary" and r.outcome == "failure"
    }
    window = await store.list_runs(since=T0 + 3, until=T0 + 5, limit=500)
    assert {r.run_id for r in window.runs} == {
        r.run_id for r in expected if T0 + 3 <= r.started_at < T0 + 5
    }
    newest = await store.list_runs(limit=1)
    assert newest.runs[0].flow == "other"


async def test_samples_give_per_hop_lists_for_a_variant_and_window(store: Store) -> None:
    for i in range(6):
        store.submit(
            make_run(
                variant="canary",
                started_at=T0 + i,
                latency_s=0.01 * (i + 1),
                fail_at="read_back" if i == 2 else None,
                cleanup=["delete_order"],
            )
        )
        store.submit(make_run(variant="stable", started_at=T0 + i, latency_s=0.5))
    assert await store.flush()

    got = await store.samples("checkout", "canary", T0 + 1, T0 + 5)
    assert set(got) == {"create_order", "read_back"}  # cleanup is not a hop
    read_back = got["read_back"]
    assert read_back.started_at == [T0 + 1, T0 + 2, T0 + 3, T0 + 4]
    assert read_back.status == ["passed", "failed", "passed", "passed"]
    assert read_back.latency_s == pytest.approx([0.02, 0.03, 0.04, 0.05])
    assert read_back.passed_latencies() == pytest.approx([0.02, 0.04, 0.05])
    assert got["create_order"].kind == "http"


async def test_a_refused_row_is_dropped_alone(store: Store) -> None:
    dup = make_run(run_id="same")
    store.submit(dup)
    assert await store.flush()
    others = [make_run(started_at=T0 + i) for i in range(3)]
    store.submit(make_run(run_id="same"))  # primary key clash: the database refuses it
    for run in others:
        store.submit(run)
    assert await store.flush()
    assert store.stats.rejected == 1
    page = await store.list_runs(limit=500)
    assert {r.run_id for r in page.runs} == {"same", *(r.run_id for r in others)}


async def test_retention_deletes_old_runs_and_old_closed_incidents(store_url: str) -> None:
    store = Store(store_url, retention_s=3600, clock=lambda: T0 + 10_000)
    await store.migrate()
    try:
        store.submit(make_run(run_id="old-fail", started_at=T0, fail_at="read_back"))
        store.submit(make_run(run_id="old-pass", started_at=T0 + 10))
        store.submit(make_run(run_id="new", started_at=T0 + 9_000, fail_at="create_order"))
        assert await store.flush()
        assert await store.prune() == 2
        assert [r.run_id for r in (await store.list_runs()).runs] == ["new"]
        left = (await store.list_incidents()).incidents
        assert [(i.step, i.status) for i in left] == [("create_order", "open")]
        async with store.engine.connect() as conn:
            orphans = await conn.scalar(select(func.count()).select_from(step_results))
        assert orphans == 2  # only the new run's hops
    finally:
        await store.close()


# --- incidents ---------------------------------------------------------------------------------


async def test_incident_opens_counts_and_closes(store: Store) -> None:
    store.submit(make_run(run_id="ok0", started_at=T0))
    store.submit(make_run(run_id="bad1", started_at=T0 + 30, fail_at="read_back", reason="timeout"))
    store.submit(make_run(run_id="bad2", started_at=T0 + 60, fail_at="read_back"))
    assert await store.flush()

    (incident,) = (await store.list_incidents(status="open")).incidents
    assert (incident.flow, incident.variant, incident.location, incident.step) == (
        "checkout",
        "default",
        "local",
        "read_back",
    )
    assert (incident.first_run_id, incident.last_failed_run_id) == ("bad1", "bad2")
    assert (incident.opened_at, incident.failures, incident.reason, incident.last_reason) == (
        T0 + 30,
        2,
        "timeout",
        "http_status",
    )
    assert [i.id for i in store.open_incidents()] == [incident.id]

    store.submit(make_run(run_id="ok3", started_at=T0 + 90))
    assert await store.flush()
    assert (await store.list_incidents(status="open")).incidents == []
    (closed,) = (await store.list_incidents(status="closed")).incidents
    assert (closed.id, closed.closed_at, closed.closing_run_id) == (incident.id, T0 + 90, "ok3")


async def test_a_skipped_hop_neither_opens_nor_keeps_an_incident(store: Store) -> None:
    # create_order broken: read_back is skipped, so nothing is known about read_back.
    store.submit(make_run(started_at=T0, fail_at="create_order"))
    assert await store.flush()
    (incident,) = (await store.list_incidents()).incidents
    assert incident.step == "create_order"
    # read_back broken, then skipped behind create_order: its incident closes, saying why,
    # and the open incident is the hop that broke
    store.submit(make_run(run_id="rb", started_at=T0 + 10, fail_at="read_back"))
    store.submit(make_run(run_id="co", started_at=T0 + 20, fail_at="create_order"))
    assert await store.flush()
    opened = (await store.list_incidents(status="open")).incidents
    assert [i.step for i in opened] == ["create_order"]
    read_back = next(i for i in (await store.list_incidents()).incidents if i.step == "read_back")
    assert (read_back.status, read_back.closing_run_id, read_back.close_reason) == (
        "closed",
        "co",
        "skipped: create_order broke (http_status)",
    )


async def test_incident_state_is_reloaded_at_start(store_url: str) -> None:
    first = Store(store_url, flap_window_s=600)
    await first.migrate()
    await first.start()
    first.submit(make_run(run_id="bad", started_at=T0, fail_at="read_back"))
    await first.close()

    second = Store(store_url, flap_window_s=600, clock=lambda: T0 + 100)
    await second.start()
    try:
        assert [i.first_run_id for i in second.open_incidents()] == ["bad"]
        second.submit(make_run(run_id="ok", started_at=T0 + 60))
        assert await second.flush()
        (incident,) = (await second.list_incidents()).incidents
        assert (incident.status, incident.closing_run_id) == ("closed", "ok")
    finally:
        await second.close()


async def test_incidents_of_links_no_longer_configured_close_at_start(store_url: str) -> None:
    first = Store(store_url)
    await first.migrate()
    await first.start()
    first.submit(make_run(run_id="old", flow="renamed_away", started_at=T0, fail_at="read_back"))
    first.submit(make_run(run_id="kept", started_at=T0, fail_at="read_back"))
    await first.close()

    configured = {("checkout", "default", s) for s in ("create_order", "read_back")}
    second = Store(
        store_url, incidents=IncidentPolicy(configured=configured), clock=lambda: T0 + 100
    )
    await second.start()
    try:
        assert [i.flow for i in second.open_incidents()] == ["checkout"]
        assert await second.flush()
        gone = (await second.list_incidents(flow="renamed_away")).incidents
        assert [(i.status, i.closed_at, i.close_reason) for i in gone] == [
            ("closed", T0 + 100, "link no longer configured")
        ]
        assert [i.flow for i in (await second.list_incidents(status="open")).incidents] == [
            "checkout"
        ]
    finally:
        await second.close()


@pytest.mark.parametrize(
    ("rules", "reasons", "incidents_expected", "flaps"),
    [
        # the default keeps faults minutes apart as separate incidents
        pytest.param(IncidentRules(), [(0, "x"), (30, None), (200, "x")], 2, 0, id="default"),
        pytest.param(IncidentRules(), [(0, "x"), (30, None), (60, "x")], 1, 1, id="flap"),
        # another reason soon after is another fault, unless any reason reopens
        pytest.param(IncidentRules(), [(0, "x"), (30, None), (60, "y")], 2, 0, id="same-reason"),
        pytest.param(IncidentRules(reopen="any_reason"), [(0, "x"), (30, None), (60, "y")], 1, 1,
                     id="any-reason"),
        pytest.param(IncidentRules(600.0), [(0, "x"), (30, None), (200, "x")], 1, 1, id="wide"),
        pytest.param(IncidentRules(0.0), [(0, "x"), (30, None), (31, "x")], 2, 0, id="never"),
    ],
)  # fmt: skip
def test_flap_window_and_reopen_rules(
    rules: IncidentRules,
    reasons: list[tuple[float, str | None]],
    incidents_expected: int,
    flaps: int,
) -> None:
    book = IncidentBook(policy=IncidentPolicy(flows={"checkout": rules}))
    for i, (at, reason) in enumerate(reasons):
        failing = reason is not None
        run = make_run(
            run_id=f"r{i}",
            started_at=T0 + at,
            fail_at="read_back" if failing else None,
            reason=reason or "x",
        )
        book.apply(run)
    made = {i.id: i for i in book.take_dirty()}
    assert len(made) == incidents_expected
    assert max(i.flaps for i in made.values()) == flaps


def test_incident_rules_come_from_settings_and_each_flow(
    load_flows: Callable[[str], Config],
) -> None:
    config = load_flows(
        """settings:
  incidents: {flap_window: 5m}
flows:
  - name: a
    steps: [{name: s, kind: http, url: "http://127.0.0.1:1/"}]
  - name: b
    incidents: {flap_window: 0s, reopen: any_reason}
    steps: [{name: s, kind: http, url: "http://127.0.0.1:1/"}]
"""
    )
    policy = policy_of(config)
    assert policy.rules("a") == IncidentRules(300.0, "same_reason")
    assert policy.rules("b") == IncidentRules(0.0, "any_reason")
    assert policy.configured == {("a", "default", "s"), ("b", "default", "s")}
    assert policy_of(load_flows("flows: []\n")).default == IncidentRules(60.0, "same_reason")


def _feed(book: IncidentBook, seq: list[tuple[float, bool]]) -> None:
    for i, (at, failed) in enumerate(seq):
        book.apply(make_run(run_id=f"r{i}", started_at=at, fail_at="read_back" if failed else None))


@pytest.mark.parametrize(
    ("sequence", "incidents_expected", "flaps", "failures"),
    [
        pytest.param([(0, True), (30, False), (60, True), (90, False)], 1, 1, 2, id="flap"),
        pytest.param([(0, True), (30, False), (1000, True)], 2, 0, 1, id="after-window"),
        pytest.param([(0, True), (30, True), (60, True)], 1, 0, 3, id="steady"),
        pytest.param([(0, False), (30, False)], 0, 0, 0, id="healthy"),
    ],
)
def test_flapping_reopens_the_recent_incident(
    sequence: list[tuple[float, bool]], incidents_expected: int, flaps: int, failures: int
) -> None:
    ids = iter(range(100))
    book = IncidentBook(300.0, new_id=lambda: f"i{next(ids)}")
    _feed(book, sequence)
    dirty = book.take_dirty()
    assert len(dirty) == incidents_expected
    if dirty:
        last = max(dirty, key=lambda i: i.opened_at)
        assert (last.flaps, last.failures) == (flaps, failures)


def test_a_late_passing_result_does_not_close_a_newer_failure() -> None:
    book = IncidentBook(60)
    _feed(book, [(100, True), (50, False)])
    assert len(book.open_incidents()) == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.booleans(), st.integers(1, 400)), max_size=40
    ),
    st.sampled_from([0.0, 120.0, 1e9]),
)
def test_incident_book_invariants(events: list[tuple[str, bool, int]], window: float) -> None:
    """At most one open incident per link, open iff the link's last result failed, and every
    failure is counted in exactly one incident."""
    book = IncidentBook(window)
    all_incidents: dict[str, Any] = {}
    at = T0
    last_failed: dict[str, bool] = {}
    for flow, failed, gap in events:
        at += gap
        book.apply(make_run(flow=flow, started_at=at, fail_at="read_back" if failed else None))
        for incident in book.take_dirty():
            all_incidents[incident.id] = incident
        last_failed[flow] = failed
    open_links = [i.flow for i in book.open_incidents()]
    assert len(open_links) == len(set(open_links))
    assert set(open_links) == {f for f, failed in last_failed.items() if failed}
    assert sum(i.failures for i in all_incidents.values()) == sum(f for _, f, _ in events)


# --- a store that is away ------------------------------------------------------------------------


async def test_submit_never_blocks_and_drops_oldest_when_database_is_unreachable() -> None:
    with socket.socket() as sock:  # a port nobody listens on: connections are refused, fast
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = Store(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x", max_buffer=50, retry_min_s=5)
    started = time.monotonic()
    await store.start()  # does not fail, does not hang
    for i in range(200):
        store.submit(make_run(started_at=T0 + i))
    assert time.monotonic() - started < 5
    assert store.buffered == 50
    assert store.stats.dropped == 150
    assert not await store.flush()
    assert store.stats.reachable is False
    assert store.stats.last_error
    await store.close(timeout_s=1)
    assert store.stats.dropped == 200  # the 50 still buffered are lost at close, and counted


@pytest.mark.postgres
async def test_outage_buffers_bounded_and_recovers(pg_url: str) -> None:
    setup = Store(pg_url)
    await setup.migrate()
    await setup.engine.dispose()

    proxy = TcpProxy(PG_HOST, PG_PORT)
    await proxy.start()
    via_proxy = pg_url.replace(f"{PG_HOST}:{PG_PORT}", f"127.0.0.1:{proxy.port}")
    registry = CollectorRegistry()
    store = Store(via_proxy, max_buffer=20, batch_size=5, retry_min_s=0.05, registry=registry)
    await store.start()
    try:
        store.submit(make_run(run_id="before", started_at=T0))
        assert await store.flush()

        await proxy.stop()  # the database goes away
        runs_during: list[RunResult] = [
            make_run(started_at=T0 + 1 + i, fail_at="read_back" if i >= 25 else None)
            for i in range(30)
        ]
        for run in runs_during:
            store.submit(run)
        assert not await store.flush()
        assert store.buffered == 20
        assert store.stats.dropped == 10
        assert registry.get_sample_value("hopwatch_store_dropped_runs_total") == 10
        assert registry.get_sample_value("hopwatch_store_up") == 0

        await proxy.start()  # it comes back on the same port
        assert await store.flush()
        assert registry.get_sample_value("hopwatch_store_up") == 1
        stored = await store.list_runs(limit=500)
        assert {r.run_id for r in stored.runs} == {"before"} | {r.run_id for r in runs_during[10:]}
        # The incident was decided in memory and written once the database was back.
        (incident,) = (await store.list_incidents(status="open")).incidents
        assert (incident.first_run_id, incident.failures) == (runs_during[25].run_id, 5)
    finally:
        await store.close()
        await proxy.stop()


async def test_store_metrics_are_exported(sqlite_url: str) -> None:
    registry = CollectorRegistry()
    store = Store(sqlite_url, registry=registry)
    await store.migrate()
    store.submit(make_run())
    assert await store.flush()
    assert registry.get_sample_value("hopwatch_store_written_runs_total") == 1
    assert registry.get_sample_value("hopwatch_store_buffered_runs") == 0
    await store.close()


async def test_rows_in_the_database_match_what_was_submitted(store: Store) -> None:
    store.submit(make_run(fail_at="create_order"))
    assert await store.flush()
    async with store.engine.connect() as conn:
        counts = [
            await conn.scalar(select(func.count()).select_from(t))
            for t in (runs, step_results, incidents)
        ]
    assert counts == [1, 2, 1]


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8) | st.integers(),
        st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**6), 10**6),
        max_size=6,
    )
)
def test_phases_are_written_as_json_wrote_them(phases: dict[Any, Any]) -> None:
    """The phases' fast path writes what `json` wrote for the finite ones, names escaped alike;
    other names and values still go through `json`."""
    wanted = json.dumps({str(k): float(v) for k, v in phases.items() if math.isfinite(v)})
    assert _phases(phases) == wanted


def test_row_tuples_name_every_column_their_tables_have() -> None:
    """The store writes tuples in these columns' order: a column added to a table must be
    added here too, or it would never be written."""
    for table, columns in ((runs, RUN_COLUMNS), (step_results, STEP_COLUMNS),
                           (step_artifacts, ARTIFACT_COLUMNS)):  # fmt: skip
        declared = [c.name for c in table.columns if c is not table.autoincrement_column]
        assert sorted(columns) == sorted(declared), table.name


async def test_json_columns_are_written_as_sqlalchemy_wrote_them(store: Store) -> None:
    """Phases and attributes go to the driver as JSON text: the same text SQLAlchemy's JSON
    type wrote (json.dumps's defaults, attributes' keys sorted), and big attributes clipped."""
    run = make_run()
    run.steps[0].attributes = {"z": 1, "a": "é", "n": float("nan")}  # NaN: not JSON
    run.steps[1].attributes = {"big": "x" * (ATTRIBUTES_LIMIT + 10)}
    store.submit(run)
    assert await store.flush()
    got = await store.get_run(run.run_id)
    assert got is not None
    assert got.steps[0].attributes == {"unserialisable": True}
    assert set(got.steps[1].attributes) == {"truncated"}
    assert len(got.steps[1].attributes["truncated"].encode()) <= ATTRIBUTES_LIMIT
    assert got.steps[0].phases == pytest.approx(run.steps[0].phases)
    if store.url.get_backend_name() == "sqlite":
        run = make_run()
        run.steps[0].attributes = {"z": 1, "a": "é"}
        store.submit(run)
        assert await store.flush()
        async with store.engine.connect() as conn:
            rows = await conn.exec_driver_sql(
                "SELECT phases, attributes FROM step_results WHERE run_id = ? ORDER BY position",
                (run.run_id,),
            )
            phases, attributes = rows.first() or ("", "")
        assert attributes == json.dumps({"a": "é", "z": 1})
        assert phases == json.dumps(dict(run.steps[0].phases))


@pytest.mark.parametrize(
    ("given_url", "driver"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg"),
        ("postgres://u@h/db", "postgresql+asyncpg"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg"),
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("hopwatch.db", "sqlite+aiosqlite"),
    ],
)
def test_urls_are_made_async(given_url: str, driver: str) -> None:
    assert normalize_url(given_url).drivername == driver


def test_a_sqlite_store_binds_none_and_bools_without_sqlite3s_adaptation(tmp_path: Any) -> None:
    """sqlite3 adapts anything but exact ints, floats and strings by failing two attribute
    look-ups (3 % of a saturated run's instructions); the store registers plain adapters."""
    Store(str(tmp_path / "h.db"))
    protocol = sqlite3.PrepareProtocol
    assert (type(None), protocol) in sqlite3.adapters
    assert (bool, protocol) in sqlite3.adapters
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (a, b, c)")
    db.execute("INSERT INTO t VALUES (?, ?, ?)", (None, True, False))
    assert db.execute("SELECT a, b, c, typeof(a), typeof(b) FROM t").fetchall() == [
        (None, 1, 0, "null", "integer")
    ]


async def test_store_is_a_sink_and_counts_results_after_close(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    assert isinstance(store, Sink)
    await store.migrate()
    await store.start()
    await store.close()
    store.submit(make_run())
    assert (store.buffered, store.stats.dropped) == (0, 1)
