"""Replicas sharing one store: a flow handed from one replica to another keeps its incident."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from monitor.api import install_api_routes
from monitor.results import RunResult
from monitor.store import Store
from monitor.store.views import IncidentView
from tests.fixtures.store import PG_HOST, PG_PORT, T0, TcpProxy, flow_stub, make_run

NOW = T0 + 100  # both replicas' clock: closed incidents stay within the flap window
FLOWS = [flow_stub("checkout"), flow_stub("search")]


def _run(replica: str, run_id: str, at: float, *, flow: str = "checkout", fail: bool) -> RunResult:
    run = make_run(run_id=run_id, flow=flow, started_at=at, fail_at="read_back" if fail else None)
    run.replica = replica
    return run


def _replica(url: str, **options: Any) -> Store:
    # A long linger: only what the test (or a handover) flushes is written.
    return Store(url, clock=lambda: NOW, flap_window_s=600, linger_s=60, **options)


@contextmanager
def _within(seconds: float) -> Iterator[None]:
    started = time.monotonic()
    yield
    assert time.monotonic() - started < seconds


async def _incidents(store: Store) -> list[IncidentView]:
    return (await store.list_incidents(flow="checkout")).incidents


@asynccontextmanager
async def _api(store: Store) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    install_api_routes(app, store=store, flows=FLOWS, last_runs={}, bearer_auth=False)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def test_a_handed_over_flow_continues_and_closes_its_incident(store_url: str) -> None:
    a, b = _replica(store_url), _replica(store_url)
    await a.migrate()
    await a.start()
    try:
        a.submit(_run("a", "bad1", T0, fail=True))
        a.submit(_run("a", "s-bad", T0, flow="search", fail=True))  # stays with a
        assert await a.flush()
        await b.start()  # b's book now holds checkout's incident at 1 failure
        a.submit(_run("a", "bad2", T0 + 30, fail=True))  # lingering, not yet written

        await a.release_flows(["checkout"])
        (incident,) = await _incidents(b)
        assert (incident.failures, incident.last_failed_run_id) == (2, "bad2")
        assert [i.flow for i in a.open_incidents()] == ["search"]  # only checkout was let go

        await b.take_flows(["checkout"])
        b.submit(_run("b", "bad3", T0 + 60, fail=True))
        assert await b.flush()
        (continued,) = await _incidents(a)
        assert (continued.id, continued.status, continued.failures) == (incident.id, "open", 3)
        assert (continued.first_run_id, continued.last_failed_run_id) == ("bad1", "bad3")

        b.submit(_run("b", "ok4", T0 + 90, fail=False))
        assert await b.flush()
        for store in (a, b):
            async with _api(store) as api:
                body = await (await api.get("/api/v1/incidents?flow=checkout")).json()
                assert [
                    (i["id"], i["status"], i["failures"], i["closing_run_id"])
                    for i in body["incidents"]
                ] == [(incident.id, "closed", 3, "ok4")]
                runs = await (await api.get("/api/v1/runs?flow=checkout")).json()
                assert [(r["run_id"], r["replica"]) for r in runs["runs"]] == [
                    ("ok4", "b"),
                    ("bad3", "b"),
                    ("bad2", "a"),
                    ("bad1", "a"),
                ]

        # And back: a failure soon after the close reopens that incident on the first replica.
        await b.release_flows(["checkout"])
        assert "checkout" not in {i.flow for i in b.open_incidents()}
        await a.take_flows(["checkout"])
        a.submit(_run("a", "bad5", T0 + 95, fail=True))
        assert await a.flush()
        (reopened,) = await _incidents(b)
        assert (reopened.id, reopened.status, reopened.failures, reopened.flaps) == (
            incident.id,
            "open",
            4,
            1,
        )
    finally:
        await a.close()
        await b.close()


async def test_a_replica_that_never_saw_the_incident_continues_it(store_url: str) -> None:
    a, b = _replica(store_url), _replica(store_url)
    await a.migrate()
    await a.start()
    await b.start()  # before the incident exists: b's book knows nothing of it
    try:
        a.submit(_run("a", "bad1", T0, fail=True))
        await a.release_flows({"checkout"})
        # Many flows at once: read in chunks (checkout sorts into the third one).
        await b.take_flows({"checkout", *(f"a{i:04}" for i in range(1200))})
        b.submit(_run("b", "bad2", T0 + 30, fail=True))
        assert await b.flush()
        (incident,) = await _incidents(b)
        assert (incident.failures, incident.first_run_id, incident.last_failed_run_id) == (
            2,
            "bad1",
            "bad2",
        )
    finally:
        await a.close()
        await b.close()


async def test_handover_of_no_flows_touches_nothing(sqlite_url: str) -> None:
    store = _replica(sqlite_url)
    await store.migrate()
    await store.start()
    try:
        store.submit(_run("a", "bad1", T0, fail=True))
        await store.release_flows([])
        await store.take_flows(set())
        assert store.buffered == 1  # no flush was forced
    finally:
        await store.close()


# --- the database away during a handover -----------------------------------------------------


@asynccontextmanager
async def _proxied(pg_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    proxy = TcpProxy(PG_HOST, PG_PORT)
    await proxy.start()
    try:
        yield proxy, pg_url.replace(f"{PG_HOST}:{PG_PORT}", f"127.0.0.1:{proxy.port}")
    finally:
        await proxy.stop()


@pytest.mark.postgres
async def test_take_while_the_database_is_away_loads_before_deciding(pg_url: str) -> None:
    a = _replica(pg_url)
    await a.migrate()
    await a.start()
    async with _proxied(pg_url) as (proxy, via_proxy):
        b = _replica(via_proxy, handover_timeout_s=2, retry_min_s=0.05)
        try:
            a.submit(_run("a", "bad1", T0, fail=True))
            assert await a.flush()
            await b.start()  # b's book: 1 failure
            a.submit(_run("a", "bad2", T0 + 30, fail=True))
            await a.release_flows(["checkout"])  # the database: 2 failures

            await proxy.stop()
            with _within(4):
                await b.take_flows(["checkout"])  # bounded: probing starts anyway
            b.submit(_run("b", "bad3", T0 + 60, fail=True))
            assert not await b.flush()

            await proxy.start()
            assert await b.flush()
            (incident,) = await _incidents(a)
            assert (incident.failures, incident.last_failed_run_id) == (3, "bad3")
        finally:
            await b.close()
            await a.close()


@pytest.mark.postgres
async def test_release_while_the_database_is_away_finishes_when_it_is_back(
    pg_url: str,
) -> None:
    setup = Store(pg_url)
    await setup.migrate()
    await setup.close()
    async with _proxied(pg_url) as (proxy, via_proxy):
        a = Store(via_proxy, handover_timeout_s=2, retry_min_s=0.05, retry_max_s=0.5)
        await a.start()
        try:
            a.submit(_run("a", "bad1", T0, fail=True))
            assert await a.flush()
            await proxy.stop()
            a.submit(_run("a", "bad2", T0 + 30, fail=True))
            with _within(4):
                await a.release_flows(["checkout"])
            # bad2 and the incident wait in the buffer; the book lets go once they are written.
            assert (a.buffered, a.stats.written) == (1, 1)
            assert [i.flow for i in a.open_incidents()] == ["checkout"]

            await proxy.start()
            async with asyncio.timeout(30):
                await a.wait_written(2)  # the writer finishes the handover on its own
            assert await a.flush()
            assert a.open_incidents() == []
            (incident,) = await _incidents(a)
            assert (incident.failures, incident.last_failed_run_id) == (2, "bad2")
        finally:
            await a.close()


async def test_a_handover_against_a_silent_database_is_bounded() -> None:
    """A database that accepts connections and never answers must not hold flows back."""
    peers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = Store(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x", handover_timeout_s=0.3)
    try:
        with _within(2):  # the driver's own connect timeout is 5 s
            await store.take_flows(["checkout"])
            await store.release_flows(["search"])
    finally:
        await store.close(timeout_s=0.3)
        for writer in peers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()
