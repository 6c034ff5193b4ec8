"""Faults in the parts hopwatch leans on: a Kafka broker killed and restarted breaks only the
links through it (and they heal), a PostgreSQL store cut away and back loses no run; a healthy
flow keeps its grid throughout and every run is counted once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.demo.broker import TansuBroker
from monitor.engine import Engine, Options
from monitor.results import RunResult
from tests.fixtures.core import serve
from tests.fixtures.faults import (
    assert_counted_once,
    assert_on_schedule,
    runs_total,
    scaled,
    store_rows,
)
from tests.fixtures.store import PG_HOST, PG_PORT, TcpProxy
from tests.test_http import target_app
from tests.test_scheduler import Collect

STEADY = 0.25
RELAY = 0.3


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    server = await serve(target_app())
    yield server
    await server.close()


def steady_flow(target: TestServer) -> str:
    return (
        f"  - name: steady\n    interval: {STEADY}s\n    jitter: 0s\n    timeout: 2s\n"
        f"    steps: [{{name: ok, kind: http, url: 'http://127.0.0.1:{target.port}/json'}}]\n"
    )


async def first_pass(sink: Collect, flow: str, after: int, most: int = 200) -> RunResult:
    """The first run of `flow` past its `after` first ones that passed (waiting as they come)."""
    for n in range(after + 1, after + most):
        await sink.wait_for(flow, n, timeout=30)
        if (run := sink.of(flow)[n - 1]).outcome == "success":
            return run
    raise AssertionError(f"{flow} did not pass in {most} runs")


@pytest.mark.kafka
async def test_a_killed_broker_breaks_only_its_links_and_they_heal_when_it_returns(
    own_kafka_broker: TansuBroker,
    target: TestServer,
    unique_topic: str,
    load_flows: Callable[[str], Config],
    sqlite_url: str,
) -> None:
    config = load_flows(
        "kafka:\n  clusters:\n    flaky:\n"
        f"      {{bootstrap_servers: '{own_kafka_broker.bootstrap}', request_timeout: 1s, "
        "health_interval: 300ms}\n"
        "flows:\n" + steady_flow(target)
        + f"  - name: relay\n    interval: {RELAY}s\n    jitter: 0s\n    timeout: 3s\n"
        f"    steps:\n      - {{name: send, kind: kafka_produce, cluster: flaky, "
        f"topic: {unique_topic}, key: '{{{{ run.correlation }}}}', "
        "value: {ref: '{{ run.correlation }}'}}\n"
        f"      - {{name: observe, kind: kafka_consume, cluster: flaky, topic: {unique_topic}, "
        "within: 2s}\n"
    )  # fmt: skip
    sink, registry = Collect(), CollectorRegistry()
    engine = Engine(config, Options(store_url=sqlite_url, grace=0.1, extra_sinks=[sink]), registry)
    await engine.start(admin=False)
    outages: list[tuple[float, float]] = []  # (killed at, first pass after) in unix time
    recovery: list[float] = []  # from the broker's return to the relay's first pass
    try:
        await sink.wait_for("relay", 2, timeout=20)
        for _ in range(scaled(1)):
            ran = len(sink.of("relay"))
            killed = time.time()
            await own_kafka_broker.kill()
            await sink.wait_for("relay", ran + 3, timeout=30)  # three runs into the outage
            back = time.time()
            await own_kafka_broker.start()  # same port, empty storage
            healed = await first_pass(sink, "relay", ran + 3)
            outages.append((killed, healed.started_at))
            recovery.append(healed.started_at - back)
            await sink.wait_for("relay", len(sink.of("relay")) + 2, timeout=20)
    finally:
        await engine.stop()

    def in_outage(started: float) -> bool:
        return any(killed - RELAY <= started < healed for killed, healed in outages)

    relay = [r for r in sink.of("relay") if r.outcome != "aborted"]
    broke = {(r.broken.name, r.broken.reason) for r in relay if r.broken is not None}
    assert broke, "the outage broke nothing"
    assert broke <= {
        ("send", "connect_error"), ("send", "timeout"),
        ("observe", "connect_error"), ("observe", "timeout"),
    }, broke  # fmt: skip
    false = [r for r in relay if r.broken is not None and not in_outage(r.started_at)]
    assert not false, f"failures outside the outages: {[(r.broken) for r in false]}"
    assert max(recovery) < 30, recovery
    # A broker starting (a Rust process on this 2-core machine) can starve the test's loop for
    # a quarter of a second: one tick skipped per restart is the machine's, not the monitor's.
    assert_on_schedule(sink.results, "steady", STEADY, missed=len(outages))
    assert_counted_once(sink.results, runs_total(registry), await store_rows(sqlite_url))


@pytest.mark.postgres
async def test_a_store_cut_away_and_back_loses_no_run_and_fails_no_flow(
    pg_url: str, target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    proxy = TcpProxy(PG_HOST, PG_PORT)
    await proxy.start()
    via_proxy = pg_url.replace(f"{PG_HOST}:{PG_PORT}", f"127.0.0.1:{proxy.port}")
    config = load_flows("flows:\n" + steady_flow(target))
    sink, registry = Collect(), CollectorRegistry()
    engine = Engine(config, Options(store_url=via_proxy, grace=0.1, extra_sinks=[sink]), registry)
    await engine.start(admin=False)
    try:
        assert engine.store is not None
        await sink.wait_for("steady", 4)
        for _ in range(scaled(1)):
            errors = engine.store.stats.write_errors
            await proxy.stop()  # every connection cut; new ones refused
            await sink.wait_for("steady", len(sink.results) + 8)  # two seconds without a store
            assert engine.store.stats.write_errors > errors, "the store never noticed"
            await proxy.start()
            await sink.wait_for("steady", len(sink.results) + 4)
        async with asyncio.timeout(30):  # the writer's own retry gets it all written
            await engine.store.wait_written(len(sink.results))
        assert engine.store.stats.reachable
    finally:
        await engine.stop()
        await proxy.stop()
    assert engine.store.stats.dropped == 0
    assert_on_schedule(sink.results, "steady", STEADY)
    assert_counted_once(sink.results, runs_total(registry), await store_rows(pg_url))
